"""Naming guests on the command line: a name under /var/lib/cowfs/guests, or a backing path."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from cowfs.errors import CowfsError
from cowfs.host import registry
from cowfs.host.paths import state_root
from cowfs.host.statedb import LimitRow, StateDB
from cowfs.tree.walk import read_regular


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


class _Keep:
    """What a limit left out of set_disk_limits keeps: its stored value."""


KEEP = _Keep()


def set_disk_limits(
    guest: Guest,
    space: int | _Keep | None = KEEP,
    inodes: int | _Keep | None = KEEP,
    reserved_percent: float | _Keep = KEEP,
) -> LimitRow:
    """Set a guest's disk limits (None: unlimited; KEEP: as stored); the limits now.

    The one way limits are set, for `cowfs limit set` and contextd's guest
    configurations alike: a running mount applies them at once.
    """
    db = StateDB()
    try:
        row = db.guest(guest.path, guest.name)
        assert row is not None
        limits = db.limits(row.id)
        if not isinstance(space, _Keep):
            limits.space = space
        if not isinstance(inodes, _Keep):
            limits.inodes = inodes
        if not isinstance(reserved_percent, _Keep):
            limits.reserved_percent = reserved_percent
        db.set_limits(row.id, limits)
    finally:
        db.close()
    notify_mounts(guest)
    return limits


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


# A guest's /etc/passwd or /etc/group larger than this is not read (ids show as numbers).
_DATABASE_LIMIT = 8 << 20


@dataclass
class OwnerNames:
    """A guest's own names for its uids and gids (its /etc/passwd and /etc/group, never the host's).

    A file that is not a regular file inside the guest (a FIFO, a symlink, a
    directory, one over 8 MiB) is not read: problems says why, and its ids
    have no names.
    """

    names: dict[str, dict[int, str]]  # "user" / "group" -> id -> name
    problems: list[str]

    @classmethod
    def read(cls, guest: Guest) -> OwnerNames:
        """The guest's tables as they are now."""
        names: dict[str, dict[int, str]] = {"user": {}, "group": {}}
        problems: list[str] = []
        root = os.open(guest.path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for kind, table in (("user", "passwd"), ("group", "group")):
                try:
                    data = read_regular(root, f"/etc/{table}".encode(), _DATABASE_LIMIT)
                except FileNotFoundError:
                    continue
                except OSError as e:
                    problems.append(f"guest {guest.name}: /etc/{table} not read: {e.strerror}")
                    continue
                for line in data.decode("utf-8", "replace").splitlines():
                    fields = line.split(":")
                    if line.startswith("#") or len(fields) < 3 or not fields[2].isdigit():
                        continue
                    names[kind].setdefault(int(fields[2]), fields[0])
        finally:
            os.close(root)
        return cls(names, problems)

    def name(self, kind: str, number: int) -> str:
        """The guest's name for a uid (kind "user") or gid ("group"), or the number."""
        return self.names[kind].get(number, str(number))

    def number(self, kind: str, spec: str) -> int | None:
        """The id a name or number stands for, if the guest's table lists it."""
        table = self.names[kind]
        if spec.isdigit() and int(spec) in table:
            return int(spec)
        return next((number for number, name in table.items() if name == spec), None)


def resolve_owner(guest: Guest, kind: str, spec: str) -> int:
    """A uid (kind "user") or gid ("group") named or numbered in the guest's own files."""
    names = OwnerNames.read(guest)
    number = names.number(kind, spec)
    if number is None:
        table = "passwd" if kind == "user" else "group"
        why = "".join(f" ({p})" for p in names.problems if f"/etc/{table} " in p)
        raise CowfsError(f"{kind} {spec!r}: unknown in guest {guest.name}'s /etc/{table}{why}")
    return number


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
