"""Where contextd keeps its socket, run state and logs (each overridable from the environment)."""

from __future__ import annotations

import os
from pathlib import Path

from cowfs.host.barrier import secure_private_dir

_secured: set[Path] = set()


def run_dir() -> Path:
    """contextd's runtime directory (CONTEXTD_RUN_DIR overrides /run/contextd); root's alone:
    its records hold the last lines of guests' consoles."""
    return _private(Path(os.environ.get("CONTEXTD_RUN_DIR", "/run/contextd")))


def log_dir() -> Path:
    """Where guests' console logs go (CONTEXTD_LOG_DIR overrides /var/log/contextd); root's
    alone."""
    return _private(Path(os.environ.get("CONTEXTD_LOG_DIR", "/var/log/contextd")))


def _private(directory: Path) -> Path:
    if directory not in _secured:
        secure_private_dir(directory)
        _secured.add(directory)
    return directory


def socket_path() -> Path:
    """The control socket (CONTEXTD_SOCKET overrides /run/contextd/contextd.sock)."""
    # (not through run_dir(): a client only looks, the daemon makes the directory)
    default = Path(os.environ.get("CONTEXTD_RUN_DIR", "/run/contextd")) / "contextd.sock"
    return Path(os.environ.get("CONTEXTD_SOCKET", str(default)))
