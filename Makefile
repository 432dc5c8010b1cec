# token-ledger: `make demo` and `make test` are the two commands a newcomer needs.
SHELL := /bin/bash
PYTHON ?= python3
UV_VERSION := 0.13.8
UV := .tools/bin/uv
VENV := .venv
RUN := $(VENV)/bin
SEED ?= 1
# pytest-xdist workers for `make test`, one test file each at a time (--dist loadfile keeps a
# file's module fixtures in one worker); each worker starts its own Kafka broker and PostgreSQL.
TEST_WORKERS ?= 2
# The native decode path (native/) is Rust, built by `uv sync` through maturin: cargo must be on
# PATH. rustup's default place is added, so a shell that never sourced ~/.cargo/env works too.
export PATH := $(HOME)/.cargo/bin:$(PATH)
NATIVE := native/pyproject.toml native/Cargo.toml native/Cargo.lock native/token_ledger_native.pyi $(shell find native/src -name '*.rs')

.PHONY: setup system-packages test-packages deploy-tools jars services services-down status lint typecheck test demo bench clean chaos

setup: $(VENV)/.synced jars  ## Python env from the lock file + the Kafka broker jars

# devstack/system_packages.py is the one list of distribution packages: it installs what is
# missing (as root with apt-get) or names the packages and the command, and stops make.
system-packages:  ## Java, Maven, PostgreSQL: what `make demo` needs from the distribution
	$(PYTHON) -m devstack.system_packages demo

test-packages:  ## the same and Prometheus (promtool, the live dashboard test): for `make test`
	$(PYTHON) -m devstack.system_packages test

$(UV):
	$(PYTHON) -m devstack.system_packages venv
	$(PYTHON) -m venv .tools
	.tools/bin/pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)

# Rust comes from rustup, not from the distribution (Debian's is too old for native/).
$(VENV)/.synced: pyproject.toml uv.lock $(NATIVE) | $(UV)
	@command -v cargo >/dev/null || { echo "token-ledger: cargo not found: native/ is Rust; install it with rustup (https://rustup.rs), then run make again" >&2; exit 1; }
	# --compile-bytecode: every consumer a test or the benchmark starts would otherwise compile
	# its dependencies again (PYTHONDONTWRITEBYTECODE environments never cache them): ~1.2 s each.
	$(UV) sync --frozen --quiet --all-extras --compile-bytecode  # the consumer extra too
	touch $@

# helm and kubeconform (go install, pinned), compose-check (devstack/compose-check/) and the
# Kubernetes schemas kubeconform reads, into .tools/: each only when missing. Needs Go; without
# it, one line says what to install (devstack/deploy_tools.py).
deploy-tools: $(VENV)/.synced  ## what the chart and compose checks of `make test` run
	$(RUN)/python -m devstack.deploy_tools

jars: $(VENV)/.synced system-packages
	@$(RUN)/python -c 'from devstack.kafka import ensure_jars; print("kafka jars:", ensure_jars())'

services: setup  ## start Kafka (KRaft) + PostgreSQL in the background (state in .devstack/)
	$(RUN)/python -m devstack up

services-down:  ## stop them; leaves no process behind
	$(PYTHON) -m devstack down

status:
	$(PYTHON) -m devstack status

lint: $(VENV)/.synced
	$(RUN)/ruff check .
	$(RUN)/ruff format --check .
	cd native && cargo fmt --check && cargo clippy --release --quiet -- -D warnings

typecheck: $(VENV)/.synced
	$(RUN)/mypy

test: test-packages setup deploy-tools lint typecheck  ## lint, types, then every unit and integration test (starts its own services)
	$(RUN)/python -m compileall -q -j 0 consumer producer devstack tests  # see --compile-bytecode
	$(RUN)/pytest -n $(TEST_WORKERS) --dist loadfile

demo: services  ## everything on this machine: consumer + simulated traffic, checked against the simulator
	$(RUN)/python -m devstack.demo

bench: setup  ## the consumer end to end against the baseline commit, on its own services (--full: BENCH_ARGS=--full)
	$(RUN)/python -m bench $(BENCH_ARGS)

clean: services-down
	rm -rf .devstack .venv .tools

chaos: setup  ## three consumers under kills, restarts, rebalances and poison, reconciled exactly (SEED=n, SHORT=1)
	$(RUN)/python -m tests.chaos --seed $(SEED) $(if $(SHORT),--short) --out chaos-summary-$(SEED).json
