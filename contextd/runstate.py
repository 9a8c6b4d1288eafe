"""What contextd records about a running guest: /run/contextd/guests/NAME.json.

A restarted contextd finds its running guests here and adopts them; init's
start time tells a live init from a recycled pid.
"""

from __future__ import annotations

import json
import signal
from dataclasses import asdict, dataclass, field
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
    supervisor_pid: int = 0  # its init's parent (contextd.supervisor), 0 if unknown
    supervisor_start: int = 0
    fuse_server_pid: int = 0  # its root's first FUSE server (reaped by us if it dies)
    # When contextd restarted it by itself lately (its restart policy), oldest first.
    restarts: list[float] = field(default_factory=list)


def state_dir() -> Path:
    """Where run states are kept."""
    return run_dir() / "guests"


def exit_record_path(name: str) -> Path:
    """Where a guest's supervisor records how its init ended (the last time it ran)."""
    return state_dir() / f"{name}.exit.json"


def root_server_record_path(name: str) -> Path:
    """Where a guest's supervisor notes the replacements of its root's FUSE server."""
    return state_dir() / f"{name}.rootserver.json"


def load_root_server_record(name: str) -> dict[str, object]:
    """What the guest's supervisor noted of its root's FUSE server (empty if nothing)."""
    try:
        record = json.loads(root_server_record_path(name).read_text())
    except (FileNotFoundError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def load_exit(name: str) -> dict[str, object] | None:
    """How the guest's init last ended, if recorded."""
    try:
        record = json.loads(exit_record_path(name).read_text())
    except (FileNotFoundError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def save_exit(name: str, record: dict[str, object]) -> None:
    """Record (again) how the guest last ended."""
    write_atomically(exit_record_path(name), json.dumps(record))


def is_failure(record: dict[str, object]) -> bool:
    """True if the guest ended by a fault, not by init's own choice to end well: its root
    lost, init killed, or an exit status other than 0."""
    if record.get("failure"):
        return True
    if record.get("stopped") or record.get("asked") in ("halt", "reboot"):
        return False
    return record.get("exit_status") != 0


def describe_exit(record: dict[str, object]) -> str:
    """One line: how the guest ended ("init exited with status 255", "init was killed by
    SIGKILL (out of memory)", "its cowfs server ended: ...")."""
    failure = record.get("failure")
    if failure:
        return str(failure)
    if record.get("stopped"):
        return f"stopped by contextd ({describe_init_end(record)})"
    if record.get("oom"):
        return describe_init_end(record) + " (out of memory)"
    return describe_init_end(record)


def describe_init_end(record: dict[str, object]) -> str:
    """One line: how init ended, from its wait status as the supervisor recorded it."""
    asked = record.get("asked")
    if asked in ("halt", "reboot"):
        return f"init asked for a {asked}"
    if record.get("signal"):
        try:
            name = signal.Signals(int(record["signal"])).name  # type: ignore[call-overload]
        except ValueError:
            name = f"signal {record['signal']}"
        return f"init was killed by {name}"
    return f"init exited with status {record.get('exit_status')}"


def load(name: str) -> RunState | None:
    """The recorded run state of a guest, if any."""
    try:
        return RunState(**json.loads((state_dir() / f"{name}.json").read_text()))
    except (FileNotFoundError, ValueError, TypeError):
        return None


def recorded() -> list[str]:
    """The names of the guests with a recorded run state."""
    directory = state_dir()
    if not directory.is_dir():
        return []
    others = (".exit.json", ".rootserver.json")  # records of its own beside the run state
    return sorted(p.stem for p in directory.glob("*.json") if not p.name.endswith(others))


def save(state: RunState) -> None:
    """Record a guest's run state (atomically)."""
    write_atomically(state_dir() / f"{state.name}.json", json.dumps(asdict(state)))


def drop(name: str) -> None:
    """Forget a guest's run state."""
    (state_dir() / f"{name}.json").unlink(missing_ok=True)


def is_running(state: RunState) -> bool:
    """True if the recorded init is still that process (not a recycled pid)."""
    return procfs.is_running(state.init_pid, state.init_start)
