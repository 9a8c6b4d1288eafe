"""FUSE passthrough: guests reading a shared file share one page cache, as one inode did.

Without it every mount caches its own copy of each file it reads, on top of
the backing file's: N guests reading a shared library cost N+1 copies of its
pages. With it (Linux 6.9+, libfuse 3.17+) the kernel serves an open file
from a backing file the server registered (a *backing id*): reads, splice and
mmap go to the backing inode, whose pages every guest sharing it then maps,
and no read reaches this server.

The kernel allows one backing file per FUSE inode at a time, and no other
kind of open of that inode while it has one. What is passed through, and why:

* every read-only open of a regular file, shared or private, unless the node
  has other opens already (a writer this server serves: the kernel would
  refuse the mix, and the open is served as before until they close);
* a write open of a **private** file that has passthrough readers: served
  with their backing id (the guest's own inode) in direct-I/O mode, so that
  write(2) still comes to this server (limits, quota), while mappings share
  the one inode. A write open of a private file with no such readers is
  served as before;
* never a write open of a **shared** file. It must break the link first, and
  its readers' backing file is the shared inode (a writable shared mapping
  would write into it). While a shared file has passthrough readers, anything
  that would change its data (a write open, O_TRUNC, a truncate) is refused
  with ETXTBSY ("text file busy", what Linux answers for a running program's
  file) instead of breaking the link under them: no reader ever sees data
  other than the file's. A change of metadata only (chmod, chown, utimes,
  xattrs) breaks the link as usual; the readers' backing inode then still
  holds the same data, and a writer waits for them as for a shared file.

Reading through the kernel marks the backing file accessed, which would move
the atime every sharer sees: the file registered is opened from a copy of the
tree's mount with noatime, attached nowhere (open_tree).

Backing ids belong to the FUSE connection, not to this process: each open
file's id is journaled with it (journal.py), so that a successor server
(resume.py) reuses them and closes each at its node's last release.

Where the kernel or the pyfuse3 build cannot do it, or the backing filesystem
refuses (stacked too deep: ELOOP), cowfs serves reads itself as before and
says so once in its log.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from typing import TYPE_CHECKING

import pyfuse3
from pyfuse3 import FUSEError

from cowfs.tree.marks import is_marked
from native import syscalls

if TYPE_CHECKING:
    from cowfs.serve.inodes import Key, Node

log = logging.getLogger(__name__)

# An open the kernel would refuse to pass through: registering fails for the whole mount.
_MOUNT_WIDE_ERRORS = {errno.EPERM, errno.ELOOP, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOTTY}


def available() -> str | None:
    """None if this pyfuse3 can pass files through, else why not."""
    if not getattr(pyfuse3, "passthrough_available", lambda: False)():
        return "pyfuse3 is built against a libfuse older than 3.17 (tools/install.sh builds 3.17)"
    return None


class Backing:
    """A node's backing id while it has passthrough opens."""

    __slots__ = ("backing_id", "key", "opens")

    def __init__(self, backing_id: int, key: Key | None):
        self.backing_id = backing_id
        # The backing inode registered; None if not known (taken over from a dead server).
        self.key = key
        self.opens = 0


