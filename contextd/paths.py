"""Where contextd keeps its socket, run state and logs (each overridable from the environment)."""

from __future__ import annotations

import os
from pathlib import Path


def run_dir() -> Path:
    """contextd's runtime directory (CONTEXTD_RUN_DIR overrides /run/contextd)."""
    return Path(os.environ.get("CONTEXTD_RUN_DIR", "/run/contextd"))


def log_dir() -> Path:
    """Where guests' console logs go (CONTEXTD_LOG_DIR overrides /var/log/contextd)."""
    return Path(os.environ.get("CONTEXTD_LOG_DIR", "/var/log/contextd"))


def socket_path() -> Path:
    """The control socket (CONTEXTD_SOCKET overrides /run/contextd/contextd.sock)."""
    return Path(os.environ.get("CONTEXTD_SOCKET", str(run_dir() / "contextd.sock")))
