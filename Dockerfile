# Slim, non-root image of the consumer and its CLI (`token-ledger`).
FROM python:3.11-slim AS build
ENV UV_COMPILE_BYTECODE=1 UV_LINK_MODE=copy UV_PYTHON_DOWNLOADS=never
# native/ is Rust: the toolchain from the official image, and a C linker for it.
COPY --from=rust:1.95-slim /usr/local/cargo /usr/local/cargo
COPY --from=rust:1.95-slim /usr/local/rustup /usr/local/rustup
ENV CARGO_HOME=/usr/local/cargo RUSTUP_HOME=/usr/local/rustup PATH=/usr/local/cargo/bin:$PATH
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
RUN pip install --no-cache-dir uv==0.13.8
WORKDIR /app
COPY pyproject.toml uv.lock README.md ./
COPY native ./native
RUN uv sync --frozen --no-dev --extra consumer --no-install-project
COPY producer ./producer
COPY consumer ./consumer
COPY migrations ./migrations
RUN uv sync --frozen --no-dev --extra consumer --no-editable

FROM python:3.11-slim
RUN useradd --system --uid 10001 --no-create-home ledger
COPY --from=build /app/.venv /app/.venv
ENV PATH=/app/.venv/bin:$PATH PYTHONUNBUFFERED=1
USER ledger
WORKDIR /tmp
EXPOSE 9464
HEALTHCHECK --interval=10s --timeout=5s --retries=6 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9464/healthz', timeout=4)"]
ENTRYPOINT ["token-ledger"]
CMD ["consume"]
