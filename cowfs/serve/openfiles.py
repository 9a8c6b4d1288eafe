"""The guest's open files: each FUSE file handle is the backing fd it reads and writes.

Two parties change them: the operations open and release them, and a link
break (cow.py) moves every open file of a node to the node's private copy,
because the kernel's page cache for the node then holds the copy's pages.

The table also keeps the orphans: private inodes whose last name the guest
removed while it still had them open. The backing filesystem keeps such an
inode until its last close, and so does the guest's usage.
"""

from __future__ import annotations

import os

from cowfs.accounting.accountant import Accountant
from cowfs.serve.inodes import InodeTable, Node
from cowfs.tree.marks import fd_path


class OpenFile:
    """A file handle: the backing fd the guest's open file reads and writes."""

    __slots__ = ("fd", "flags", "node", "uid", "writable")

    def __init__(self, fd: int, node: Node, flags: int, uid: int):
        self.fd = fd
        self.node = node
        self.flags = flags
        self.uid = uid  # who opened it: the reserve is for uid 0 only
        self.writable = (flags & os.O_ACCMODE) != os.O_RDONLY


class OpenFiles:
    """Open files by handle and by node, and the orphans they keep charged."""

    def __init__(self, table: InodeTable, acct: Accountant):
        self.table = table
        self.acct = acct
        self._by_handle: dict[int, OpenFile] = {}
        self._of_node: dict[Node, set[OpenFile]] = {}
        self._orphans: set[Node] = set()

    def __getitem__(self, fh: int) -> OpenFile:
        return self._by_handle[fh]

    def get(self, fh: int | None) -> OpenFile | None:
        """The open file of handle fh, if there is one."""
        return self._by_handle.get(fh) if fh is not None else None

    def add(self, fd: int, node: Node, flags: int, uid: int) -> OpenFile:
        """Register backing fd, opened with flags by uid, as an open file of node; fd is its fh."""
        handle = OpenFile(fd, node, flags, uid)
        self._by_handle[fd] = handle
        self._of_node.setdefault(node, set()).add(handle)
        return handle

    def release(self, fh: int) -> None:
        """Close an open file; at a node's last close, credit it if it was an orphan."""
        handle = self._by_handle.pop(fh)
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
