"""Keeping a mounted guest's usage exact, operation by operation.

A FUSE handler runs its change of the backing tree inside one of the
accountant's context managers: on entry it refuses, through the guest's
DiskPolicy, what would exceed a limit or quota; when the change is done it
charges what the backing filesystem really did. Blocks are measured with fstat
before and after, never guessed, so the counters stay equal to what a scan of
the backing tree finds (usage.py's rule: every private inode once, shared files
not). A change that fails charges nothing.

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

import contextlib
import os
import stat
from collections.abc import Callable, Iterator
from typing import Protocol

from cowfs.accounting.limits import DiskPolicy
from cowfs.tree.marks import COW_MARK, store_links
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


class HasFd(Protocol):
    """What reaches a backing inode through an fd: a node (which may reopen it), an open file."""

    @property
    def fd(self) -> int: ...


class Accountant:
    """The bridge between FUSE operations and a guest's usage and policy."""

    def __init__(self, policy: DiskPolicy):
        self.policy = policy

    # -- growth of an existing file -------------------------------------------

    @contextlib.contextmanager
    def writing(self, file: HasFd, caller_uid: int, offset: int, length: int) -> Iterator[None]:
        """Around a write of bytes [offset, offset + length) of file."""
        fd = file.fd
        before = os.fstat(fd)
        if self.policy.active:
            self._check_range(fd, before, caller_uid, offset, length)
        yield
        self._charge_change(file, before)

    @contextlib.contextmanager
    def allocating(
        self, file: HasFd, caller_uid: int, mode: int, offset: int, length: int
    ) -> Iterator[None]:
        """Around an fallocate(2) of file: checked as a write of its range unless it frees space."""
        freeing = mode & (_FALLOC_PUNCH_HOLE | _FALLOC_COLLAPSE_RANGE)
        with self.writing(file, caller_uid, offset, 0 if freeing else length):
            yield

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

    @contextlib.contextmanager
    def growth(self, file: HasFd, caller_uid: int, estimate: int) -> Iterator[None]:
        """Around growing file by about estimate bytes (an xattr: it may take a block)."""
        before = os.fstat(file.fd)
        self.policy.check(caller_uid, before.st_uid, before.st_gid, max(estimate, _NEW_NAME), 0)
        yield
        self._charge_change(file, before)

    @contextlib.contextmanager
    def change(self, file: HasFd) -> Iterator[None]:
        """Around a change that allocates nothing by itself (truncate, removing an xattr)."""
        before = os.fstat(file.fd)
        yield
        self._charge_change(file, before)

    def _charge_change(self, file: HasFd, before: os.stat_result) -> None:
        """Charge what file's allocation really changed by since before."""
        after = os.fstat(file.fd)
        delta = _allocated(after) - _allocated(before)
        if delta:
            self.policy.charge(after.st_uid, after.st_gid, delta, 0)

    @contextlib.contextmanager
    def chown(self, file: HasFd, uid: int, gid: int) -> Iterator[None]:
        """Around a chown to uid:gid (-1: unchanged): the inode's usage moves to its new owner.

        Refused if the new owner's quota cannot take it.
        """
        before = os.fstat(file.fd)
        if self.policy.quotas:
            new_uid = before.st_uid if uid == -1 else uid
            new_gid = before.st_gid if gid == -1 else gid
            self.policy.check_quota(new_uid, new_gid, _allocated(before), 1)
        yield
        after = os.fstat(file.fd)
        if (before.st_uid, before.st_gid) == (after.st_uid, after.st_gid):
            return
        self.policy.charge(before.st_uid, before.st_gid, -_allocated(before), -1)
        self.policy.charge(after.st_uid, after.st_gid, _allocated(after), 1)

    # -- new inodes and names -------------------------------------------------

    @contextlib.contextmanager
    def new_inode(
        self,
        directory: HasFd,
        caller_uid: int,
        uid: int,
        gid: int,
        kind: int,
        data_bytes: int = 0,
    ) -> Iterator[Callable[[os.stat_result], None]]:
        """Around creating an inode of kind (S_IFDIR, S_IFREG, ...) owned by uid:gid in directory.

        data_bytes: what it holds from the start (a symlink's target). Gives the
        function that charges the new inode once made; the directory's growth
        is charged after.
        """
        estimate = max(_DIR_BLOCK if kind == stat.S_IFDIR else _NEW_NAME, data_bytes)
        self.policy.check(caller_uid, uid, gid, estimate, 1)
        dir_before = os.fstat(directory.fd)
        yield self.new
        self._charge_change(directory, dir_before)

    @contextlib.contextmanager
    def new_name(self, directory: HasFd, caller_uid: int) -> Iterator[None]:
        """Around adding a name (a link) to directory: refused once the guest is at its limit."""
        before = os.fstat(directory.fd)
        self._check_new_name(caller_uid, before)
        yield
        self._charge_change(directory, before)

    @contextlib.contextmanager
    def renaming(
        self, old_dir: HasFd, new_dir: HasFd, caller_uid: int, adds_name: bool
    ) -> Iterator[None]:
        """Around a rename from old_dir to new_dir; adds_name if no name in new_dir is replaced."""
        old_before = os.fstat(old_dir.fd)
        new_before = os.fstat(new_dir.fd)
        if adds_name:
            self._check_new_name(caller_uid, new_before)
        yield
        self._charge_change(old_dir, old_before)
        if new_dir is not old_dir:
            self._charge_change(new_dir, new_before)

    def _check_new_name(self, caller_uid: int, dir_st: os.stat_result) -> None:
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

    @contextlib.contextmanager
    def removing(self, directory: HasFd) -> Iterator[None]:
        """Around removing a name from directory: its shrinking (or growth) charged after."""
        before = os.fstat(directory.fd)
        yield
        self._charge_change(directory, before)

    def name_leaves(self, dir_fd: int, name: bytes, st: os.stat_result) -> bool:
        """True if removing dir_fd/name (st, as it is) takes its inode off the guest's usage."""
        mark = syscalls.xattr_at(dir_fd, name, COW_MARK) if stat.S_ISREG(st.st_mode) else None
        return self.leaves(st, mark)

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
