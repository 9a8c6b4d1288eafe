"""Crash recovery for a backing tree: the dirty mark and the sweep of leftovers.

A mount sets ``trusted.cowfs.dirty`` on the backing root and removes it when
it ends cleanly. Finding it at the next mount means the last FUSE process
died (kill -9, power cut): any hidden temporary a link break left behind is
removed before the guest sees the tree again. The guest never saw them:
the FUSE layer hides reserved names.
"""

from __future__ import annotations

import errno
import logging
import os

from cowfs.marks import DIRTY_MARK, fd_path, is_reserved_name

log = logging.getLogger(__name__)


def is_dirty(root_fd: int) -> bool:
    """True if the last mount of this backing tree did not end cleanly."""
    try:
        os.getxattr(fd_path(root_fd), DIRTY_MARK)
    except OSError as e:
        if e.errno == errno.ENODATA:
            return False
        raise
    return True


def mark_dirty(root_fd: int) -> None:
    """Record that a mount of this backing tree is live."""
    os.setxattr(fd_path(root_fd), DIRTY_MARK, b"1")


def mark_clean(root_fd: int) -> None:
    """Record that the mount ended cleanly."""
    try:
        os.removexattr(fd_path(root_fd), DIRTY_MARK)
    except OSError as e:
        if e.errno != errno.ENODATA:
            raise


def sweep_leftovers(root_fd: int) -> int:
    """Remove cowfs temporaries anywhere under the backing root; returns how many.

    Walks with directory fds and never follows symlinks, like every other
    access to a guest tree.
    """
    removed = 0
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    pending = [os.open(fd_path(root_fd), flags & ~os.O_NOFOLLOW)]  # follow the magic link only
    while pending:
        dir_fd = pending.pop()
        try:
            with os.scandir(dir_fd) as listing:
                entries = [(os.fsencode(e.name), e.is_dir(follow_symlinks=False)) for e in listing]
            for name, is_dir in entries:
                if is_dir:
                    try:
                        pending.append(os.open(name, flags, dir_fd=dir_fd))
                    except OSError as e:
                        log.warning("sweep: cannot enter %r: %s", name, e.strerror)
                elif is_reserved_name(name):
                    os.unlink(name, dir_fd=dir_fd)
                    removed += 1
                    log.info("removed leftover %r", name)
        finally:
            os.close(dir_fd)
    return removed
