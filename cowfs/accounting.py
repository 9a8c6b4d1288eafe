"""Keeping a mounted guest's usage exact, operation by operation.

The FUSE handlers tell the accountant what they are about to do (it refuses,
through the guest's DiskPolicy, what would exceed a limit or quota) and what
the backing filesystem then really did: blocks are measured with fstat before
and after, never guessed, so the counters stay equal to what a scan of the
backing tree finds (usage.py's rule: every private inode once, shared files not).
"""

from __future__ import annotations

import os
import stat

from cowfs.limits import DiskPolicy

BLOCK = 512
_DIR_BLOCK = 4096  # what a new directory takes on ext4/xfs: checked before mkdir


def _allocated(st: os.stat_result) -> int:
    return st.st_blocks * BLOCK


class Accountant:
    """The bridge between FUSE operations and a guest's usage and policy."""

    def __init__(self, policy: DiskPolicy):
        self.policy = policy

    # -- growth of an existing file -------------------------------------------

    def before_write(self, fd: int, caller_uid: int, offset: int, length: int) -> os.stat_result:
        """Refuse a write that could exceed a limit; the file's stat, for after_change."""
        st = os.fstat(fd)
        if self.policy.active:
            end = offset + length
            overwrite = end <= st.st_size and _allocated(st) >= st.st_size
            estimate = 0 if overwrite else -(-length // 4096) * 4096
            self.policy.check(caller_uid, st.st_uid, st.st_gid, estimate, 0)
        return st

    def before_growth(self, fd: int, caller_uid: int, estimate: int) -> os.stat_result:
        """Refuse growing a file by about estimate bytes (fallocate, xattrs); its stat."""
        st = os.fstat(fd)
        self.policy.check(caller_uid, st.st_uid, st.st_gid, estimate, 0)
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

    def before_new(self, caller_uid: int, uid: int, gid: int, kind: int) -> None:
        """Refuse creating an inode of kind (S_IFDIR, S_IFREG, ...) that would exceed a limit."""
        estimate = _DIR_BLOCK if kind == stat.S_IFDIR else 0
        self.policy.check(caller_uid, uid, gid, estimate, 1)

    def new(self, st: os.stat_result) -> None:
        """Charge a new inode."""
        self.policy.charge(st.st_uid, st.st_gid, _allocated(st), 1)

    def private_copy(self, caller_uid: int, shared: os.stat_result, with_data: bool) -> None:
        """Refuse a link break whose private copy would exceed a limit."""
        estimate = _allocated(shared) if with_data else 0
        self.policy.check(caller_uid, shared.st_uid, shared.st_gid, estimate, 1)

    # -- removals ---------------------------------------------------------

    def removed(self, st: os.stat_result) -> None:
        """Credit an inode whose last link went (st as it was before)."""
        self.policy.charge(st.st_uid, st.st_gid, -_allocated(st), -1)

    # -- directories changing size ---------------------------------------

    def dir_before(self, dir_fd: int) -> os.stat_result:
        """A directory's stat before entries are added or removed."""
        return os.fstat(dir_fd)

    def dir_after(self, dir_fd: int, before: os.stat_result) -> None:
        """Charge a directory's growth (or shrinking) after entries changed."""
        self.after_change(dir_fd, before)


def last_link(st: os.stat_result) -> bool:
    """True if removing one name frees the inode (directories: always, they have one)."""
    return stat.S_ISDIR(st.st_mode) or st.st_nlink == 1
