"""The guest's open files: each FUSE file handle names the backing fd it reads and writes.

A file handle is the fd's number in its low 32 bits (pyfuse3's patched read
path uses them as the fd) and this server's generation (its pid) above: a
request a dead server had done but not answered, resent to its successor
(resume.py), cannot name a file the successor opened at the same fd number.

Two parties change them: the operations open and release them, and a link
break (cow.py) moves every open file of a node to the node's private copy,
because the kernel's page cache for the node then holds the copy's pages.

The table also keeps the orphans: private inodes whose last name the guest
removed while it still had them open. The backing filesystem keeps such an
inode until its last close, and so does the guest's usage.
"""

from __future__ import annotations

import errno
import os

import pyfuse3

from cowfs.accounting.accountant import Accountant
from cowfs.serve.inodes import InodeTable, Node
from cowfs.serve.journal import FileRecord, Journal
from cowfs.serve.passthrough import Passthrough
from cowfs.tree.marks import fd_path
from native import syscalls

FD_BITS = 32


class OpenFile:
    """A file handle: the backing fd the guest's open file reads and writes."""

    __slots__ = ("backing_id", "fd", "fh", "flags", "node", "uid", "writable")

    def __init__(self, fh: int, node: Node, flags: int, uid: int, backing_id: int = 0):
        self.fh = fh
        self.backing_id = backing_id  # > 0: the kernel reads the backing file itself
        self.fd = fh & ((1 << FD_BITS) - 1)
        self.node = node
        self.flags = flags
        self.uid = uid  # who opened it: the reserve is for uid 0 only
        self.writable = (flags & os.O_ACCMODE) != os.O_RDONLY


class OpenFiles:
    """Open files by handle and by node, and the orphans they keep charged."""

    def __init__(self, table: InodeTable, acct: Accountant, passthrough: Passthrough):
        self.table = table
        self.acct = acct
        self.passthrough = passthrough
        self._by_handle: dict[int, OpenFile] = {}
        self._of_node: dict[Node, set[OpenFile]] = {}
        self._orphans: set[Node] = set()
        self.journal: Journal | None = None  # for a successor server (journal.py)
        self._placeholders: dict[int, int] = {}  # a dead server's lost files: fh -> fd held
        self.generation = os.getpid() << FD_BITS

    def __getitem__(self, fh: int) -> OpenFile:
        try:
            return self._by_handle[fh]
        except KeyError:  # an open file a dead server's successor could not take over
            raise pyfuse3.FUSEError(errno.EBADF) from None

    def get(self, fh: int | None) -> OpenFile | None:
        """The open file of handle fh, if there is one."""
        return self._by_handle.get(fh) if fh is not None else None

    def add(self, fd: int, node: Node, flags: int, uid: int, backing_id: int = 0) -> OpenFile:
        """Register backing fd, opened with flags by uid, as an open file of node (served
        by the kernel from backing_id if > 0: passthrough.py)."""
        handle = OpenFile(self.generation | fd, node, flags, uid, backing_id)
        self._by_handle[handle.fh] = handle
        self._of_node.setdefault(node, set()).add(handle)
        if backing_id:
            self.passthrough.opened(node, backing_id)
        if self.journal is not None:
            self.journal.opened(fd, handle.fh, node.nodeid, flags, uid, backing_id)
        return handle

    def has_served_opens(self, node: Node) -> bool:
        """True if node has open files this server reads and writes (not passed through)."""
        return any(not handle.backing_id for handle in self._of_node.get(node, ()))

    def resume(self, records: list[FileRecord]) -> int:
        """Take over a dead server's open files (resume.py): each reopened from its node's
        file handle at its fd number, where reserve_handles put a placeholder; how many
        could not be (their placeholders stay, and fail every use)."""
        lost = 0
        for record in records:
            node = self.table.by_nodeid.get(record.nodeid)
            flags = record.flags & ~(
                os.O_CREAT | os.O_EXCL | os.O_TRUNC | os.O_NOCTTY | os.O_APPEND
            )
            try:
                if node is None or node.handle is None:
                    raise FileNotFoundError
                fd = syscalls.open_by_handle(self.table.mount_fd, node.handle, flags | os.O_CLOEXEC)
            except OSError:
                lost += 1
                self._placeholders[record.fh] = record.fd
                continue
            os.dup2(fd, record.fd, inheritable=False)
            os.close(fd)
            handle = OpenFile(record.fh, node, record.flags, record.uid, record.backing_id)
            self._by_handle[record.fh] = handle
            self._of_node.setdefault(node, set()).add(handle)
            if record.backing_id:
                self.passthrough.opened(node, record.backing_id, known=False)
        return lost

    def release(self, fh: int) -> None:
        """Close an open file; at a node's last close, credit it if it was an orphan."""
        handle = self._by_handle.pop(fh, None)
        if handle is None:  # a dead server's file not taken over: its placeholder goes
            fd = self._placeholders.pop(fh, None)
            if fd is not None:
                if self.journal is not None:
                    self.journal.released(fd)
                os.close(fd)
            return
        if self.journal is not None:
            self.journal.released(handle.fd)
        if handle.backing_id:
            self.passthrough.released(handle.node)
        handles = self._of_node.get(handle.node)
        if handles is not None:
            handles.discard(handle)
            if not handles:
                del self._of_node[handle.node]
                if handle.node in self._orphans:  # its last name went while it was open
                    self._orphans.discard(handle.node)
                    self.acct.removed(os.fstat(handle.fd))
        os.close(handle.fd)

    def credit_removed(self, st: os.stat_result, node: Node | None) -> None:
        """Credit an inode whose last name was just removed: now, or at its last close if open."""
        if node is not None and self._of_node.get(node):
            self._orphans.add(node)
        else:
            self.acct.removed(st)

    def repoint(self, node: Node, copy_fd: int) -> None:
        """After a link break, make node's open files read and write its private copy."""
        for handle in self._of_node.get(node, ()):
            flags = handle.flags & ~(os.O_TRUNC | os.O_NOATIME)
            new_fd = self.table.open_with_room(fd_path(copy_fd), flags | os.O_CLOEXEC)
            try:
                os.dup2(new_fd, handle.fd)
            finally:
                os.close(new_fd)