class Passthrough:
    """Which opens the kernel serves from backing files, and the backing ids they use."""

    def __init__(self, wanted: bool, tree_fd: int):
        """tree_fd: the backing tree's root (any fd on its filesystem)."""
        why_not = available() if wanted else "turned off for this mount"
        self._mount = self._tree = -1
        if why_not is None:
            # The kernel reads a passthrough file through the file the server registers:
            # opened from a copy of the tree's mount that has noatime, so that no guest's
            # read moves the atime every sharer sees. The copy is attached nowhere.
            try:
                self._mount = syscalls.detached_noatime_mount(tree_fd)  # kept: it is the mount
                # open_by_handle_at wants a real fd, not open_tree's O_PATH one.
                self._tree = os.open(
                    ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=self._mount
                )
            except OSError as e:
                why_not = f"no detached noatime mount of the tree ({e.strerror})"
        self.wanted = wanted and why_not is None
        if wanted and why_not is not None:
            log.warning("FUSE passthrough unavailable: %s; reads go through this server", why_not)
        self._negotiated: bool | None = None  # known once the kernel answered FUSE_INIT
        self._backing: dict[Node, Backing] = {}
        # Nodes written through a passthrough open: the kernel's own page cache of the
        # node may be stale, so its next served open must not keep it.
        self._written: set[Node] = set()
        self.opens = 0  # passthrough opens so far (stats.py)
        self.session: pyfuse3.Session | None = None  # the mount's FUSE connection, once open

    @property
    def enabled(self) -> bool:
        """True if this mount passes opens through (asked for and granted at FUSE_INIT)."""
        if self._negotiated is None:
            if not self.wanted:
                self._negotiated = False
            else:
                info = self.session.conn_info() if self.session is not None else None
                self._negotiated = bool((info or {}).get("passthrough"))
                if not self._negotiated:
                    log.warning(
                        "FUSE passthrough: the kernel did not offer it (Linux 6.9+ with"
                        " CONFIG_FUSE_PASSTHROUGH); reads go through this server"
                    )
        return self._negotiated

    def _disable(self, why: str) -> None:
        log.warning("FUSE passthrough off for this mount: %s; reads go through this server", why)
        self._negotiated = False

    def backing_for_reader(self, node: Node, other_opens: bool, breaking: bool) -> int:
        """The backing id a new read-only open of node is served from, or 0 for none.

        other_opens: node has open files that are not passed through (the
        kernel refuses to mix); breaking: a link break of node is under way
        (its writer's open must not meet a passthrough reader).
        """
        entry = self._backing.get(node)
        if entry is not None:
            return entry.backing_id
        if not self.enabled or other_opens or breaking or node.is_dir:
            return 0
        try:
            # Kept for the node's next opens: it is its current inode's until a link
            # break, where InodeTable.repoint clears it.
            if node.handle is None:
                node.handle = syscalls.name_to_handle(node.fd)
            fd = syscalls.open_by_handle(self._tree, node.handle, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:  # no file handle reaches it: served as before
            return 0
        try:
            assert self.session is not None  # enabled: the kernel answered its INIT
            backing_id = self.session.passthrough_open(fd)  # the kernel keeps its own reference
        except OSError as e:
            if e.errno in _MOUNT_WIDE_ERRORS:
                self._disable(f"the kernel refused a backing file: {e.strerror}")
            return 0
        finally:
            os.close(fd)
        self._backing[node] = Backing(backing_id, node.key)
        return backing_id

    def backing_for_writer(self, node: Node) -> int:
        """The backing id a write open of node shares with its passthrough readers, 0 if it
        has none (served as before); ETXTBSY if its readers' inode is not the node's
        private one (a shared file, or one whose link broke under them)."""
        entry = self._backing.get(node)
        if entry is None:
            return 0
        if entry.key != node.key or is_marked(node.fd):
            raise FUSEError(errno.ETXTBSY)
        self._written.add(node)
        return entry.backing_id

    def refuse_data_change(self, node: Node) -> None:
        """ETXTBSY if node's data may not change now (a truncate): its passthrough
        readers' inode is not the node's private one."""
        entry = self._backing.get(node)
        if entry is not None and (entry.key != node.key or is_marked(node.fd)):
            raise FUSEError(errno.ETXTBSY)

    def may_keep_cache(self, node: Node) -> bool:
        """False once for a node written through passthrough: the next open served as
        before must not keep the kernel's cached pages of it."""
        if node in self._written:
            self._written.discard(node)
            return False
        return True

    def opened(self, node: Node, backing_id: int, known: bool = True) -> None:
        """An open of node was answered with backing_id (> 0); known=False: by a dead
        server, whose backing inode is not known."""
        entry = self._backing.get(node)
        if entry is None:
            entry = self._backing[node] = Backing(backing_id, node.key if known else None)
        entry.opens += 1
        self.opens += 1

    def released(self, node: Node) -> None:
        """A passthrough open of node was released: at its last, the backing id goes."""
        entry = self._backing.get(node)
        if entry is None:
            return
        entry.opens -= 1
        if entry.opens <= 0:
            del self._backing[node]
            try:
                if self.session is not None:
                    self.session.passthrough_close(entry.backing_id)
            except OSError as e:  # the connection is ending: the kernel drops it anyway
                log.debug("closing backing id %d: %s", entry.backing_id, e)

    def close(self) -> None:
        """Drop what the mount holds (its connection has ended; its server goes on)."""
        self._backing.clear()
        self._written.clear()
        for fd in (self._tree, self._mount):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._tree = self._mount = -1

    def forsake(self, node: Node) -> None:
        """node got a backing id for an open that did not happen: drop the id unless used."""
        entry = self._backing.get(node)
        if entry is not None and entry.opens == 0:
            entry.opens = 1
            self.released(node)
