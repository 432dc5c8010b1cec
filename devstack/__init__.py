"""Real Apache Kafka (KRaft) and PostgreSQL for machines without Docker.

Both services run as ordinary background processes, each with its own scratch directory
and log file. Used by `make services`, `make demo` and the test fixtures; stdlib only, so it
runs before (and without) the project's virtualenv.
"""
