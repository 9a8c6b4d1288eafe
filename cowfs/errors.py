"""The error type every cowfs command reports as a one-line message."""


class CowfsError(Exception):
    """A user-facing failure: the CLI prints it as one line and exits non-zero."""
