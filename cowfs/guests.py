"""Naming guests on the command line: a name under /var/lib/cowfs/guests, or a backing path."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from cowfs import registry
from cowfs.errors import CowfsError
from cowfs.paths import state_root
from cowfs.statedb import StateDB
from native import syscalls


@dataclass
class Guest:
    """A guest's backing tree and the name it is shown by."""

    name: str
    path: str


def guests_dir() -> Path:
    """Where the host layout keeps guests' backing trees."""
    return state_root() / "guests"


def resolve(spec: str) -> Guest:
    """The guest a command-line argument names: a path to a backing tree, or a guest name."""
    if "/" in spec or spec in (".", ".."):
        if not os.path.isdir(spec):
            raise CowfsError(f"guest {spec}: no such directory")
        path = os.path.realpath(spec)
        return Guest(Path(path).name, path)
    named = guests_dir() / spec
    if not named.is_dir():
        raise CowfsError(f"unknown guest {spec!r} (no directory {named}; give a path instead)")
    return Guest(spec, os.path.realpath(named))


def notify_mounts(guest: Guest) -> bool:
    """Tell a running mount of the guest to sync its books (SIGHUP); True if there is one.

    It then reloads limits and quotas and writes its usage counters and grace
    clocks to the state database.
    """
    told = False
    for record in registry.mounts_serving(guest.path):
        if record.pid > 0 and os.path.realpath(record.backing) == guest.path:
            with contextlib.suppress(ProcessLookupError):
                os.kill(record.pid, signal.SIGHUP)
                told = True
    return told


def fresh_usage(db: StateDB, guest_id: int, guest: Guest, timeout: float = 3.0) -> None:
    """Make a running mount of the guest write its live usage, and wait until it has."""
    asked = time.time()
    if not notify_mounts(guest):
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = db.usage(guest_id)
        if row is not None and row.updated >= asked:
            return
        time.sleep(0.02)


def _guest_database(guest: Guest, name: str) -> list[list[str]]:
    """Rows of the guest's own /etc/passwd or /etc/group (never the host's)."""
    root = os.open(guest.path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fd = syscalls.open_beneath(root, f"etc/{name}".encode(), os.O_RDONLY)
    except OSError:
        return []
    finally:
        os.close(root)
    with os.fdopen(fd, "r", errors="replace") as f:
        return [
            line.rstrip("\n").split(":") for line in f if line.strip() and not line.startswith("#")
        ]


def resolve_owner(guest: Guest, kind: str, spec: str) -> int:
    """A uid (kind "user") or gid ("group") named or numbered in the guest's own files."""
    table = "passwd" if kind == "user" else "group"
    for fields in _guest_database(guest, table):
        if len(fields) >= 3 and fields[2].isdigit() and spec in (fields[0], fields[2]):
            return int(fields[2])
    raise CowfsError(f"{kind} {spec!r}: unknown in guest {guest.name}'s /etc/{table}")


def owner_name(guest: Guest, kind: str, number: int) -> str:
    """The guest's name for a uid or gid, or the number."""
    table = "passwd" if kind == "user" else "group"
    for fields in _guest_database(guest, table):
        if len(fields) >= 3 and fields[2] == str(number):
            return fields[0]
    return str(number)


def all_guests(known_paths: list[tuple[str, str]]) -> list[Guest]:
    """Every guest under the host layout's guests/ plus those the database knows (name, path)."""
    found: dict[str, Guest] = {}
    directory = guests_dir()
    if directory.is_dir():
        for entry in sorted(directory.iterdir()):
            if entry.is_dir() and not entry.name.startswith("."):
                path = os.path.realpath(entry)
                found[path] = Guest(entry.name, path)
    for name, path in known_paths:
        if path not in found and os.path.isdir(path):
            found[path] = Guest(name, path)
    return list(found.values())
