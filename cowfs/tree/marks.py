"""The COW mark and the names cowfs reserves for itself.

A backing inode that carries ``trusted.cowfs.cow`` is shared (with a template,
other guests or the content store): it is never modified in place through a
mount. Every hard link shares the inode and hence the mark. ``trusted.*``
attributes need CAP_SYS_ADMIN, and the FUSE layer hides and refuses every
``trusted.cowfs.*`` name, so a guest can neither see nor forge the mark.

The mark's value says whether the content store holds one of the inode's
links (``s``, set before hashify links it there) or not (``1``, clone's): the
store's link is nobody's, so accounting must not count it as another guest's.
"""

from __future__ import annotations

import errno
import os

XATTR_PREFIX = b"trusted.cowfs."
COW_MARK = b"trusted.cowfs.cow"
# Set on the backing root while a mount is live; found at the next mount it
# means the last one did not end cleanly and leftovers must be swept.
DIRTY_MARK = b"trusted.cowfs.dirty"

# Temporary names cowfs creates inside guest trees (a link break in progress).
# They are invisible through the mount and cannot be created by a guest.
TEMP_PREFIX = b".cowfs~"

SHARED_MARK = b"1"
STORE_MARK = b"s"


def temp_name() -> bytes:
    """A fresh hidden name for a file cowfs is putting in place."""
    return TEMP_PREFIX + os.urandom(8).hex().encode()


def is_reserved_xattr(name: bytes) -> bool:
    """True for the extended attribute names cowfs keeps to itself."""
    return name.startswith(XATTR_PREFIX)


def is_reserved_name(name: bytes) -> bool:
    """True for directory entry names cowfs keeps to itself (temporaries)."""
    return name.startswith(TEMP_PREFIX)


def fd_path(fd: int) -> str:
    """The /proc magic link that reaches exactly the inode behind fd (O_PATH fds included)."""
    return f"/proc/self/fd/{fd}"


def mark_of(fd: int) -> bytes | None:
    """The COW mark's value on the inode behind fd, None if it has none."""
    try:
        return os.getxattr(fd_path(fd), COW_MARK)
    except OSError as e:
        if e.errno in (errno.ENODATA, errno.ENOTSUP):
            return None
        raise


def is_marked(fd: int) -> bool:
    """True if the inode behind fd carries the COW mark."""
    return mark_of(fd) is not None


def store_links(mark: bytes | None) -> int:
    """How many links of an inode with this mark value the content store holds (0 or 1)."""
    return 1 if mark == STORE_MARK else 0


def set_mark(fd: int, value: bytes = SHARED_MARK) -> None:
    """Put the COW mark on the inode behind fd; value STORE_MARK before the store links it."""
    os.setxattr(fd_path(fd), COW_MARK, value)


def remove_xattr(fd: int, name: bytes) -> None:
    """Remove extended attribute name from the inode behind fd, if it has it."""
    try:
        os.removexattr(fd_path(fd), name)
    except OSError as e:
        if e.errno != errno.ENODATA:
            raise


def clear_mark(fd: int) -> None:
    """Remove the COW mark from the inode behind fd, if it has one."""
    remove_xattr(fd, COW_MARK)
