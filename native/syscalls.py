"""Thin Python wrappers over ``native._syscalls``: each raises OSError on failure."""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import threading
from typing import Any

from native._syscalls import ffi, lib  # type: ignore[import-not-found]

AT_FDCWD = -100
AT_SYMLINK_NOFOLLOW = 0x100
AT_EMPTY_PATH = 0x1000

RENAME_NOREPLACE = 1 << 0
RENAME_EXCHANGE = 1 << 1

UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_MOVE = 8192
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_STRICTATIME = 1 << 24
MNT_DETACH = 2

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_SECUREBITS = 28
PR_CAPBSET_READ = 23
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4

_NULL = ffi.NULL


def _fsencode(path: str | bytes) -> bytes:
    return path if isinstance(path, bytes) else os.fsencode(path)


def _check(result: int, *filenames: str | bytes) -> int:
    if result == -1:
        err = ffi.errno
        raise OSError(err, os.strerror(err), *filenames[:1])
    return result


def renameat2(olddirfd: int, oldname: bytes, newdirfd: int, newname: bytes, flags: int = 0) -> None:
    """rename(2) between two directory fds, with RENAME_NOREPLACE / RENAME_EXCHANGE."""
    _check(lib.renameat2(olddirfd, oldname, newdirfd, newname, flags), oldname)


def fchownat(dirfd: int, name: bytes, uid: int, gid: int, flags: int = 0) -> None:
    """chown relative to a directory fd; name b"" with AT_EMPTY_PATH chowns the fd itself."""
    _check(lib.fchownat(dirfd, name, uid & 0xFFFFFFFF, gid & 0xFFFFFFFF, flags), name)


def utimensat(
    dirfd: int, name: bytes, atime_ns: int | None, mtime_ns: int | None, flags: int = 0
) -> None:
    """Set timestamps in nanoseconds; None leaves that timestamp as it is (UTIME_OMIT)."""
    times = ffi.new("struct timespec[2]")
    for slot, value in ((0, atime_ns), (1, mtime_ns)):
        if value is None:
            times[slot].tv_sec = 0
            times[slot].tv_nsec = UTIME_OMIT
        else:
            sec, nsec = divmod(value, 1_000_000_000)
            times[slot].tv_sec = sec
            times[slot].tv_nsec = nsec
    _check(lib.utimensat(dirfd, name, times, flags), name)


_MAX_HANDLE = 128


def name_to_handle(fd: int) -> bytes:
    """A file handle for the inode behind fd (any fd, O_PATH included): type + opaque bytes."""
    buf = ffi.new("unsigned char[]", _MAX_HANDLE)
    handle_type = ffi.new("int *")
    mount_id = ffi.new("int *")
    length = _check(lib.native_name_to_handle(fd, buf, _MAX_HANDLE, handle_type, mount_id))
    return handle_type[0].to_bytes(4, "little", signed=True) + ffi.buffer(buf, length)[:]


def open_by_handle(mount_fd: int, handle: bytes, flags: int) -> int:
    """Open the inode a name_to_handle() handle names (needs CAP_DAC_READ_SEARCH)."""
    handle_type = int.from_bytes(handle[:4], "little", signed=True)
    body = handle[4:]
    return _check(lib.native_open_by_handle(mount_fd, body, len(body), handle_type, flags))


def detached_noatime_mount(dirfd: int) -> int:
    """An fd on a copy of dirfd's mount attached nowhere, whose files' atimes no access
    moves (open_tree + mount_setattr, Linux 5.12+); it goes with its last fd."""
    return _check(lib.native_detached_noatime_mount(dirfd))


RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08


def open_beneath(dirfd: int, path: bytes, flags: int, mode: int = 0) -> int:
    """openat2(2) confined to dirfd's tree: no "..", no symlinks, no magic links, no escape."""
    resolve = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS
    return _check(lib.native_openat2(dirfd, path, flags | os.O_CLOEXEC, mode, resolve), path)


def syncfs(fd: int) -> None:
    """syncfs(2): write out the whole filesystem fd is on."""
    _check(lib.syncfs(fd))


def getdents(fd: int, buffer: bytearray) -> int:
    """getdents64(2): the next linux_dirent64 records of directory fd into buffer; 0 at the end.

    The number of bytes filled; EINVAL if buffer cannot hold the next record.
    """
    return _check(lib.getdents64(fd, ffi.from_buffer(buffer), len(buffer)))


