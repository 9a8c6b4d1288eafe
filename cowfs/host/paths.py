"""Where cowfs keeps things on the host (docs/design.md, "Host layout"), all overridable."""

from __future__ import annotations

import os
from pathlib import Path

from cowfs.host.barrier import secure_host_layout, secure_private_dir

_secured: set[Path] = set()


def state_root() -> Path:
    """The host layout's root: store/, guests/, state.db (COWFS_ROOT overrides /var/lib/cowfs).

    Every use of the layout goes through here, so the first call in a process
    makes sure the layout is root-only (barrier.secure_host_layout): created
    so, and repaired if someone opened it since.
    """
    root = Path(os.environ.get("COWFS_ROOT", "/var/lib/cowfs"))
    if root not in _secured:
        secure_host_layout(root)
        _secured.add(root)
    return root


def run_dir() -> Path:
    """Runtime records of live mounts and their session journals (COWFS_RUN_DIR overrides
    /run/cowfs); root's alone (barrier.secure_private_dir), like the layout."""
    return _private(Path(os.environ.get("COWFS_RUN_DIR", "/run/cowfs")))


def log_dir() -> Path:
    """Where mount daemons write their logs (COWFS_LOG_DIR overrides /var/log/cowfs); root's
    alone: they name guests' files."""
    return _private(Path(os.environ.get("COWFS_LOG_DIR", "/var/log/cowfs")))


def _private(directory: Path) -> Path:
    if directory not in _secured:
        repairs = secure_private_dir(directory)
        if repairs:
            import logging

            logging.getLogger(__name__).warning("made private: %s", "; ".join(repairs))
        _secured.add(directory)
    return directory
