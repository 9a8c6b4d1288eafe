"""Reading a guest's backing tree from the host: bounded fds, no blocking, nothing followed.

Whatever a guest's root made is in its tree: any name may be a symlink (to the
host's /etc/shadow, say), a FIFO that blocks its reader, a device node, a
directory with a million entries or a chain of them thousands deep. Every
host-side reader of a guest tree (the usage scan, hashify, clone, the crash
sweep, the reports' user names) goes through here:

* ``walk``: every directory once, depth first, each listed whole, with at
  most ``max_fds`` directory fds open whatever the tree's width and depth; an
  ancestor whose fd was let go is reopened by name from the nearest open one
  and must be the same (dev, ino) it was. Symlinks are never followed.
* ``open_below``: a path below a tree's root, no symlink followed, however
  long (``openat2`` takes at most PATH_MAX bytes at once); ``open_dir_below``
  the same for a directory.
* ``remove_tree``, ``remove_below``: a whole tree, as bounded and as careful as ``walk``.
* ``read_regular``: a small file of the guest, read only if it is a regular
  file: resolved as if the guest's root were "/", its last component not
  followed, and no other kind of file (FIFO, device) ever opened for reading.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from cowfs.tree.marks import fd_path
from native import syscalls

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# Directory fds a walk keeps open: enough that a tree a few levels deep never
# reopens a directory, few enough for any fd limit.
MAX_WALK_FDS = 32
# What one openat2 may be given of a long path (PATH_MAX is 4096 with its NUL).
PATH_CHUNK = 3072

Key = tuple[int, int]  # (st_dev, st_ino)
Descend = Callable[[bytes, bytes], bool]  # (path of a subdirectory, its name) -> walk into it?
OnError = Callable[[bytes, OSError], None]  # (path, error) of a directory that cannot be read


@dataclass(slots=True)
class Listing:
    """A directory as a walk visits it.

    fd (O_RDONLY) and the entries' stat() are valid until the walk goes on.
    path is below the root, with a leading slash (b"" for the root).
    leaving: the visit after everything below it (walk(..., leave=True)), with
    no entries.
    """

    fd: int
    path: bytes
    st: os.stat_result
    entries: list[os.DirEntry[str]]
    leaving: bool = False


class _Frame:
    """A directory on the walk's current path."""

    __slots__ = ("fd", "key", "name", "path", "pending", "st")

    def __init__(self, name: bytes, path: bytes, fd: int, st: os.stat_result):
        self.name = name
        self.path = path
        self.fd = fd
        self.st = st
        self.key = (st.st_dev, st.st_ino)
        self.pending: list[bytes] = []  # subdirectories still to walk into, last first


def _descend_all(path: bytes, name: bytes) -> bool:
    return True


def walk(
    root_fd: int,
    descend: Descend = _descend_all,
    leave: bool = False,
    on_error: OnError | None = None,
    max_fds: int = MAX_WALK_FDS,
) -> Iterator[Listing]:
    """Every directory under root_fd (any fd on a directory, O_PATH too), root first.

    A subdirectory is walked into if descend(path, name) says so. With leave,
    each directory is visited again after everything below it. A directory
    that cannot be opened or listed (it vanished, or was swapped for a symlink
    since its parent was listed) is passed to on_error and skipped; without
    on_error the OSError is raised. root_fd is not closed.
    """
    walker = _Walker(max(2, max_fds))
    try:
        yield from walker.run(root_fd, descend, leave, on_error)
    finally:
        walker.close_all()


