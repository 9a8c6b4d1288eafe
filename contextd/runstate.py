"""What contextd records about a running guest: /run/contextd/guests/NAME.json.

A restarted contextd finds its running guests here and adopts them; init's
start time tells a live init from a recycled pid.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from contextd import procfs
from contextd.paths import run_dir
from cowfs.atomicfile import write_atomically


@dataclass
class RunState:
    """What contextd records about a running guest."""

    name: str
    xid: int
    init_pid: int
    init_start: int  # /proc/PID/stat start time: a recycled pid is not the guest's init
    mountpoint: str
    root: str
    started: float
    console_log: str


def state_dir() -> Path:
    """Where run states are kept."""
    return run_dir() / "guests"


def load(name: str) -> RunState | None:
    """The recorded run state of a guest, if any."""
    try:
        return RunState(**json.loads((state_dir() / f"{name}.json").read_text()))
    except (FileNotFoundError, ValueError, TypeError):
        return None


def recorded() -> list[str]:
    """The names of the guests with a recorded run state."""
    directory = state_dir()
    return sorted(p.stem for p in directory.glob("*.json")) if directory.is_dir() else []


def save(state: RunState) -> None:
    """Record a guest's run state (atomically)."""
    write_atomically(state_dir() / f"{state.name}.json", json.dumps(asdict(state)))


def drop(name: str) -> None:
    """Forget a guest's run state."""
    (state_dir() / f"{name}.json").unlink(missing_ok=True)


def is_running(state: RunState) -> bool:
    """True if the recorded init is still that process (not a recycled pid)."""
    start = procfs.start_time(state.init_pid)
    return start is not None and start == state.init_start and procfs.is_alive(state.init_pid)
