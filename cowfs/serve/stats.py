"""What a mount's FUSE server has done, for monitoring: requests and errors by kind,
link breaks, reads answered from the page cache.

The server writes them to ``RUN_DIR/stats/KEY.json`` (KEY as in the mount's
record) at each book-keeping round (mount.SYNC_INTERVAL), so that a scrape
of contextd's metrics costs a file read, never a request to the server. The
counts start again from zero with each server (a successor's too), as a
Prometheus counter may.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

from cowfs.atomicfile import write_atomically
from cowfs.host import registry
from cowfs.host.paths import run_dir


class RequestCounts:
    """Requests a server answered, by kind, and those answered with an error."""

    def __init__(self) -> None:
        self.requests: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()


def stats_path(mountpoint: str) -> Path:
    return run_dir() / "stats" / f"{registry.mount_key(mountpoint)}.json"


def write(mountpoint: str, pid: int, counts: RequestCounts, **totals: int) -> None:
    """Publish a server's counts now."""
    write_atomically(
        stats_path(mountpoint),
        json.dumps(
            {
                "pid": pid,
                "written": time.time(),
                "requests": dict(counts.requests),
                "errors": dict(counts.errors),
                **totals,
            }
        ),
        mode=0o600,
    )


def read(mountpoint: str) -> dict[str, object]:
    """The counts a mount's server published last (empty if none)."""
    try:
        data = json.loads(stats_path(mountpoint).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def forget(mountpoint: str) -> None:
    stats_path(mountpoint).unlink(missing_ok=True)
