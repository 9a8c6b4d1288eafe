"""The inode table: FUSE node ids mapped to O_PATH handles on backing inodes.

Following libfuse's passthrough_hp, every inode the kernel knows is reached
through an O_PATH fd, and every operation uses ``*at`` calls relative to such
fds, so no guest path is ever resolved on the host.

The kernel may know more inodes than the process may hold fds (RLIMIT_NOFILE
cannot always be raised), so node fds live in an LRU of bounded size: an
evicted node keeps a file handle (name_to_handle_at) and is reopened by it
(open_by_handle_at) on its next use, whatever its name is by then. Nodes a
file handle cannot reopen (unlinked inodes, other filesystems) are never
evicted, nor are nodes pinned by a request that is using their fd in a
worker thread.

A node id is the backing inode number where that is free, so ``ls -i`` agrees
with the host. It stays with the *file* the kernel knows: when a link break
replaces the backing inode under a guest's name, the node is re-pointed to
the private copy and keeps its number.

Each node also remembers the directory it was last reached in and, unless it
is a directory itself, the name it was reached by there, kept current by
lookup, create, rename and unlink; the link break needs them to put the
private copy in place under the guest's name. Directories are never broken,
so theirs is not kept.

A node costs a few hundred bytes besides its name, less than the kernel's own
inode and dentry for it (which the guest pays for), and the kernel forgets
nodes as it reclaims them: the table holds what the kernel holds, no more.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
from collections import OrderedDict
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pyfuse3

from cowfs.serve.journal import Journal, NodeRecord
from native import syscalls

if TYPE_CHECKING:
    import trio

log = logging.getLogger(__name__)

ROOT_NODEID: int = pyfuse3.ROOT_INODE
_SYNTHETIC_BASE = 1 << 62

Key = tuple[int, int]  # (st_dev, st_ino) of a backing inode


class Node:
    """One inode known to the kernel: its fd (or file handle), identity, lookup count, name."""

    __slots__ = (
        "_fd",
        "aliases",
        "break_lock",
        "handle",
        "is_dir",
        "key",
        "name",
        "nlookup",
        "nodeid",
        "parent",
        "pins",
        "table",
    )

    def __init__(
        self,
        table: InodeTable,
        nodeid: int,
        fd: int,
        st: os.stat_result,
        parent: Node | None,
        name: bytes | None,
    ):
        self.table = table
        self.nodeid = nodeid
        self._fd = fd
        self.key: Key = (st.st_dev, st.st_ino)
        self.is_dir = stat.S_ISDIR(st.st_mode)
        self.handle: bytes | None = None
        self.nlookup = 0
        self.pins = 0
        self.parent = parent
        self.name = None if self.is_dir else name
        # Other names the kernel reached this inode by (a hard link's), as (parent's
        # node id, name), checked when used: the one its break replaces when the
        # name above is gone.
        self.aliases: list[tuple[int, bytes]] | None = None
        self.break_lock: trio.Lock | None = None

    @property
    def fd(self) -> int:
        """An O_PATH fd on the backing inode, reopened from the file handle if it was evicted."""
        if self._fd >= 0:
            self.table.touch(self)
            return self._fd
        return self.table.reopen(self)

    def __del__(self) -> None:
        # A node outside the table and the fd cache (a dropped parent) closes its own fd.
        fd, self._fd = self._fd, -1
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)

    def __repr__(self) -> str:
        return f"Node({self.nodeid}, key={self.key}, name={self.name!r})"


class InodeTable:
    """Node ids <-> backing inodes, with the kernel's lookup counts and a bounded fd cache."""

    def __init__(self, root_fd: int, max_fds: int):
        st = os.fstat(root_fd)
        self.root_dev = st.st_dev
        # open_by_handle_at (and syncfs) want a real (not O_PATH) fd on the filesystem.
        self.mount_fd = os.open(
            f"/proc/self/fd/{root_fd}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
        )
        self.max_fds = max(16, max_fds)
        self.evict_batch = max(1, self.max_fds // 8)
        self._open: OrderedDict[Node, None] = OrderedDict()
        self.root = Node(self, ROOT_NODEID, root_fd, st, None, None)
        self.root.nlookup = 1
        self.root.pins = 1  # never evicted
        self.by_nodeid: dict[int, Node] = {ROOT_NODEID: self.root}
        self.by_key: dict[Key, Node] = {self.root.key: self.root}
        self._next_synthetic = _SYNTHETIC_BASE
        self.handles_work = True
        self.reopens = 0
        # Where node ids are recorded for a successor on the same FUSE session.
        self.journal: Journal | None = None

    def __len__(self) -> int:
        return len(self.by_nodeid)

    def close(self) -> None:
        """Close every node's fd (the root's too): the mount has ended, its server goes on."""
        for node in list(self.by_nodeid.values()):
            fd, node._fd = node._fd, -1
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._open.clear()
        self.by_nodeid.clear()
        self.by_key.clear()
        with contextlib.suppress(OSError):
            os.close(self.mount_fd)

    # -- the fd cache ---------------------------------------------------

    def resize(self, max_fds: int) -> None:
        """Keep at most max_fds node fds from now on (a server of several mounts shares
        its fd limit out among them): the least recently used beyond it are closed now
        (pinned ones, in use by a request, are kept)."""
        self.max_fds = max(16, max_fds)
        self.evict_batch = max(1, self.max_fds // 8)
        if len(self._open) > self.max_fds:
            self.evict(len(self._open) - self.max_fds)

    def touch(self, node: Node) -> None:
        """Mark node's fd as just used."""
        if node in self._open:
            self._open.move_to_end(node)

    def _admit(self, node: Node) -> None:
        self._open[node] = None
        if len(self._open) > self.max_fds:
            # From the cold end only, and never so many that the nodes the
            # current request just used (the warm end) could be reached.
            self.evict(self.evict_batch)

    def evict(self, count: int) -> int:
        """Close up to count least recently used node fds that a file handle can reopen."""
        evicted = 0
        for node in list(self._open):
            if evicted >= count:
                break
            if node.pins or not self._can_reopen(node):
                continue
            del self._open[node]
            fd, node._fd = node._fd, -1
            os.close(fd)
            evicted += 1
        return evicted

    def _can_reopen(self, node: Node) -> bool:
        if not self.handles_work or node.key[0] != self.root_dev:
            return False
        try:
            if os.fstat(node._fd).st_nlink == 0:
                return False  # a handle to an unlinked inode goes stale
            if node.handle is None:
                node.handle = syscalls.name_to_handle(node._fd)
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.EPERM, errno.ENOSYS):
                self.handles_work = False
                log.warning("file handles unsupported (%s): node fds are never evicted", e)
            return False
        return True

    def reopen(self, node: Node) -> int:
        """Give an evicted node its fd back, from its file handle."""
        assert node.handle is not None, f"{node!r} has neither fd nor handle"
        fd = syscalls.open_by_handle(self.mount_fd, node.handle, os.O_PATH | os.O_CLOEXEC)
        node._fd = fd
        self.reopens += 1
        self._admit(node)
        return fd

    @contextlib.contextmanager
    def pinned(self, *nodes: Node):  # type: ignore[no-untyped-def]
        """Keep nodes' fds open while a worker thread uses them."""
        for node in nodes:
            node.fd  # noqa: B018  (reopen now if evicted)
            node.pins += 1
        try:
            yield
        finally:
            for node in nodes:
                node.pins -= 1

    def open_with_room(
        self, path: str | bytes, flags: int, mode: int = 0o777, dir_fd: int | None = None
    ) -> int:
        """os.open, evicting node fds and retrying once if the process is out of fds."""
        try:
            return os.open(path, flags, mode, dir_fd=dir_fd)
        except OSError as e:
            if e.errno != errno.EMFILE or not self.evict(self.evict_batch):
                raise
        return os.open(path, flags, mode, dir_fd=dir_fd)

    # -- the table ------------------------------------------------------

    def get(self, nodeid: int) -> Node:
        """The node for a node id the kernel sent (a live one, unless a dead server's
        successor could not take it over)."""
        try:
            return self.by_nodeid[nodeid]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ESTALE) from None

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
        node = Node(self, self._new_nodeid(st), fd, st, parent, name)
        self.by_nodeid[node.nodeid] = node
        self.by_key[node.key] = node
        self._admit(node)
        if self.journal is not None:
            self._journal(node)
            if self.journal.needs_compaction(len(self.by_nodeid)):
                self.journal.compact(self._journal_records())
        return node

    # -- the journal (journal.py, resume.py) ------------------------------

    def _journal(self, node: Node) -> None:
        """Record what node stands for now, for a successor server."""
        assert self.journal is not None
        if node.handle is None:
            try:
                node.handle = syscalls.name_to_handle(node.fd)
            except OSError:  # an inode no handle reaches: the successor cannot have it
                return
        parent = node.parent.nodeid if node.parent is not None else 0
        self.journal.node(node.nodeid, parent, node.handle, node.name)

    def _journal_records(self) -> Iterator[NodeRecord]:
        seen: set[int] = set()
        for known in list(self.by_nodeid.values()):
            node: Node | None = known
            while node is not None and node.nodeid not in seen:
                seen.add(node.nodeid)
                if node.handle is not None:
                    parent = node.parent.nodeid if node.parent is not None else 0
                    yield NodeRecord(node.nodeid, parent, node.handle, node.name)
                node = node.parent  # kept for the link break even when forgotten

    def resume(self, records: dict[int, NodeRecord]) -> int:
        """Take over the node ids a dead server gave the kernel (resume.py); how many of
        them could not be reopened (their inodes are gone: requests for them fail)."""
        lost = 0
        for record in records.values():
            if record.nodeid == ROOT_NODEID:
                continue
            try:
                fd = syscalls.open_by_handle(self.mount_fd, record.handle, os.O_PATH | os.O_CLOEXEC)
            except OSError:
                lost += 1
                continue
            st = os.fstat(fd)
            node = Node(self, record.nodeid, fd, st, None, record.name)
            node.handle = record.handle
            self.by_nodeid[node.nodeid] = node
            self.by_key.setdefault(node.key, node)
            self._admit(node)
        for record in records.values():
            resumed = self.by_nodeid.get(record.nodeid)
            if resumed is not None and resumed is not self.root:
                resumed.parent = self.by_nodeid.get(record.parent)
        return lost

    def remember(self, fd: int, st: os.stat_result, parent: Node, name: bytes) -> Node:
        """The node for an inode just reached by (parent, name), its lookup count raised by one.

        Takes ownership of fd: closed if the inode was known already.
        """
        node = self.by_key.get((st.st_dev, st.st_ino))
        if node is None:
            node = self.add(fd, st, parent, name)
        else:
            os.close(fd)
            self.renamed(node, parent, name)
        node.nlookup += 1
        return node

    def child(self, parent: Node, name: bytes) -> tuple[os.stat_result | None, Node | None]:
        """What parent/name reaches now, and its node if the kernel knows it."""
        try:
            st = os.stat(name, dir_fd=parent.fd, follow_symlinks=False)
        except FileNotFoundError:
            return None, None
        return st, self.find(st)

    def listed(
        self, directory: Node, dev: int, name: bytes, ino: int
    ) -> tuple[Node, os.stat_result, bool] | None:
        """The node and attributes of a listed entry, and whether the node is new; None if gone.

        A new node has lookup count 0: the caller counts it once the kernel has it.
        """
        known = self.by_key.get((dev, ino))
        try:
            if known is not None:
                st = os.stat(name, dir_fd=directory.fd, follow_symlinks=False)
                if (st.st_dev, st.st_ino) == known.key:
                    return known, st, False
            fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=directory.fd)
        except FileNotFoundError:
            return None  # removed since the batch was read
        st = os.fstat(fd)
        node = self.find(st)
        if node is not None:
            os.close(fd)
            return node, st, False
        return self.add(fd, st, directory, name), st, True

    def forget(self, nodeid: int, count: int) -> None:
        """Lower a lookup count; at zero the kernel no longer knows the node."""
        node = self.by_nodeid.get(nodeid)
        if node is None or node is self.root:
            return
        node.nlookup -= count
        if node.nlookup <= 0:
            self.drop(node)

    def drop(self, node: Node) -> None:
        """Remove a node from the table and close its fd.

        A directory may live on as the parent of a node still known (the link
        break needs it), so it keeps a file handle to come back by.
        """
        if self.by_nodeid.get(node.nodeid) is node:
            del self.by_nodeid[node.nodeid]
            if self.journal is not None:
                self.journal.forgotten(node.nodeid)
        if self.by_key.get(node.key) is node:
            del self.by_key[node.key]
        if node._fd < 0 or node.pins:
            return
        if node.is_dir and node.handle is None and not self._can_reopen(node):
            return  # keep the fd: nothing else could bring the directory back
        self._open.pop(node, None)
        fd, node._fd = node._fd, -1
        os.close(fd)

    def repoint(self, node: Node, fd: int, st: os.stat_result) -> None:
        """Make node stand for another backing inode (after a link break); takes fd."""
        if self.by_key.get(node.key) is node:
            del self.by_key[node.key]
        old_fd = node._fd
        node._fd = fd
        node.handle = None
        node.key = (st.st_dev, st.st_ino)
        self.by_key[node.key] = node
        if old_fd >= 0:
            os.close(old_fd)
        else:
            self._admit(node)
        self.touch(node)
        if self.journal is not None:
            self._journal(node)

    def renamed(self, node: Node, parent: Node, name: bytes) -> None:
        """Record that node is now reached by (parent, name) (a lookup, a rename, a link).

        A file's name it was known by before is kept as an alias: it may be a
        hard link the kernel still reaches it by.
        """
        if node.is_dir:
            changed = node.parent is not parent
            node.parent, node.name = parent, None
            if changed and self.journal is not None:
                self._journal(node)
            return
        old_parent, old_name = node.parent, node.name
        if self.journal is not None and (old_parent is not parent or old_name != name):
            node.parent, node.name = parent, name
            self._journal(node)
        if (
            old_parent is not None
            and old_name is not None
            and (old_parent is not parent or old_name != name)
        ):
            _add_alias(node, (old_parent.nodeid, old_name))
        node.parent, node.name = parent, name
        _drop_alias(node, (parent.nodeid, name))

    def linked(self, node: Node, parent: Node, name: bytes) -> None:
        """Record a new name (a hard link) of node: its name if it had none, else an alias."""
        if node.name is None:
            self.renamed(node, parent, name)
        elif not node.is_dir:
            _add_alias(node, (parent.nodeid, name))

    def unlinked(self, node: Node, parent: Node, name: bytes) -> None:
        """Record that (parent, name) no longer reaches node."""
        if node.parent is parent and (node.is_dir or node.name == name):
            node.parent, node.name = None, None  # a directory has one name
        else:
            _drop_alias(node, (parent.nodeid, name))

    def name_reaching(self, node: Node, st: os.stat_result) -> tuple[Node, bytes] | None:
        """A (parent, name) of the guest's that reaches node's inode (st) now: its last known
        name, else one of its aliases (which then becomes its name); None if none does."""
        if _reaches(node.parent, node.name, st):
            assert node.parent is not None and node.name is not None
            return node.parent, node.name
        for parent_id, name in node.aliases or ():
            parent = self.by_nodeid.get(parent_id)
            if parent is not None and _reaches(parent, name, st):
                _drop_alias(node, (parent_id, name))
                node.parent, node.name = parent, name
                return parent, name
        return None


_MAX_ALIASES = 8  # names of one inode remembered beside its last one


def _add_alias(node: Node, alias: tuple[int, bytes]) -> None:
    _drop_alias(node, alias)
    node.aliases = [*(node.aliases or ()), alias][-_MAX_ALIASES:]


def _drop_alias(node: Node, alias: tuple[int, bytes]) -> None:
    if node.aliases and alias in node.aliases:
        node.aliases = [a for a in node.aliases if a != alias] or None


def _reaches(parent: Node | None, name: bytes | None, st: os.stat_result) -> bool:
    """True if parent/name still reaches the backing inode st describes."""
    if parent is None or name is None:
        return False
    try:
        now = os.stat(name, dir_fd=parent.fd, follow_symlinks=False)
    except OSError:
        return False
    return (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino)
