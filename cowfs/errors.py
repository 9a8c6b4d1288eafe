"""The error type every cowfs command reports as a one-line message."""

import os
import sys


class CowfsError(Exception):
    """A user-facing failure: the CLI prints it as one line and exits non-zero."""


def warn(message: str) -> None:
    """A one-line warning on standard error: the command goes on."""
    print(f"cowfs: warning: {message}", file=sys.stderr)


def require_directory(role: str, path: str) -> None:
    """A CowfsError naming role and path unless path is an existing directory."""
    if not os.path.lexists(path):
        raise CowfsError(f"{role} {path}: no such directory")
    if not os.path.isdir(path):
        raise CowfsError(f"{role} {path}: not a directory")
