"""Copying an inode's data and metadata (owner, mode, xattrs, timestamps) between fds.

Used by the link break (cow.py) and by clone: both must give a new inode
exactly what the old one had, except the COW mark.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat

from cowfs.tree.marks import fd_path, is_reserved_xattr
from native import syscalls

FICLONE = 0x40049409
# Errors meaning "this filesystem (pair) cannot reflink": fall back to copying.
_NO_REFLINK = {errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL, errno.ENOSYS}
_NO_XATTRS = {errno.ENOTSUP, errno.EPERM}
_COPY_CHUNK = 1 << 30


def list_xattrs(fd: int) -> list[bytes]:
    """Extended attribute names of the inode behind fd, without cowfs's own."""
    try:
        names = os.listxattr(fd_path(fd))
    except OSError as e:
        if e.errno in _NO_XATTRS:
            return []
        raise
    encoded = (os.fsencode(n) for n in names)
    return [n for n in encoded if not is_reserved_xattr(n)]


def read_xattrs(fd: int) -> dict[bytes, bytes]:
    """All extended attributes of the inode behind fd, without cowfs's own."""
    path = fd_path(fd)
    result: dict[bytes, bytes] = {}
    for name in list_xattrs(fd):
        try:
            result[name] = os.getxattr(path, name)
        except OSError as e:
            if e.errno != errno.ENODATA:  # removed meanwhile
                raise
    return result


def copy_metadata(src_fd: int, dst_fd: int, st: os.stat_result) -> None:
    """Give dst's inode the owner, mode, xattrs and timestamps of st/src (not the COW mark).

    Order matters: chown clears set-id bits and security.capability, so owner
    first, then mode, then xattrs, then timestamps (everything before touches ctime only).
    """
    is_link = stat.S_ISLNK(st.st_mode)
    syscalls.fchownat(
        dst_fd,
        b"",
        st.st_uid,
        st.st_gid,
        syscalls.AT_EMPTY_PATH | syscalls.AT_SYMLINK_NOFOLLOW,
    )
    if not is_link:
        os.chmod(fd_path(dst_fd), stat.S_IMODE(st.st_mode))
    dst_path = fd_path(dst_fd)
    for name, value in read_xattrs(src_fd).items():
        os.setxattr(dst_path, name, value)
    syscalls.utimensat(dst_fd, b"", st.st_atime_ns, st.st_mtime_ns, syscalls.AT_EMPTY_PATH)


def copy_data(src_fd: int, dst_fd: int, size: int) -> bool:
    """Copy size bytes of file content: reflink where possible, else in-kernel, keeping holes.

    True if the data was copied (and must be synced to be durable), False if reflinked.
    """
    try:
        fcntl.ioctl(dst_fd, FICLONE, src_fd)
        return False
    except OSError as e:
        if e.errno not in _NO_REFLINK:
            raise
    offset = 0
    while offset < size:
        try:
            data_start = os.lseek(src_fd, offset, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # only a hole remains
                break
            raise
        data_end = os.lseek(src_fd, data_start, os.SEEK_HOLE)
        position = data_start
        while position < data_end:
            copied = os.copy_file_range(
                src_fd, dst_fd, min(data_end - position, _COPY_CHUNK), position, position
            )
            if copied == 0:  # the source shrank under us
                break
            position += copied
        offset = data_end
    os.ftruncate(dst_fd, size)
    return True
