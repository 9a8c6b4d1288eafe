"""Breaking COW links: a guest's first modification of a shared inode gets it a private copy.

The break of a node whose backing inode carries the COW mark:

1. make an unnamed private copy (O_TMPFILE) in the directory of the guest's
   name: content (reflink where possible, else in-kernel copy keeping holes),
   owner, mode, xattrs but the mark, timestamps; its data made durable no
   later than the rename (durability.py);
2. link it under a hidden temporary name and rename that over the guest's
   name (cowfs.tree.replace), so the name always reaches a complete file,
   old or new;
3. re-point the node (and the guest's open read-only handles) to the copy.

Where the guest's name is the inode's last link, the mark is just cleared.
Where the guest has no name left for the inode (unlinked while open), the
node is re-pointed to the unnamed copy: the guest's writes stay private. The
name replaced is the kernel's last known name of the inode, or, if that one
is gone, another it reached the inode by (a hard link: inodes.py's aliases).

A kill -9 at any point leaves the guest's name on the old or the new inode;
a temporary left behind is hidden from the guest and swept at the next
mount (recovery.py).
"""

from __future__ import annotations

import logging
import os
import stat

import trio

from cowfs.accounting.accountant import Accountant
from cowfs.serve.durability import CopySync, make_durable
from cowfs.serve.inodes import InodeTable, Node
from cowfs.serve.openfiles import OpenFiles
from cowfs.serve.workers import WorkerPool
from cowfs.tree.marks import clear_mark, fd_path, is_marked, mark_of
from cowfs.tree.metadata import copy_data, copy_metadata
from cowfs.tree.replace import link_inode_over

log = logging.getLogger(__name__)


def make_private_copy(
    dir_fd: int,
    src_fd: int,
    st: os.stat_result,
    with_data: bool,
    durability: CopySync = CopySync.FULL,
) -> int:
    """An unnamed copy of src (O_PATH fd) in directory dir_fd, without the mark; an O_RDWR fd.

    Copied data is made durable as durability says before the copy can replace
    the original, so that not even a power cut can leave the guest's name on a
    file whose data never reached the disk. A reflink or an empty copy needs
    nothing: the filesystem's journal orders it before the rename.

    Blocking: run it in a worker thread.
    """
    # O_TMPFILE (ext4, xfs, btrfs, tmpfs): a crash mid-copy leaves nothing behind.
    copy_fd = os.open(".", os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
    try:
        copied = False
        if with_data and st.st_size:
            src = os.open(fd_path(src_fd), os.O_RDONLY | os.O_NOATIME | os.O_CLOEXEC)
            try:
                copied = copy_data(src, copy_fd, st.st_size)
            finally:
                os.close(src)
        copy_metadata(src_fd, copy_fd, st)
        if copied:
            make_durable(copy_fd, durability)
    except BaseException:
        os.close(copy_fd)
        raise
    return copy_fd


class LinkBreaker:
    """Gives nodes private copies of shared inodes, one break per node at a time."""

    def __init__(
        self,
        table: InodeTable,
        workers: WorkerPool,
        open_files: OpenFiles,
        acct: Accountant,
        durability: CopySync = CopySync.FULL,
    ):
        self.table = table
        self.workers = workers
        self.acct = acct
        self.durability = durability
        self.open_files = open_files
        self.breaks = 0

    async def ensure_private(self, node: Node, caller_uid: int, with_data: bool = True) -> None:
        """Make node's backing inode private to this guest before it is modified.

        The copy is charged to the guest and may fail with its limit's error
        (the shared file stays untouched). with_data=False when the caller is
        about to truncate to zero anyway.
        """
        if not stat.S_ISREG(os.fstat(node.fd).st_mode) or not is_marked(node.fd):
            return
        lock = node.break_lock
        if lock is None:
            lock = node.break_lock = trio.Lock()
        try:
            async with lock:
                if not is_marked(node.fd):  # another request broke it while we waited
                    return
                await self._break(node, caller_uid, with_data)
        finally:
            if not lock.locked():  # no request waits for it: not kept for the node's life
                node.break_lock = None

    async def _break(self, node: Node, caller_uid: int, with_data: bool) -> None:
        st = os.fstat(node.fd)
        if st.st_nlink == 1 and self.table.name_reaching(node, st) is not None:
            # The guest's name is the last link: nothing else shares it. If the
            # guest's usage still counts it as shared (the others left after its
            # last scan), the guest takes it over, as it would take a copy.
            if not self.acct.charges(st):
                self.acct.private_copy(caller_uid, st, with_data)
                self.acct.new(st)
            clear_mark(node.fd)
            self.acct.unmarked(st)
            return
        # The guest's name moves to the copy: if the guest is charged for the
        # shared inode and this was its last name of it, that charge goes.
        takes_charge_off = self.acct.leaves(st, mark_of(node.fd))
        self.acct.private_copy(caller_uid, st, with_data and not takes_charge_off)
        # The copy is made beside the guest's name it will replace (one of its hard
        # links', if the kernel's last known name of it is gone).
        reached = self.table.name_reaching(node, st)
        home = reached[0] if reached is not None else self.table.root
        with self.table.pinned(home, node):
            copy_fd = await self.workers.run(
                make_private_copy, home.fd, node.fd, st, with_data, self.durability
            )
        try:
            # Back on the event loop: no other request runs until we are done,
            # so the check and the rename below see the same guest tree.
            reached = self.table.name_reaching(node, st)
            if reached is not None:
                parent, name = reached
                link_inode_over(copy_fd, parent.fd, name)
                if takes_charge_off:
                    self.acct.removed(st)
            new_st = os.fstat(copy_fd)
            self.acct.new(new_st)
            path_fd = os.open(fd_path(copy_fd), os.O_PATH | os.O_CLOEXEC)
            self.table.repoint(node, path_fd, new_st)
            self.open_files.repoint(node, copy_fd)
            self.breaks += 1
            log.debug("broke link of %r", node)
        finally:
            os.close(copy_fd)
