"""One lock per guest tree: nothing starts sharing a tree's inodes while something may write them.

Why: a process that opened a file for writing through a mount keeps a
handle on that backing inode. If ``cowfs clone`` then links the inode into
a new guest (or ``cowfs hashify`` into the store and other guests), every
later write through the old handle lands in the now-shared inode, in every
guest at once: the COW mark is checked when a file is opened, not on each
write. So mounting a tree, cloning it, hashifying it and deleting it exclude
each other:

* exclusive: a mount (held by the FUSE server for the mount's whole life),
  a hashify run (each guest, for the run), a delete, and a clone's new tree
  while it is built;
* shared: a clone's template (clones of one template may run side by side).

The lock is ``flock(2)`` on an fd of the tree's root directory, opened
``O_DIRECTORY | O_NOFOLLOW``: it belongs to the inode, so it survives a
rename of the tree (a clone's new tree is built under a hidden name); the
kernel drops it when the last fd of the holder closes, so a ``kill -9``
never leaves a stale lock; a fork shares it, so the FUSE server forked by
``cowfs mount`` keeps the lock the mount command took. Locks are taken
without waiting: a tree in use is refused at once, naming the holder when
it can (the mount registry, else ``/proc/locks``).

Only a tree's root is locked: a mount of a directory inside another tree is
caught by the mount registry's checks (registry.mounts_serving), not here.
"""

from __future__ import annotations

import fcntl
import os
from types import TracebackType

from cowfs.errors import CowfsError
from cowfs.host import registry
from cowfs.tree.walk import remove_below

_MAX_COMMAND = 300  # characters of a holder's command line an error shows
_OPEN_ROOT = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class TreeBusy(CowfsError):
    """The tree is locked by a mount or another cowfs command."""


class TreeLock:
    """A held lock on one tree: the locked fd of its root (usable as a directory fd)."""

    def __init__(self, path: str, fd: int, exclusive: bool):
        self.path = path
        self.fd = fd
        self.exclusive = exclusive

    def release(self) -> None:
        """Close this process's fd of the lock (a forked copy, as a FUSE server's, keeps it held).

        Never LOCK_UN: that would drop the lock for every process sharing it.
        """
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> TreeLock:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()


def tree_lock(path: str, exclusive: bool, role: str = "guest tree") -> TreeLock:
    """Lock the tree rooted at path without waiting; a TreeBusy naming the holder if in use.

    role names the tree in the error ("template", "backing tree"). Use it as
    ``with tree_lock(path, exclusive=True) as lock: ...``, or keep the
    TreeLock and release() it when done.
    """
    real = os.path.realpath(path)
    try:
        fd = os.open(real, _OPEN_ROOT)
    except OSError as e:
        raise CowfsError(f"{role} {path}: {e.strerror}") from None
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        holder, advice = _holder(real, fd)
        os.close(fd)
        raise TreeBusy(f"{role} {path}: in use ({holder}); {advice}") from None
    except BaseException:
        os.close(fd)
        raise
    return TreeLock(real, fd, exclusive)


def refuse_mounted_nearby(path: str, role: str = "guest tree") -> None:
    """A TreeBusy if a cowfs mount serves a tree inside path or one path lies in.

    The lock covers a tree's root only; a clone or hashify of a directory
    that holds a mounted guest (or lies in one) would share that guest's
    inodes all the same.
    """
    real = os.path.realpath(path)
    for record in registry.mounts_serving(real):
        if os.path.realpath(record.backing) != real:
            raise TreeBusy(
                f"{role} {path}: in use ({record.backing} is mounted at {record.mountpoint});"
                " unmount it first"
            )


def _holder(real: str, fd: int) -> tuple[str, str]:
    """Who holds the tree's lock, as far as can be told, and what to do about it."""
    for record in registry.mounts_serving(real):
        if os.path.realpath(record.backing) == real:
            return f"mounted at {record.mountpoint}, pid {record.pid}", "unmount it first"
    for pid in _lock_holders(fd):
        command = _command_line(pid)
        if command:
            return f"by pid {pid}: {command}", "wait for it to end, or stop it"
    return "by another cowfs command or a mount", "wait for it to end, or unmount it"


def _lock_holders(fd: int) -> list[int]:
    """Pids /proc/locks shows holding a flock on fd's inode (the process that took it)."""
    st = os.fstat(fd)
    wanted = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    pids = []
    try:
        with open("/proc/locks") as f:
            for line in f:
                fields = line.split()
                # "1: FLOCK  ADVISORY  WRITE 4242 fe:00:260072 0 EOF"; blocked waiters have "->"
                if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == wanted:
                    pids.append(int(fields[4]))
    except (OSError, ValueError):
        return []
    return pids


def _command_line(pid: int) -> str:
    """A process's command line, for a message ("" if it has ended)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().rstrip(b"\0").split(b"\0")
    except OSError:
        return ""
    line = " ".join(os.fsdecode(a) for a in argv)
    return line if len(line) <= _MAX_COMMAND else line[:_MAX_COMMAND] + " ..."


def remove_tree(path: str) -> None:
    """Delete the guest tree at path under its exclusive lock; refused if it is in use.

    For ``contextd delete --remove-root``: a tree that is mounted, cloned or
    hashified is not removed from under it. A CowfsError says why it was not.
    A path that is itself a symlink is refused: the tree it names may be a
    template or another guest's (a symlinked parent directory is followed).
    """
    if os.path.islink(path):
        raise CowfsError(
            f"guest tree {path}: a symlink (to {os.readlink(path)}); not removed:"
            " remove the tree it names yourself if that is meant"
        )
    with tree_lock(path, exclusive=True) as lock:
        st, now = os.fstat(lock.fd), os.stat(lock.path, follow_symlinks=False)
        if (st.st_dev, st.st_ino) != (now.st_dev, now.st_ino):
            raise CowfsError(f"guest tree {path}: replaced while being locked; not removed")
        try:
            remove_below(lock.fd)  # any shape of tree, in a fixed number of fds
            os.rmdir(lock.path)
        except OSError as e:
            raise CowfsError(f"guest tree {path}: removal failed: {e}") from None
