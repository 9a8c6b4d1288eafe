"""Phase 1: the candidate inodes of the guests, and the one check that a file is still as scanned.

Every guest is walked from its locked root fd (cowfs.tree.walk: bounded fds,
no symlink followed) for the regular files the include/exclude rules allow;
each inode is kept once, by (dev, ino), with every name of it the walk found.
Names of the store's own inodes (already unified) cost one stat. Every later
step that acts on a file first checks that it is still what the scan saw:
``Inode.unchanged_since_scan``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Container
from dataclasses import dataclass, field

from cowfs.tree.marks import is_reserved_name
from cowfs.tree.walk import open_below, open_dir_below, walk
from cowfs.unify.excludes import Rules
from cowfs.unify.hashify.report import HashifyReport, Progress

Key = tuple[int, int]  # (st_dev, st_ino)
# How long before this run's first rename of an inode's name a ctime may be
# that rename's own: the filesystem's clock is coarser than time.time_ns().
_CLOCK_SLACK_NS = 10_000_000


@dataclass(slots=True)
class FileRef:
    """One name of a candidate file: which guest, which directory, which name."""

    guest: int
    directory: bytes  # guest-absolute, b"" for the root
    name: bytes

    @property
    def path(self) -> bytes:
        """Guest-absolute path."""
        return self.directory + b"/" + self.name


@dataclass(slots=True)
class Inode:
    """A candidate inode, with every name of it the scan found, and what hashing found of it."""

    st: os.stat_result
    refs: list[FileRef] = field(default_factory=list)
    marked: bool = False
    xattrs: dict[bytes, bytes] | None = None
    content_hash: str | None = None

    def unchanged_since_scan(self, now: os.stat_result, touched_at: int | None = None) -> bool:
        """True if now, a stat of a name of this inode just taken, shows it as the scan saw it.

        now: an os.stat_result, or a FileProbe's result (native.syscalls: its
        fields are named the same).

        The same inode, size, mtime, mode and owner, and the same ctime: any
        change of content, metadata, extended attributes or links moves it.
        touched_at: when this run first renamed one of the inode's names away
        (time.time_ns()); dropping a link moves the ctime, so from then on a
        later ctime is taken as this run's own.
        """
        was = self.st
        if (now.st_ino, now.st_size, now.st_mtime_ns, now.st_mode, now.st_uid, now.st_gid) != (
            was.st_ino,
            was.st_size,
            was.st_mtime_ns,
            was.st_mode,
            was.st_uid,
            was.st_gid,
        ):
            return False
        if now.st_ctime_ns == was.st_ctime_ns:
            return True
        return touched_at is not None and now.st_ctime_ns >= touched_at - _CLOCK_SLACK_NS


@dataclass(frozen=True)
class Roots:
    """The guests of a run: their real paths (for messages) and locked root fds, by index."""

    paths: list[str]
    fds: list[int]

    def display(self, ref: FileRef) -> str:
        """The host path of a name, for the report."""
        return self.paths[ref.guest] + os.fsdecode(ref.path)

    def open_dir(self, guest: int, directory: bytes) -> int:
        """A directory fd (O_RDONLY) on a guest's directory (b"" for its root), nothing followed."""
        return open_dir_below(self.fds[guest], directory)

    def open_file(self, ref: FileRef, flags: int) -> int:
        """An fd on a name, opened with flags beneath its guest's root, nothing followed."""
        return open_below(self.fds[ref.guest], ref.path, flags | os.O_NOFOLLOW)


@dataclass
class Scan:
    """What the scan found."""

    inodes: dict[Key, Inode] = field(default_factory=dict)
    # (guest, directory, name) of each temporary a killed run left behind
    leftovers: list[tuple[int, bytes, bytes]] = field(default_factory=list)


def scan(
    roots: Roots,
    rules: Rules,
    min_size: int,
    store_inodes: Container[Key],
    report: HashifyReport,
    progress: Progress | None,
) -> Scan:
    """Every regular file of min_size bytes or more that rules include, not in store_inodes."""
    found = Scan()
    inodes = found.inodes

    def descend(path: bytes, name: bytes) -> bool:
        return not is_reserved_name(name) and rules.may_descend(path)

    for guest, root_fd in enumerate(roots.fds):
        unreadable = _reporter(roots.paths[guest], report)
        for listing in walk(root_fd, descend, on_error=unreadable):
            directory = listing.path
            for entry in listing.entries:
                name = os.fsencode(entry.name)
                path = directory + b"/" + name
                if is_reserved_name(name):
                    found.leftovers.append((guest, directory, name))
                elif entry.is_file(follow_symlinks=False) and rules.included(path):
                    st = entry.stat(follow_symlinks=False)
                    report.files_scanned += 1
                    report.bytes_scanned += st.st_size
                    if st.st_size < min_size:
                        continue
                    key = (st.st_dev, st.st_ino)
                    if key in store_inodes:
                        report.already_unified += 1
                        continue
                    inode = inodes.get(key)
                    if inode is None:
                        inode = inodes[key] = Inode(st)
                    inode.refs.append(FileRef(guest, directory, name))
            if progress is not None:
                progress("scanning", report)
    return found


def _reporter(root: str, report: HashifyReport) -> Callable[[bytes, OSError], None]:
    """The walk's on_error for a guest: a directory it cannot read goes into the report."""

    def unreadable(path: bytes, error: OSError) -> None:
        report.errors.append(f"{root}{os.fsdecode(path)}: {error.strerror}")

    return unreadable
