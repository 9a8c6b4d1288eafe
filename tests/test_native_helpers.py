"""native helpers: hashify's FileProbe (open, stat, xattr names, read at once), xattr_at."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from native.syscalls import FileProbe, xattr_at, xattr_via_proc

READ = os.O_RDONLY | os.O_NOFOLLOW


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "small").write_bytes(b"hello world")
    (tmp_path / "d" / "empty").write_bytes(b"")
    (tmp_path / "d" / "fits").write_bytes(b"x" * 15)
    (tmp_path / "d" / "full").write_bytes(b"y" * 16)
    os.symlink("small", tmp_path / "d" / "link")
    return tmp_path


def test_small_file_read_whole_with_its_stat(tree: Path) -> None:
    probe = FileProbe(16)
    os.chown(tree / "d" / "small", 1234, 5678)  # an owner no zeroed field could match
    os.chmod(tree / "d" / "small", 0o751)
    dirfd = os.open(tree, os.O_PATH)
    try:
        found = probe.probe(dirfd, b"d/small", READ)
        st = os.stat(tree / "d" / "small")
        assert (found.st_dev, found.st_ino, found.st_size) == (st.st_dev, st.st_ino, st.st_size)
        assert (found.st_mtime_ns, found.st_ctime_ns) == (st.st_mtime_ns, st.st_ctime_ns)
        assert (found.st_mode, found.st_uid, found.st_gid) == (st.st_mode, st.st_uid, st.st_gid)
        assert found.content_len == 11
        assert bytes(probe.content[: found.content_len]) == b"hello world"
        assert probe.probe(dirfd, b"d/empty", READ).content_len == 0
        # Up to capacity - 1 bytes are read; a file that fills the buffer is not.
        assert probe.probe(dirfd, b"d/fits", READ).content_len == 15
        assert probe.probe(dirfd, b"d/full", READ).content_len == -1
    finally:
        os.close(dirfd)


def test_xattr_names_listed_or_flagged_when_they_do_not_fit(tree: Path) -> None:
    target = tree / "d" / "small"
    os.setxattr(target, "user.first", b"1")
    os.setxattr(target, "user.second", b"2")
    dirfd = os.open(tree, os.O_PATH)
    try:
        probe = FileProbe(64)
        assert probe.probe(dirfd, b"d/empty", READ).names_len == 0
        assert probe.names() == []
        probe.probe(dirfd, b"d/small", READ)
        assert sorted(probe.names()) == [b"user.first", b"user.second"]
        tight = FileProbe(64, names_capacity=8)
        assert tight.probe(dirfd, b"d/small", READ).names_len == -1
    finally:
        os.close(dirfd)


@pytest.mark.parametrize(
    ("path", "code"),
    [(b"d/link", errno.ELOOP), (b"../etc/passwd", errno.EXDEV), (b"d/none", errno.ENOENT)],
)
def test_symlinks_escapes_and_missing_files_refused(tree: Path, path: bytes, code: int) -> None:
    dirfd = os.open(tree, os.O_PATH)
    try:
        with pytest.raises(OSError) as raised:
            FileProbe(64).probe(dirfd, path, READ)
        assert raised.value.errno == code
    finally:
        os.close(dirfd)


@pytest.mark.parametrize("lookup", [xattr_at, xattr_via_proc])
def test_xattr_at_reads_the_name_itself(
    tree: Path, lookup: Callable[[int, bytes, bytes], bytes | None]
) -> None:
    # xattr_via_proc is what xattr_at falls back to before Linux 6.13.
    os.setxattr(tree / "d" / "small", "user.mark", b"s")
    os.setxattr(tree / "d" / "empty", "user.long", b"v" * 100)
    dirfd = os.open(tree / "d", os.O_PATH | os.O_DIRECTORY)
    try:
        assert lookup(dirfd, b"small", b"user.mark") == b"s"
        assert lookup(dirfd, b"small", b"user.other") is None
        assert lookup(dirfd, b"empty", b"user.mark") is None
        assert lookup(dirfd, b"link", b"user.mark") is None  # the symlink, not its target
        with pytest.raises(FileNotFoundError):
            lookup(dirfd, b"none", b"user.mark")
        with pytest.raises(OSError) as too_long:
            lookup(dirfd, b"empty", b"user.long")  # more than the 64 bytes asked for
        assert too_long.value.errno == errno.ERANGE
    finally:
        os.close(dirfd)


def test_probe_reads_nothing_but_a_regular_file(tree: Path) -> None:
    os.mkfifo(tree / "d" / "fifo")
    dirfd = os.open(tree, os.O_PATH)
    try:
        found = FileProbe(64).probe(dirfd, b"d/fifo", READ | os.O_NONBLOCK)
        assert found.st_ino == os.lstat(tree / "d" / "fifo").st_ino
        assert (found.content_len, found.names_len) == (-1, -1)
    finally:
        os.close(dirfd)