_NO_XATTR = (errno.ENODATA, errno.ENOTSUP, errno.EPERM)
_XATTR_SIZE = 64
_xattr_buffers = threading.local()


def xattr_at(dirfd: int, name: bytes, xattr: bytes) -> bytes | None:
    """The value of dirfd/name's extended attribute xattr (a symlink itself, not followed).

    None if it has none; OSError (ERANGE) if the value is longer than 64 bytes.
    """
    return _xattr_answer(lib.native_xattr_at, dirfd, name, xattr)


def xattr_via_proc(dirfd: int, name: bytes, xattr: bytes) -> bytes | None:
    """xattr_at through /proc/self/fd: what it does on kernels without getxattrat(2)."""
    return _xattr_answer(lib.native_xattr_via_proc, dirfd, name, xattr)


def _xattr_answer(call: Any, dirfd: int, name: bytes, xattr: bytes) -> bytes | None:
    # One buffer per thread (the call runs without the GIL): a new one per
    # call cost as much as the rest of the wrapper in a usage scan.
    buf = getattr(_xattr_buffers, "buf", None)
    if buf is None:
        buf = _xattr_buffers.buf = ffi.new("char[]", _XATTR_SIZE)
    got = call(dirfd, name, xattr, buf, _XATTR_SIZE)
    if got < 0:
        err = ffi.errno
        if err in _NO_XATTR:
            return None
        raise OSError(err, os.strerror(err), name)
    return ffi.unpack(buf, got)  # type: ignore[no-any-return]


class FileProbe:
    """Opens, stats, lists the xattr names of and reads a small file in one call.

    hashify's per-file work from Python was six calls, a stat_result and a list
    per file; this is one call into buffers made once. One per thread.
    """

    def __init__(self, capacity: int, names_capacity: int = 1024):
        self.capacity = capacity
        self._content = ffi.new("unsigned char[]", capacity)
        self._names = ffi.new("char[]", names_capacity)
        self._names_capacity = names_capacity
        self.result = ffi.new("struct native_probe *")
        self.content = memoryview(ffi.buffer(self._content))

    def probe(self, dirfd: int, path: bytes, flags: int) -> Any:
        """Probe path beneath dirfd (openat2 as open_beneath); the native_probe result.

        Its fields: st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns, st_mode,
        st_uid, st_gid (fstat's, named as os.stat_result names them, so that
        code comparing stat results reads either); content_len, the bytes read
        into .content (-1 if the file holds capacity bytes or more); names_len,
        the bytes of names() (-1 if they did not fit).
        """
        _check(
            lib.native_probe_file(
                dirfd,
                path,
                flags,
                self._content,
                self.capacity,
                self._names,
                self._names_capacity,
                self.result,
            ),
            path,
        )
        return self.result

    def names(self) -> list[bytes]:
        """The extended attribute names the last probe listed."""
        length = self.result.names_len
        if length <= 0:
            return []
        return ffi.buffer(self._names, length)[:].split(b"\0")[:-1]


SYNC_FILE_RANGE_WAIT_BEFORE = 1
SYNC_FILE_RANGE_WRITE = 2
SYNC_FILE_RANGE_WAIT_AFTER = 4


def sync_file_range(fd: int, offset: int, nbytes: int, flags: int) -> None:
    """sync_file_range(2): write (and wait for) a range of fd's data, not its metadata."""
    _check(lib.sync_file_range(fd, offset, nbytes, flags))


RESOLVE_IN_ROOT = 0x10


