"""Errors devstack reports to a person: each says what failed and what to do about it."""


class DevstackError(RuntimeError):
    """A service could not be prepared or started; the message is meant for the terminal."""
