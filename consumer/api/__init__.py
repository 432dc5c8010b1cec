"""The usage API, `token-ledger serve`: a read-only HTTP service over the ledger's usage
(docs/operations.md#the-usage-api). app.py assembles it, routes.py answers, queries.py turns a
request into the billing report's SQL (consumer/commands/queries.py), keys.py makes and checks
API keys, metrics.py counts requests, serve.py runs it under uvicorn."""