def open_in_root(dirfd: int, path: bytes, flags: int, mode: int = 0) -> int:
    """openat2(2) as if dirfd were "/": absolute symlinks and ".." stay inside; no magic links."""
    resolve = RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS
    return _check(lib.native_openat2(dirfd, path, flags | os.O_CLOEXEC, mode, resolve), path)


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2), with its mode (FALLOC_FL_KEEP_SIZE, PUNCH_HOLE, ZERO_RANGE, ...)."""
    _check(lib.fallocate(fd, mode, offset, length))


def unshare(flags: int) -> None:
    """unshare(2)."""
    _check(lib.unshare(flags))


def setns(fd: int, nstype: int = 0) -> None:
    """setns(2): join the namespace that fd refers to."""
    _check(lib.setns(fd, nstype))


def mount(
    source: str | bytes | None,
    target: str | bytes,
    fstype: str | bytes | None = None,
    flags: int = 0,
    data: str | bytes | None = None,
) -> None:
    """mount(2)."""
    _check(
        lib.mount(
            _fsencode(source) if source is not None else _NULL,
            _fsencode(target),
            _fsencode(fstype) if fstype is not None else _NULL,
            flags,
            _fsencode(data) if data is not None else _NULL,
        ),
        target,
    )


def umount2(target: str | bytes, flags: int = 0) -> None:
    """umount2(2)."""
    _check(lib.umount2(_fsencode(target), flags), target)


def pidfd_getfd(pidfd: int, targetfd: int) -> int:
    """A copy (close-on-exec) of another process's fd targetfd (needs ptrace rights on it)."""
    return _check(lib.native_pidfd_getfd(pidfd, targetfd))


def pivot_root(new_root: str | bytes, put_old: str | bytes) -> None:
    """pivot_root(2)."""
    _check(lib.native_pivot_root(_fsencode(new_root), _fsencode(put_old)), new_root)


def sethostname(name: str) -> None:
    """sethostname(2) in the current UTS namespace."""
    raw = name.encode()
    _check(lib.sethostname(raw, len(raw)))


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    """prctl(2)."""
    return _check(lib.prctl(option, arg2, arg3, arg4, arg5))


def join_new_session_keyring() -> int:
    """Give this process a new, empty, anonymous session keyring; its serial number."""
    return _check(lib.native_join_session_keyring(_NULL))


def bpf(command: int, attr: bytes) -> int:
    """bpf(2) with attr, the command's union bpf_attr as bytes; its result (an fd, mostly)."""
    buffer = ffi.new("char[]", attr)
    return _check(lib.native_bpf(command, buffer, len(attr)))


def capget(pid: int = 0) -> tuple[int, int, int]:
    """(effective, permitted, inheritable) capability masks of a process (0 = self)."""
    data = ffi.new("struct native_cap_data[2]")
    _check(lib.native_capget(pid, data))
    return tuple(  # type: ignore[return-value]
        data[0].__getattribute__(f) | (data[1].__getattribute__(f) << 32)
        for f in ("effective", "permitted", "inheritable")
    )


def capset(effective: int, permitted: int, inheritable: int) -> None:
    """Set this thread's effective, permitted and inheritable capability masks."""
    data = ffi.new("struct native_cap_data[2]")
    for index in (0, 1):
        shift = 32 * index
        data[index].effective = (effective >> shift) & 0xFFFFFFFF
        data[index].permitted = (permitted >> shift) & 0xFFFFFFFF
        data[index].inheritable = (inheritable >> shift) & 0xFFFFFFFF
    _check(lib.native_capset(data))


FS_IOC_FIEMAP = 0xC020660B
FIEMAP_EXTENT_LAST = 0x1
_FIEMAP = struct.Struct(
    "=QQIIII"
)  # fm_start, fm_length, fm_flags, fm_mapped_extents, fm_extent_count
_FIEMAP_EXTENT = struct.Struct("=QQQ16xI12x")  # fe_logical, fe_physical, fe_length, fe_flags


def extents(fd: int, start: int, length: int, batch: int = 64) -> list[tuple[int, int]]:
    """(offset, length) of fd's allocated extents that overlap [start, start + length).

    FIEMAP without syncing: written, preallocated (unwritten) and delayed
    (not yet written back) extents alike. OSError (EOPNOTSUPP) where the
    filesystem cannot tell.
    """
    found: list[tuple[int, int]] = []
    end = start + length
    buf = bytearray(_FIEMAP.size + batch * _FIEMAP_EXTENT.size)
    while start < end:
        _FIEMAP.pack_into(buf, 0, start, end - start, 0, 0, batch, 0)
        fcntl.ioctl(fd, FS_IOC_FIEMAP, buf)
        mapped = _FIEMAP.unpack_from(buf)[3]
        flags = 0
        for index in range(mapped):
            offset, _, size, flags = _FIEMAP_EXTENT.unpack_from(
                buf, _FIEMAP.size + index * _FIEMAP_EXTENT.size
            )
            found.append((offset, size))
        if mapped < batch or flags & FIEMAP_EXTENT_LAST:
            break
        start = found[-1][0] + found[-1][1]
    return found
