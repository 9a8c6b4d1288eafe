"""What /proc/PID/stat says of a process: the one parser of it in contextd."""

from __future__ import annotations

import os


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state first), or None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            # The command name is in parentheses and may hold spaces and ")".
            return f.read().rpartition(")")[2].split()
    except (FileNotFoundError, ProcessLookupError):
        return None


def start_time(pid: int) -> int | None:
    """When the process started (clock ticks since boot): with the pid, a process's identity."""
    fields = _stat_fields(pid)
    try:
        return int(fields[19]) if fields else None
    except (IndexError, ValueError):
        return None


def is_alive(pid: int) -> bool:
    """True if the process exists and has not ended (a zombie waiting to be reaped has)."""
    fields = _stat_fields(pid)
    return bool(fields) and fields[0] not in ("Z", "X")  # type: ignore[index]


def is_running(pid: int, start: int) -> bool:
    """True if pid is still the process that started at start (not a recycled pid) and
    has not ended."""
    return pid > 0 and start_time(pid) == start and is_alive(pid)


def pidfd_of(pid: int, start: int | None = None) -> int | None:
    """A pidfd of process pid (checked to be the one that started at start, if given);
    None if it is gone or the pid is another process's now."""
    if pid <= 0:
        return None
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return None
    if start is not None and start_time(pid) != start:
        os.close(pidfd)
        return None
    return pidfd
