"""Realistic test traffic for `token-ledger simulate`, and what the ledger must hold after it."""
