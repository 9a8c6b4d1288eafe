"""``cowfs clone``: a new guest tree whose files are COW-marked hard links to a template's.

Directories, symlinks, fifos, sockets and device nodes are recreated with the
template's owner, mode, timestamps and xattrs; regular files are marked and
hard-linked, so a clone costs one directory tree and no file data. The clone
is built under a hidden sibling name and renamed into place at the end: an
interrupted clone never leaves a half-made NEW behind.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field

from cowfs.errors import CowfsError, require_directory
from cowfs.host.barrier import make_private_dirs, refuse_reachable
from cowfs.host.statedb import usage_changed
from cowfs.host.treelock import refuse_mounted_nearby, tree_lock
from cowfs.tree.marks import fd_path, is_marked, is_reserved_name, set_mark
from cowfs.tree.metadata import copy_data, copy_metadata
from cowfs.tree.walk import open_dir_below, remove_tree, walk
from native import syscalls

_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_OPEN_PATH = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass
class CloneStats:
    """What a clone made."""

    directories: int = 0
    linked_files: int = 0
    linked_bytes: int = 0
    copied_files: int = 0  # the template inode had too many links (EMLINK)
    symlinks: int = 0
    special_files: int = 0
    entries: int = field(default=0)

    def as_dict(self) -> dict[str, int]:
        """The figures, for --json."""
        return dict(self.__dict__)


Progress = Callable[[CloneStats], None]


def check_clone_args(template: str, new: str, allow_reachable: bool = False) -> tuple[str, str]:
    """Validate TEMPLATE and NEW; their real paths, or a CowfsError saying what is wrong.

    NEW's missing parent directories are fine (clone makes them, mode 0700);
    both must be out of host users' reach (barrier.py) unless allow_reachable:
    a template's inodes become the clone's.
    """
    require_directory("template", template)
    if os.path.lexists(new):
        raise CowfsError(f"{new}: already exists")
    template_real = os.path.realpath(template)
    new_real = os.path.realpath(new)
    if new_real.startswith(template_real.rstrip("/") + "/"):
        raise CowfsError(f"{new}: lies inside the template {template}")
    existing = os.path.dirname(new_real)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise CowfsError(f"{new}: {existing} is not a directory")
    if os.stat(template_real).st_dev != os.stat(existing).st_dev:
        raise CowfsError(
            f"{new}: on another filesystem than the template {template} (hard links cannot cross)"
        )
    refuse_reachable("template", template, allow_reachable)
    refuse_reachable("destination", new, allow_reachable)
    refuse_mounted_nearby(template, "template")
    return template_real, new_real


def _link_file(src_dir: int, dst_dir: int, name: bytes, stats: CloneStats) -> None:
    src = os.open(name, _OPEN_PATH, dir_fd=src_dir)
    try:
        st = os.fstat(src)
        if not stat.S_ISREG(st.st_mode):
            raise CowfsError(f"{name!r} changed type during the clone")
        if not is_marked(src):
            set_mark(src)
        try:
            os.link(fd_path(src), name, dst_dir_fd=dst_dir, follow_symlinks=True)
            stats.linked_files += 1
            stats.linked_bytes += st.st_size
        except OSError as e:
            if e.errno != errno.EMLINK:
                raise
            _copy_file(src, dst_dir, name, st)
            stats.copied_files += 1
    finally:
        os.close(src)


def _copy_file(src_path_fd: int, dst_dir: int, name: bytes, st: os.stat_result) -> None:
    src = os.open(fd_path(src_path_fd), os.O_RDONLY | os.O_NOATIME | os.O_CLOEXEC)
    try:
        dst = os.open(
            name, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o600, dir_fd=dst_dir
        )
        try:
            copy_data(src, dst, st.st_size)
            copy_metadata(src_path_fd, dst, st)
        finally:
            os.close(dst)
    finally:
        os.close(src)


def _make_other(
    src_dir: int, dst_dir: int, name: bytes, st: os.stat_result, stats: CloneStats
) -> None:
    if stat.S_ISLNK(st.st_mode):
        os.symlink(os.readlink(name, dir_fd=src_dir), name, dir_fd=dst_dir)
        stats.symlinks += 1
    else:
        os.mknod(name, st.st_mode, st.st_rdev, dir_fd=dst_dir)
        stats.special_files += 1
    src = os.open(name, _OPEN_PATH, dir_fd=src_dir)
    dst = os.open(name, _OPEN_PATH, dir_fd=dst_dir)
    try:
        copy_metadata(src, dst, st)
    finally:
        os.close(src)
        os.close(dst)


def _not_reserved(path: bytes, name: bytes) -> bool:
    return not is_reserved_name(name)


def _clone_tree(src_root: int, dst_root: int, stats: CloneStats, progress: Progress | None) -> None:
    """Fill dst_root with the template tree under src_root (both O_RDONLY directory fds).

    The template is read as every guest tree is (cowfs.tree.walk: a fixed number
    of fds whatever its depth or width); each directory of the copy is opened
    by its path below dst_root, a tree this clone made.
    """
    for listing in walk(src_root, _not_reserved, leave=True):
        dst_dir = open_dir_below(dst_root, listing.path)
        try:
            if listing.leaving:
                copy_metadata(listing.fd, dst_dir, listing.st)  # last: children changed its mtime
                continue
            src_dir = listing.fd
            for entry in listing.entries:
                name = os.fsencode(entry.name)
                if is_reserved_name(name):
                    continue
                st = entry.stat(follow_symlinks=False)
                stats.entries += 1
                if stat.S_ISDIR(st.st_mode):
                    os.mkdir(name, 0o700, dir_fd=dst_dir)
                    stats.directories += 1
                elif stat.S_ISREG(st.st_mode):
                    _link_file(src_dir, dst_dir, name, stats)
                else:
                    _make_other(src_dir, dst_dir, name, st, stats)
                if progress is not None and stats.entries % 1000 == 0:
                    progress(stats)
        finally:
            os.close(dst_dir)


def _remove_stale_work_dirs(parent: str, base: str) -> None:
    """Remove what clones of the same NEW killed before the end left behind."""
    prefix = f".{base}.cowfs-clone-"
    for name in os.listdir(parent):
        if name.startswith(prefix) and name[len(prefix) :].isdigit():
            pid = int(name[len(prefix) :])
            if not os.path.exists(f"/proc/{pid}"):
                _remove_quietly(parent, name)


def _remove_quietly(parent: str, name: str) -> None:
    parent_fd = os.open(parent, _OPEN_DIR)
    try:
        remove_tree(parent_fd, os.fsencode(name))
    except OSError:
        pass  # tried again by the next clone to the same NEW
    finally:
        os.close(parent_fd)


def clone(
    template: str, new: str, progress: Progress | None = None, allow_reachable: bool = False
) -> CloneStats:
    """Make NEW a guest tree of COW-marked hard links to TEMPLATE's files; its statistics.

    The template is locked shared (treelock.py) for the whole clone, so that
    no mount, hashify or delete of it runs meanwhile; NEW is locked
    exclusively from the moment its directory exists until the clone ends.
    """
    template, new = check_clone_args(template, new, allow_reachable)
    with tree_lock(template, exclusive=False, role="template") as source:
        parent, base = os.path.split(new)
        make_private_dirs(parent)
        _remove_stale_work_dirs(parent, base)
        work = os.path.join(parent, f".{base}.cowfs-clone-{os.getpid()}")
        stats = CloneStats()
        try:
            os.mkdir(work, 0o700)
            with tree_lock(work, exclusive=True, role="new tree") as built:
                _clone_tree(source.fd, built.fd, stats, progress)
                os.fsync(built.fd)
                _rename_into_place(parent, work, base)
        except BaseException as e:
            _remove_quietly(parent, os.path.basename(work))
            if isinstance(e, OSError):
                raise CowfsError(f"clone of {template} failed: {e}") from None
            raise
        finally:
            usage_changed([template])  # its files are marked, and shared if the clone stays
    return stats


def _rename_into_place(parent: str, work: str, base: str) -> None:
    """Rename the finished work directory to NEW's name (never over anything), durably."""
    parent_fd = os.open(parent, _OPEN_DIR)
    try:
        syscalls.renameat2(
            parent_fd,
            os.fsencode(os.path.basename(work)),
            parent_fd,
            os.fsencode(base),
            syscalls.RENAME_NOREPLACE,
        )
        os.fsync(parent_fd)
    finally:
        os.close(parent_fd)
