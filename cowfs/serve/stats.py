"""What a mount's FUSE server has done, for monitoring: requests, errors and the time
they took by kind, link breaks, reads answered from the page cache.

The server writes them to ``RUN_DIR/stats/KEY.json`` (KEY as in the mount's
record) at each book-keeping round (mount.SYNC_INTERVAL), so that a scrape
of contextd's metrics costs a file read, never a request to the server. The
counts start again from zero with each server (a successor's too), as a
Prometheus counter may.
"""

from __future__ import annotations

import bisect
import json
import time
from collections import Counter, defaultdict
from pathlib import Path

from cowfs.atomicfile import write_atomically
from cowfs.host import registry
from cowfs.host.paths import run_dir

# Upper bounds in seconds of the request-duration histogram's buckets (+Inf after them).
DURATION_BOUNDS = (0.0001, 0.001, 0.01, 0.1, 1.0)


class RequestCounts:
    """Requests a server answered, by kind, those answered with an error, and how long
    they took from their handler's start to its answer (waits for the disk or a
    thread included; time queued in the kernel before, not), as a histogram."""

    def __init__(self) -> None:
        self.requests: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.seconds: defaultdict[str, float] = defaultdict(float)
        self.buckets: dict[str, list[int]] = {}  # per kind, one count per bound and +Inf

    def took(self, kind: str, seconds: float) -> None:
        self.seconds[kind] += seconds
        buckets = self.buckets.get(kind)
        if buckets is None:
            buckets = self.buckets[kind] = [0] * (len(DURATION_BOUNDS) + 1)
        buckets[bisect.bisect_left(DURATION_BOUNDS, seconds)] += 1

    def durations(self) -> dict[str, dict[str, object]]:
        return {
            kind: {"sum": self.seconds[kind], "buckets": list(counts)}
            for kind, counts in self.buckets.items()
        }


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
                "durations": counts.durations(),
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
