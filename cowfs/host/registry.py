"""Records of live cowfs mounts: which process serves which backing tree where.

One JSON file per mount under the run directory, written by the FUSE process
once it serves and removed when it exits. ``/proc/self/mountinfo`` stays the
authority on what is mounted; the record adds the pid and the backing tree.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from cowfs.atomicfile import write_atomically
from cowfs.host.paths import run_dir

FSTYPE = "fuse.cowfs"


@dataclass
class MountRecord:
    """A live mount: mountpoint, backing tree, serving pid, log file, context id."""

    mountpoint: str
    backing: str
    pid: int
    log: str
    xid: int | None = None
    session_fd: int = -1  # the server's /dev/fuse fd (a supervisor keeps a copy: resume.py)
    shared: bool = False  # the server serves other mounts too (host.py): never kill it for one


def mount_key(mountpoint: str) -> str:
    """A mount's name in the run directory's records."""
    # Imported here: loading OpenSSL's hashes costs every command that only
    # reads the records (hashify checks them first) ~2 ms.
    import hashlib

    return hashlib.sha256(mountpoint.encode()).hexdigest()[:16]


def _record_path(mountpoint: str) -> Path:
    return run_dir() / "mounts" / f"{mount_key(mountpoint)}.json"


def write_record(record: MountRecord) -> None:
    """Publish a mount's record (atomically)."""
    write_atomically(_record_path(record.mountpoint), json.dumps(asdict(record)))


def remove_record(mountpoint: str) -> None:
    """Withdraw a mount's record."""
    _record_path(mountpoint).unlink(missing_ok=True)


def read_record(mountpoint: str) -> MountRecord | None:
    """The record of the mount at mountpoint, if any."""
    try:
        return MountRecord(**json.loads(_record_path(mountpoint).read_text()))
    except (FileNotFoundError, ValueError, TypeError):
        return None


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as octal.
    return (
        field.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
    )


def mounted_points() -> dict[str, str]:
    """Every mountpoint of this mount namespace, mapped to its filesystem type."""
    result: dict[str, str] = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            result[_unescape(left.split()[4])] = right.split()[0]
    return result


def device_of(mountpoint: str) -> str:
    """The "major:minor" of the filesystem mounted at mountpoint (from mountinfo, no stat)."""
    device = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if _unescape(fields[4]) == mountpoint:
                device = fields[2]  # the last one listed is on top
    if device is None:
        raise FileNotFoundError(f"nothing mounted at {mountpoint}")
    return device


def filesystem_of(dev: int) -> tuple[str, set[str]] | None:
    """(type, superblock options) of the mounted filesystem whose st_dev is dev, if any."""
    wanted = f"{os.major(dev)}:{os.minor(dev)}"
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            if left.split()[2] == wanted:
                fstype, _source, *options = right.split()
                return fstype, set(options[0].split(",")) if options else set()
    return None


def cowfs_mounts() -> list[MountRecord]:
    """Live cowfs mounts of this namespace, with their records where they have one."""
    records = []
    for point, fstype in mounted_points().items():
        if fstype == FSTYPE:
            record = read_record(point) or MountRecord(point, "", 0, "")
            records.append(record)
    return records


def mounts_serving(backing: str) -> list[MountRecord]:
    """Live cowfs mounts whose backing tree is backing or contains it or lies inside it."""
    target = os.path.realpath(backing)
    found = []
    for record in cowfs_mounts():
        if not record.backing:
            continue
        served = os.path.realpath(record.backing)
        if (
            target == served
            or target.startswith(served.rstrip("/") + "/")
            or served.startswith(target.rstrip("/") + "/")
        ):
            found.append(record)
    return found
