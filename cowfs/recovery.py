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
import stat

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
    for _dirpath, dirnames, filenames, dir_fd in os.fwalk(
        fd_path(root_fd), follow_symlinks=False
    ):
        for name in [*filenames, *dirnames]:
            raw = os.fsencode(name)
            if not is_reserved_name(raw):
                continue
            st = os.stat(raw, dir_fd=dir_fd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                continue  # cowfs never makes hidden directories: not ours to remove
            os.unlink(raw, dir_fd=dir_fd)
            removed += 1
            log.info("removed leftover %s", raw)
    return removed
