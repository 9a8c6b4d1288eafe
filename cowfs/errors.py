"""The error type every cowfs command reports as a one-line message."""

import sys


class CowfsError(Exception):
    """A user-facing failure: the CLI prints it as one line and exits non-zero."""


def warn(message: str) -> None:
    """A one-line warning on standard error: the command goes on."""
    print(f"cowfs: warning: {message}", file=sys.stderr)
