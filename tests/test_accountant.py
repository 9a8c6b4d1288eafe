"""The accountant's context managers: checked before a change runs, charged what it did after.

Expected figures come from fstat of what the filesystem really holds, never
from the accountant. Everything on the test's own temporary directory, no mount.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from cowfs.accounting.accountant import Accountant
from cowfs.accounting.limits import DiskPolicy
from cowfs.accounting.usage import Usage
from cowfs.host.statedb import LimitRow

LONG = "n" * 200  # names long enough that a few dozen take a directory block


class Held:
    """An fd, as a node or an open file holds one."""

    def __init__(self, fd: int):
        self.fd = fd


def allocated(fd: int) -> int:
    return os.fstat(fd).st_blocks * 512


def accountant(space: int | None = None, used: int = 0) -> Accountant:
    return Accountant(DiskPolicy(Usage(bytes=used), LimitRow(space=space), []))


@pytest.fixture
def directory(tmp_path: Path) -> Iterator[Held]:
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield Held(fd)
    finally:
        os.close(fd)


@pytest.fixture
def file(tmp_path: Path) -> Iterator[Held]:
    fd = os.open(tmp_path / "file", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        yield Held(fd)
    finally:
        os.close(fd)


def test_a_write_is_charged_the_blocks_it_allocated(file: Held) -> None:
    acct = accountant()
    with acct.writing(file, 1000, 0, 65536):
        os.pwrite(file.fd, os.urandom(65536), 0)
    assert allocated(file.fd) >= 65536
    assert acct.policy.usage.bytes == allocated(file.fd)


def test_a_write_over_the_limit_is_refused_before_it_runs(file: Held) -> None:
    acct = accountant(space=8192, used=8192)
    ran = []
    with pytest.raises(OSError) as refused, acct.writing(file, 1000, 0, 4096):
        ran.append(True)
    assert refused.value.errno == errno.ENOSPC
    assert ran == []
    assert acct.policy.usage.bytes == 8192
    assert acct.policy.hits["space"] == 1


def test_a_change_that_fails_charges_nothing(file: Held) -> None:
    acct = accountant()
    with pytest.raises(RuntimeError), acct.change(file):
        os.pwrite(file.fd, os.urandom(16384), 0)
        raise RuntimeError("the operation failed after its backing change")
    assert allocated(file.fd) > 0
    assert acct.policy.usage.bytes == 0


def test_a_new_inode_is_charged_with_its_directory_growth(directory: Held) -> None:
    acct = accountant()
    dir_before = allocated(directory.fd)
    with acct.new_inode(directory, 0, 0, 0, stat.S_IFREG) as charge:
        # One name does not always take a directory block: 99 empty names beside
        # it do, and whatever grew the directory is charged with the new inode.
        for i in range(99):
            os.mknod(f"{LONG}{i}", stat.S_IFREG | 0o644, dir_fd=directory.fd)
        fd = os.open(LONG, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=directory.fd)
        os.write(fd, os.urandom(8192))
        charge(os.fstat(fd))
    try:
        assert allocated(fd) >= 8192
        growth = allocated(directory.fd) - dir_before
        assert growth > 0
        assert acct.policy.usage.bytes == growth + allocated(fd)
        assert acct.policy.usage.inodes == 1
    finally:
        os.close(fd)


def test_a_rename_within_one_directory_charges_its_growth_once(directory: Held) -> None:
    acct = accountant()
    before = allocated(directory.fd)
    with acct.renaming(directory, directory, 0, adds_name=True):
        # Names that take the directory more blocks: its growth is charged, once.
        for i in range(100):
            os.mknod(f"{LONG}{i}", stat.S_IFREG | 0o644, dir_fd=directory.fd)
    growth = allocated(directory.fd) - before
    assert growth > 0
    assert acct.policy.usage.bytes == growth


def test_a_new_name_is_refused_once_the_guest_is_at_its_limit(directory: Held) -> None:
    acct = accountant(space=4096, used=4096)
    with pytest.raises(OSError) as refused, acct.new_name(directory, 1000):
        os.mknod("never", stat.S_IFREG | 0o644, dir_fd=directory.fd)
    assert refused.value.errno == errno.ENOSPC
    assert not os.path.lexists(f"/proc/self/fd/{directory.fd}/never")
