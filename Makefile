# token-ledger: `make demo` and `make test` are the two commands a newcomer needs.
SHELL := /bin/bash
PYTHON ?= python3
UV_VERSION := 0.13.8
UV := .tools/bin/uv
VENV := .venv
RUN := $(VENV)/bin

.PHONY: setup jars services services-down status lint typecheck test demo bench clean

setup: $(VENV)/.synced jars  ## Python env from the lock file + the Kafka broker jars

$(UV):
	$(PYTHON) -m venv .tools
	.tools/bin/pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)

$(VENV)/.synced: pyproject.toml uv.lock | $(UV)
	$(UV) sync --frozen --quiet --all-extras  # the consumer extra too: the service, its CLI, the tests
	touch $@

jars: $(VENV)/.synced
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

typecheck: $(VENV)/.synced
	$(RUN)/mypy

test: setup lint typecheck  ## lint, types, then every unit and integration test (starts its own services)
	$(RUN)/pytest

demo: services  ## everything on this machine: consumer + simulated traffic, checked against the simulator
	$(RUN)/python -m devstack.demo

bench: services  ## batch writer throughput by batch size, as ratios against one transaction per event
	set -a && . .devstack/ledger.env && set +a && $(RUN)/python -m bench.ledger_apply

clean: services-down
	rm -rf .devstack .venv .tools
