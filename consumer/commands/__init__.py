"""The operator commands that read Kafka and the ledger: verify, replay, dlq, usage."""
