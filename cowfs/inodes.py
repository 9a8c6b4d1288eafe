"""The inode table: FUSE node ids mapped to O_PATH handles on backing inodes.

Following libfuse's passthrough_hp, every inode the kernel knows is held open
as an O_PATH fd, and every operation uses ``*at`` calls relative to such fds,
so no guest path is ever resolved on the host.

A node id is the backing inode number where that is free, so ``ls -i`` agrees
with the host. It stays with the *file* the kernel knows: when a link break
replaces the backing inode under a guest's name, the node is re-pointed to
the private copy and keeps its number.

Each node also remembers the name it was last reached by (parent node + name),
kept current by lookup, create, rename and unlink; the link break needs it to
put the private copy in place under the guest's name.
"""

from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING

import pyfuse3

if TYPE_CHECKING:
    import trio

ROOT_NODEID: int = pyfuse3.ROOT_INODE
_SYNTHETIC_BASE = 1 << 62

Key = tuple[int, int]  # (st_dev, st_ino) of a backing inode


class Node:
    """One inode known to the kernel: its O_PATH fd, identity, lookup count and last name."""

    __slots__ = ("__weakref__", "break_lock", "fd", "key", "name", "nlookup", "nodeid", "parent")

    def __init__(self, nodeid: int, fd: int, key: Key, parent: Node | None, name: bytes | None):
        self.nodeid = nodeid
        self.fd = fd
        self.key = key
        self.nlookup = 0
        self.parent = parent
        self.name = name
        self.break_lock: trio.Lock | None = None

    def __del__(self) -> None:
        # A node outlives its table entry while children or open files refer to it.
        fd, self.fd = self.fd, -1
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)

    def __repr__(self) -> str:
        return f"Node({self.nodeid}, key={self.key}, name={self.name!r})"


class InodeTable:
    """Node ids <-> backing inodes, with the kernel's lookup counts."""

    def __init__(self, root_fd: int):
        st = os.fstat(root_fd)
        self.root_dev = st.st_dev
        self.root = Node(ROOT_NODEID, root_fd, (st.st_dev, st.st_ino), None, None)
        self.root.nlookup = 1
        self.by_nodeid: dict[int, Node] = {ROOT_NODEID: self.root}
        self.by_key: dict[Key, Node] = {self.root.key: self.root}
        self._next_synthetic = _SYNTHETIC_BASE

    def __len__(self) -> int:
        return len(self.by_nodeid)

    def get(self, nodeid: int) -> Node:
        """The node for a node id the kernel sent (it always names a live one)."""
        return self.by_nodeid[nodeid]

    def find(self, st: os.stat_result) -> Node | None:
        """The live node for a backing inode, if the kernel knows it."""
        return self.by_key.get((st.st_dev, st.st_ino))

    def _new_nodeid(self, st: os.stat_result) -> int:
        ino = st.st_ino
        if st.st_dev == self.root_dev and ino != ROOT_NODEID and ino not in self.by_nodeid:
            return ino
        while True:
            self._next_synthetic += 1
            if self._next_synthetic not in self.by_nodeid:
                return self._next_synthetic

    def add(self, fd: int, st: os.stat_result, parent: Node, name: bytes) -> Node:
        """Register a backing inode not known yet (lookup count 0: the caller counts it)."""
        key = (st.st_dev, st.st_ino)
        node = Node(self._new_nodeid(st), fd, key, parent, name)
        self.by_nodeid[node.nodeid] = node
        self.by_key[key] = node
        return node

    def remember(self, fd: int, st: os.stat_result, parent: Node, name: bytes) -> Node:
        """The node for an inode just reached by (parent, name), its lookup count raised by one.

        Takes ownership of fd: closed if the inode was known already.
        """
        node = self.by_key.get((st.st_dev, st.st_ino))
        if node is None:
            node = self.add(fd, st, parent, name)
        else:
            os.close(fd)
            node.parent, node.name = parent, name
        node.nlookup += 1
        return node

    def forget(self, nodeid: int, count: int) -> None:
        """Lower a lookup count; at zero the kernel no longer knows the node."""
        node = self.by_nodeid.get(nodeid)
        if node is None or node is self.root:
            return
        node.nlookup -= count
        if node.nlookup <= 0:
            self.drop(node)

    def drop(self, node: Node) -> None:
        """Remove a node from the table (its fd closes once nothing refers to it)."""
        if self.by_nodeid.get(node.nodeid) is node:
            del self.by_nodeid[node.nodeid]
        if self.by_key.get(node.key) is node:
            del self.by_key[node.key]

    def repoint(self, node: Node, fd: int, st: os.stat_result) -> None:
        """Make node stand for another backing inode (after a link break); takes fd."""
        if self.by_key.get(node.key) is node:
            del self.by_key[node.key]
        old_fd = node.fd
        node.fd = fd
        node.key = (st.st_dev, st.st_ino)
        self.by_key[node.key] = node
        os.close(old_fd)

    def renamed(self, node: Node, parent: Node, name: bytes) -> None:
        """Record that node is now reached by (parent, name)."""
        node.parent, node.name = parent, name

    def unlinked(self, node: Node, parent: Node, name: bytes) -> None:
        """Record that (parent, name) no longer reaches node."""
        if node.parent is parent and node.name == name:
            node.parent, node.name = None, None