class _Walker:
    def __init__(self, max_fds: int):
        self.max_fds = max_fds
        self.stack: list[_Frame] = []
        self.open_fds = 0
        self.lowest = 1  # no frame below this index but the root has an fd open

    def run(
        self, root_fd: int, descend: Descend, leave: bool, on_error: OnError | None
    ) -> Iterator[Listing]:
        fd = os.open(".", DIR_FLAGS, dir_fd=root_fd)
        root = self._push(b"", b"", fd)
        yield from self._visit(root, descend, on_error)
        stack = self.stack
        while stack:
            frame = stack[-1]
            if not frame.pending:
                if leave:
                    try:
                        fd = self._top_fd()
                    except OSError as e:
                        self._error(frame.path, e, on_error)
                    else:
                        yield Listing(fd, frame.path, frame.st, [], leaving=True)
                self._pop()
                continue
            name = frame.pending.pop()
            path = frame.path + b"/" + name
            try:
                parent_fd = self._top_fd()
            except OSError as e:
                frame.pending.clear()  # the directory is not where it was: skip what is left
                self._error(frame.path, e, on_error)
                continue
            try:
                fd = os.open(name, DIR_FLAGS, dir_fd=parent_fd)
            except OSError as e:
                self._error(path, e, on_error)
                continue
            if not frame.pending and not leave and frame is not stack[0]:
                self._close(frame)  # nothing more is opened from it (the root stays open)
            child = self._push(name, path, fd)
            yield from self._visit(child, descend, on_error)

    def _visit(
        self, frame: _Frame, descend: Descend, on_error: OnError | None
    ) -> Iterator[Listing]:
        try:
            with os.scandir(frame.fd) as listing:
                entries = list(listing)
        except OSError as e:
            self._error(frame.path, e, on_error)
            return
        yield Listing(frame.fd, frame.path, frame.st, entries)
        pending = frame.pending
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                name = os.fsencode(entry.name)
                if descend(frame.path + b"/" + name, name):
                    pending.append(name)
        pending.reverse()  # popped from the end: walked in listing order

    @staticmethod
    def _error(path: bytes, error: OSError, on_error: OnError | None) -> None:
        if on_error is None:
            raise error
        on_error(path, error)

    def _push(self, name: bytes, path: bytes, fd: int) -> _Frame:
        try:
            frame = _Frame(name, path, fd, os.fstat(fd))
        except BaseException:
            os.close(fd)
            raise
        self.stack.append(frame)
        self.open_fds += 1
        self._trim()
        return frame

    def _pop(self) -> None:
        self._close(self.stack.pop())
        self.lowest = min(self.lowest, max(1, len(self.stack)))

    def _close(self, frame: _Frame) -> None:
        if frame.fd >= 0:
            os.close(frame.fd)
            frame.fd = -1
            self.open_fds -= 1

    def _trim(self) -> None:
        """Let go of the shallowest fds (never the root's or the deepest) over the budget."""
        stack = self.stack
        index = self.lowest
        while self.open_fds > self.max_fds and index < len(stack) - 1:
            self._close(stack[index])
            index += 1
        self.lowest = index

    def _top_fd(self) -> int:
        """The deepest directory's fd, reopened by name from the nearest open ancestor if let go.

        The deepest half of the budget's worth of the directories reopened on
        the way stay open: a walk going back up finds its next ones open.
        """
        stack = self.stack
        index = len(stack) - 1
        if stack[index].fd >= 0:
            return stack[index].fd
        start = index
        while stack[start].fd < 0:
            start -= 1
        keep_from = max(start + 1, index - self.max_fds // 2)
        for depth in range(start + 1, index + 1):
            frame = stack[depth]
            fd = os.open(frame.name, DIR_FLAGS, dir_fd=stack[depth - 1].fd)
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != frame.key:
                os.close(fd)
                raise OSError(errno.ESTALE, "moved or replaced during the walk", frame.path)
            frame.fd = fd
            self.open_fds += 1
            if start < depth - 1 < keep_from:
                self._close(stack[depth - 1])
        self.lowest = min(self.lowest, keep_from)
        self._trim()
        return stack[index].fd

    def close_all(self) -> None:
        for frame in self.stack:
            self._close(frame)
        self.stack.clear()


def open_dir_below(root_fd: int, path: bytes) -> int:
    """A directory fd (O_RDONLY) on path below root_fd (b"" for the root), following no symlink."""
    return open_below(root_fd, path, DIR_FLAGS)


def open_below(root_fd: int, path: bytes, flags: int) -> int:
    """Open path (relative, or with a leading slash) below root_fd, following no symlink.

    Like ``syscalls.open_beneath`` (no "..", no symlinks, no escape), for paths
    of any length: a long one is opened a piece at a time.
    """
    path = path.lstrip(b"/")
    if len(path) <= PATH_CHUNK:
        return syscalls.open_beneath(root_fd, path or b".", flags)
    directory, _, name = path.rpartition(b"/")
    dir_fd = os.dup(root_fd)
    try:
        while directory:
            if len(directory) <= PATH_CHUNK:
                piece, directory = directory, b""
            else:
                cut = directory.rfind(b"/", 0, PATH_CHUNK + 1)
                if cut <= 0:  # one name longer than a chunk: not a name Linux allows
                    raise OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG), path)
                piece, directory = directory[:cut], directory[cut + 1 :]
            next_fd = syscalls.open_beneath(dir_fd, piece, os.O_PATH | os.O_DIRECTORY)
            os.close(dir_fd)
            dir_fd = next_fd
        return syscalls.open_beneath(dir_fd, name, flags)
    finally:
        os.close(dir_fd)


def remove_tree(parent_fd: int, name: bytes) -> None:
    """Remove parent_fd/name and everything below it (a directory, or any other file)."""
    try:
        fd = os.open(name, DIR_FLAGS, dir_fd=parent_fd)
    except OSError as e:
        if e.errno not in (errno.ENOTDIR, errno.ELOOP):
            raise
        os.unlink(name, dir_fd=parent_fd)
        return
    try:
        remove_below(fd)
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=parent_fd)


def remove_below(dir_fd: int) -> None:
    """Remove everything below the directory dir_fd is open on (it stays, empty).

    Where shutil.rmtree holds an fd and a Python frame per level (a tree 2,000
    deep ends it with EMFILE or RecursionError), this walks with walk's
    fixed number of fds and never follows a symlink.
    """
    subdirectories: dict[bytes, list[bytes]] = {}
    for listing in walk(dir_fd, leave=True):
        if listing.leaving:
            for child in subdirectories.pop(listing.path, ()):
                os.rmdir(child, dir_fd=listing.fd)
            continue
        below = subdirectories[listing.path] = []
        for entry in listing.entries:
            child = os.fsencode(entry.name)
            if entry.is_dir(follow_symlinks=False):
                below.append(child)
            else:
                os.unlink(child, dir_fd=listing.fd)


def read_regular(root_fd: int, path: bytes, limit: int) -> bytes:
    """The content of the regular file at path in the tree root_fd is the root of.

    Resolved as if root_fd were "/" (absolute symlinks and ".." on the way stay
    inside), the last component not followed. OSError if it is missing, not a
    regular file (EINVAL; a symlink included: nothing but a regular file is
    ever opened for reading, so a FIFO cannot block and no device is opened),
    or larger than limit bytes (EFBIG).
    """
    path_fd = syscalls.open_in_root(root_fd, path, os.O_PATH | os.O_NOFOLLOW)
    try:
        st = os.fstat(path_fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", path)
        if st.st_size > limit:
            raise OSError(errno.EFBIG, f"larger than {limit} bytes", path)
        # The O_PATH fd pins the inode just checked: this opens that very file.
        fd = os.open(fd_path(path_fd), os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    finally:
        os.close(path_fd)
    chunks = []
    got = 0
    try:
        while got <= limit:
            chunk = os.read(fd, limit + 1 - got)
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > limit:
        raise OSError(errno.EFBIG, f"larger than {limit} bytes", path)
    return data
