"""Keeping a mounted guest's usage exact, operation by operation.

The FUSE handlers tell the accountant what they are about to do (it refuses,
through the guest's DiskPolicy, what would exceed a limit or quota) and what
the backing filesystem then really did: blocks are measured with fstat before
and after, never guessed, so the counters stay equal to what a scan of the
backing tree finds (usage.py's rule: every private inode once, shared files not).

Every operation that can allocate is checked first. A write or fallocate is
checked as if each block of its range were new; only where that would be
refused is the range's real allocation looked up, so a write into a hole
costs its blocks whatever the file's size and st_blocks say, and a write
into space fallocate reserved costs nothing, at the limit too. An operation
that adds a name (a new inode, a link, a rename to a new name) may grow its
directory by a block: it is refused once the guest has reached its limit.
Blocks the filesystem adds for its own bookkeeping (extent tree blocks) are
charged when they appear, not estimated.
"""

from __future__ import annotations

import os
import stat

from cowfs.accounting.limits import DiskPolicy
from cowfs.tree.marks import store_links
from native import syscalls

BLOCK = 512
_DATA_BLOCK = 4096  # the allocation unit estimates assume (ext4, xfs)
_DIR_BLOCK = 4096  # what a new directory takes on ext4/xfs: checked before mkdir
# The least a new name is checked for: it may need a new directory block, so
# nothing that adds one passes once the guest's usage has reached its limit.
_NEW_NAME = 1
_FALLOC_PUNCH_HOLE = 0x02
_FALLOC_COLLAPSE_RANGE = 0x08


def _allocated(st: os.stat_result) -> int:
    return st.st_blocks * BLOCK


