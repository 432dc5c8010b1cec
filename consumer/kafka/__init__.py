"""The Kafka loop in SinkTask verbs, with its checkpoints, retries and dead letters."""
