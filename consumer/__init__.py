"""token-ledger's consumer: Kafka turn events into an exact PostgreSQL ledger.

One direction of flow (docs/design.md#the-flow): record -> decode (producer/decoding.py) ->
reduce the batch (ledger/merge.py) -> one transaction, rows and offsets (ledger/batch.py) ->
mirror the offsets (kafka/checkpoint.py) -> metrics (http/metrics.py).

Packages, each with one job:
- kafka/     the Kafka loop in SinkTask verbs, assembled and opened in one place, with its
             checkpoints, lag, dead letters, paused fetching and broker outages
- ledger/    the batch transaction: the pure merge rules (claims, merge, rebuild), the SQL
             (state, store, offsets, database), the schema check and the migrations
- commands/  the operator commands that read Kafka and the ledger: verify, replay, dlq, usage
- billing/   the billing stream: a revision's CloudEvent and the outbox relay
- http/      /metrics, /healthz, /readyz, the bounded server behind them, the metrics
- simulate/  realistic seeded traffic for `token-ledger simulate`, and the ledger it must give

At the top: the command line (entry, cli, service: what `consume` and `relay` build and run),
settings, logs, failures (exit codes), and at the bottom, imported by every layer and importing
none: status (readiness, outages), retry (policy), errors (the taxonomy).
"""
