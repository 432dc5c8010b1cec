"""Billing: the usage revisions' CloudEvents and the outbox relay."""
