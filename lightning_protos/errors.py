"""Errors raised for bad input; the CLI prints them as one line before any training."""


class ProtosError(ValueError):
    """A bad argument, data set or shape; its message is one line."""
