"""How a private copy's data reaches the disk before the copy replaces a guest's file.

A link break renames a private copy over the guest's name. After a power cut
the name must reach the old file or a complete copy, never a copy whose data
did not make it to the disk: the copy's data must be durable no later than the
rename. A reflink or an empty copy has no data of its own to write (its
extents are metadata, committed in order with the rename). A copied file's
data is made durable in one of two ways:

- ``FULL``: ``fdatasync`` the copy. Its data, its block allocation and a flush
  of the device's write cache, in a journal commit of its own: one per break
  (~0.4 ms each on the benchmark's ext4, most of a first write's cost).
- ``ORDERED``: write the copy's data and wait for it (``sync_file_range`` with
  WAIT_BEFORE | WRITE | WAIT_AFTER: the data half of ``fdatasync``), and let
  the filesystem's journal do the rest. Where every metadata change commits in
  order through one journal (ext4 with its internal journal, xfs, btrfs), the
  allocation of that data was logged, when the write finished, in the same
  transaction as the rename or an earlier one, and the commit that makes the
  rename durable first flushes the device's cache (REQ_PREFLUSH before the
  commit record), so that the data written before it are durable too.
  A kill -9 needs neither: the page cache outlives the process.

``NONE`` (``--no-sync-breaks``) writes nothing early: after a power cut a
guest's file may be a copy with no data (tests/test_power_cut.py shows both).
"""

from __future__ import annotations

import enum
import glob
import os

from cowfs.host import registry
from native import syscalls


class CopySync(enum.Enum):
    """What a link break does to make a private copy's data durable before its rename."""

    FULL = "synced by fdatasync"
    ORDERED = "written before the rename (the journal orders them)"
    NONE = "not synced"


_WRITE_AND_WAIT = (
    syscalls.SYNC_FILE_RANGE_WAIT_BEFORE
    | syscalls.SYNC_FILE_RANGE_WRITE
    | syscalls.SYNC_FILE_RANGE_WAIT_AFTER
)


def make_durable(fd: int, mode: CopySync) -> None:
    """Make fd's copied data durable no later than a rename that follows, as mode says."""
    if mode is CopySync.FULL:
        os.fdatasync(fd)
    elif mode is CopySync.ORDERED:
        syscalls.sync_file_range(fd, 0, 0, _WRITE_AND_WAIT)


def for_backing(fd: int, sync: bool = True) -> CopySync:
    """The strongest-for-its-cost mode for the filesystem fd is on (NONE if not sync)."""
    if not sync:
        return CopySync.NONE
    dev = os.fstat(fd).st_dev
    mounted = registry.filesystem_of(dev)
    if mounted is None:
        return CopySync.FULL
    fstype, super_options = mounted
    if fstype in ("xfs", "btrfs"):
        return CopySync.ORDERED
    # ext4 without a journal (mkfs -O ^has_journal; this VM's root filesystem has
    # none), with one on another device, or committing asynchronously: no order to
    # rely on, so fdatasync.
    if (
        fstype in ("ext4", "ext3")
        and "journal_async_commit" not in super_options
        and has_internal_journal(dev)
    ):
        return CopySync.ORDERED
    return CopySync.FULL


def has_internal_journal(dev: int) -> bool:
    """True if jbd2 runs a journal kept inside block device dev (ext3/ext4)."""
    try:
        device = os.path.basename(os.readlink(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}"))
    except OSError:  # not a block device (tmpfs, FUSE, NFS, ...)
        return False
    # jbd2 names an internal journal "<device>-<journal inode>" (loop0-8, vda1-8);
    # an external one by its own device, without the inode.
    return bool(glob.glob(f"/proc/fs/jbd2/{glob.escape(device)}-*"))