def _block_span(offset: int, length: int) -> tuple[int, int]:
    """The whole data blocks [start, end) that bytes [offset, offset + length) touch."""
    start = offset - offset % _DATA_BLOCK
    end = -(-(offset + length) // _DATA_BLOCK) * _DATA_BLOCK
    return start, end


def unallocated_bytes(fd: int, offset: int, length: int) -> int:
    """Bytes of the data blocks [offset, offset + length) touches that fd has not allocated.

    Preallocated (unwritten) and not yet written back blocks count as
    allocated: st_blocks has them already. Where the filesystem cannot tell
    (no FIEMAP), every block counts as new.
    """
    start, end = _block_span(offset, length)
    try:
        found = syscalls.extents(fd, start, end - start)
    except OSError:
        return end - start
    covered = sum(max(0, min(end, at + size) - max(start, at)) for at, size in found)
    return end - start - covered


class Accountant:
    """The bridge between FUSE operations and a guest's usage and policy."""

    def __init__(self, policy: DiskPolicy):
        self.policy = policy

    # -- growth of an existing file -------------------------------------------

    def before_write(self, fd: int, caller_uid: int, offset: int, length: int) -> os.stat_result:
        """Refuse a write that could exceed a limit; the file's stat, for after_change."""
        st = os.fstat(fd)
        if self.policy.active:
            self._check_range(fd, st, caller_uid, offset, length)
        return st

    def before_allocate(
        self, fd: int, caller_uid: int, mode: int, offset: int, length: int
    ) -> os.stat_result:
        """Refuse an fallocate(2) that could exceed a limit; the file's stat, for after_change."""
        st = os.fstat(fd)
        freeing = mode & (_FALLOC_PUNCH_HOLE | _FALLOC_COLLAPSE_RANGE)
        if self.policy.active and not freeing:
            self._check_range(fd, st, caller_uid, offset, length)
        return st

    def _check_range(
        self, fd: int, st: os.stat_result, caller_uid: int, offset: int, length: int
    ) -> None:
        """Refuse allocating what bytes [offset, offset + length) of fd lack, if over a limit."""
        if length <= 0:
            return
        start, end = _block_span(offset, length)
        estimate = end - start  # as if every block were new: right unless near a limit
        policy = self.policy
        if policy.allows(caller_uid, st.st_uid, st.st_gid, estimate, 0):
            return
        if st.st_blocks:
            estimate = unallocated_bytes(fd, offset, length)
        policy.check(caller_uid, st.st_uid, st.st_gid, estimate, 0)

    def before_growth(self, fd: int, caller_uid: int, estimate: int) -> os.stat_result:
        """Refuse growing a file by about estimate bytes (an xattr); its stat."""
        st = os.fstat(fd)
        self.policy.check(caller_uid, st.st_uid, st.st_gid, max(estimate, _NEW_NAME), 0)
        return st

    def after_change(self, fd: int, before: os.stat_result) -> None:
        """Charge what a file's allocation really changed by."""
        after = os.fstat(fd)
        delta = _allocated(after) - _allocated(before)
        if delta:
            self.policy.charge(after.st_uid, after.st_gid, delta, 0)

    def chown(self, before: os.stat_result, uid: int, gid: int, caller_uid: int) -> None:
        """Refuse a chown the new owner's quota cannot take."""
        if self.policy.quotas:
            new_uid = before.st_uid if uid == -1 else uid
            new_gid = before.st_gid if gid == -1 else gid
            self.policy.check_quota(new_uid, new_gid, _allocated(before), 1)

    def chowned(self, before: os.stat_result, after: os.stat_result) -> None:
        """Move a private inode's usage to its new owner."""
        if (before.st_uid, before.st_gid) == (after.st_uid, after.st_gid):
            return
        self.policy.charge(before.st_uid, before.st_gid, -_allocated(before), -1)
        self.policy.charge(after.st_uid, after.st_gid, _allocated(after), 1)

    # -- new inodes -------------------------------------------------------

    def before_new(
        self, caller_uid: int, uid: int, gid: int, kind: int, data_bytes: int = 0
    ) -> None:
        """Refuse creating an inode of kind (S_IFDIR, S_IFREG, ...) that would exceed a limit.

        data_bytes: what it holds from the start (a symlink's target).
        """
        estimate = max(_DIR_BLOCK if kind == stat.S_IFDIR else _NEW_NAME, data_bytes)
        self.policy.check(caller_uid, uid, gid, estimate, 1)

    def before_new_name(self, caller_uid: int, dir_st: os.stat_result) -> None:
        """Refuse adding a name (link, rename) to a directory once the guest is at its limit."""
        self.policy.check(caller_uid, dir_st.st_uid, dir_st.st_gid, _NEW_NAME, 0)

    def new(self, st: os.stat_result) -> None:
        """Charge a new inode."""
        self.policy.charge(st.st_uid, st.st_gid, _allocated(st), 1)

    def private_copy(self, caller_uid: int, shared: os.stat_result, with_data: bool) -> None:
        """Refuse a link break whose private copy would exceed a limit.

        with_data=False: the copy is empty, or the guest is charged for the
        shared inode already and the break takes that charge off.
        """
        estimate = _allocated(shared) if with_data else 0
        self.policy.check(caller_uid, shared.st_uid, shared.st_gid, estimate, 1)

    # -- removals ---------------------------------------------------------

    def leaves(self, st: os.stat_result, mark: bytes | None) -> bool:
        """True if removing one of the guest's names of an inode takes it off the guest's usage.

        st is the inode as it was, mark its COW mark's value. A directory has one
        name; any other unmarked inode leaves with its last link. A marked one
        leaves only if the usage charges it (usage.py's own_marked: a scan found
        nobody but the guest and the store linking it) and this was the guest's
        last name, so that only the store's links remain. One whose other
        holders left after the scan was never charged, and gives nothing back.
        """
        if stat.S_ISDIR(st.st_mode):
            return True
        if mark is None:
            return st.st_nlink == 1
        return self.charges(st) and st.st_nlink - 1 == store_links(mark)

    def removed(self, st: os.stat_result) -> None:
        """Credit an inode that left the guest (st as it was before)."""
        self.policy.usage.own_marked.discard((st.st_dev, st.st_ino))
        self.policy.charge(st.st_uid, st.st_gid, -_allocated(st), -1)

    def charges(self, st: os.stat_result) -> bool:
        """True if the guest's usage charges this marked inode (its other holders were gone
        at the last scan)."""
        return (st.st_dev, st.st_ino) in self.policy.usage.own_marked

    def unmarked(self, st: os.stat_result) -> None:
        """An inode the guest is charged for lost its mark: it leaves with its last link now."""
        self.policy.usage.own_marked.discard((st.st_dev, st.st_ino))

    # -- directories changing size ---------------------------------------

    def dir_before(self, dir_fd: int) -> os.stat_result:
        """A directory's stat before entries are added or removed."""
        return os.fstat(dir_fd)

    def dir_after(self, dir_fd: int, before: os.stat_result) -> None:
        """Charge a directory's growth (or shrinking) after entries changed."""
        self.after_change(dir_fd, before)
