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

from cowfs.tree.marks import DIRTY_MARK, fd_path, is_reserved_name, remove_xattr
from cowfs.tree.walk import walk

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
    remove_xattr(root_fd, DIRTY_MARK)


def sweep_leftovers(root_fd: int) -> int:
    """Remove cowfs temporaries anywhere under the backing root; returns how many.

    Walks as every host-side reader of a guest tree does (guesttree.walk):
    directory fds, a fixed number of them, never following symlinks.
    """
    removed = 0

    def unreadable(path: bytes, error: OSError) -> None:
        log.warning("sweep: cannot enter %r: %s", path, error.strerror)

    for listing in walk(root_fd, on_error=unreadable):
        for entry in listing.entries:
            name = os.fsencode(entry.name)
            if is_reserved_name(name) and not entry.is_dir(follow_symlinks=False):
                os.unlink(name, dir_fd=listing.fd)
                removed += 1
                log.info("removed leftover %r", listing.path + b"/" + name)
    return removed
