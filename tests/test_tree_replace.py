"""cowfs.tree.replace: a link put over a name in one step, and nothing left behind when it fails."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from cowfs.tree.replace import link_inode_over, link_over


@pytest.fixture
def directory(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    (tmp_path / "target").write_bytes(b"old")
    (tmp_path / "source").write_bytes(b"new")
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield tmp_path, fd
    finally:
        os.close(fd)


def test_link_over_a_name_by_its_directory(directory: tuple[Path, int]) -> None:
    path, fd = directory
    link_over(fd, b"target", "source", source_dir_fd=fd)
    assert (path / "target").stat().st_ino == (path / "source").stat().st_ino
    assert (path / "target").read_bytes() == b"new"
    assert sorted(os.listdir(path)) == ["source", "target"]  # no temporary left


def test_link_over_never_follows_a_symlinked_source(directory: tuple[Path, int]) -> None:
    path, fd = directory
    os.symlink("source", path / "link")
    link_over(fd, b"target", "link", source_dir_fd=fd)
    assert (path / "target").is_symlink()  # the symlink itself was linked, not its target


def test_link_inode_over_puts_an_unnamed_file_in_place(directory: tuple[Path, int]) -> None:
    path, fd = directory
    unnamed = os.open(".", os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600, dir_fd=fd)
    try:
        os.write(unnamed, b"private copy")
        link_inode_over(unnamed, fd, b"target")
        assert (path / "target").stat().st_ino == os.fstat(unnamed).st_ino
    finally:
        os.close(unnamed)
    assert (path / "target").read_bytes() == b"private copy"
    assert sorted(os.listdir(path)) == ["source", "target"]


def test_a_failed_rename_leaves_the_name_and_no_temporary(directory: tuple[Path, int]) -> None:
    path, fd = directory
    (path / "subdir").mkdir()
    (path / "subdir" / "keep").write_bytes(b"kept")
    with pytest.raises(OSError) as raised:
        link_over(fd, b"subdir", "source", source_dir_fd=fd)  # a file cannot replace a directory
    assert raised.value.errno == errno.EISDIR
    assert (path / "subdir" / "keep").read_bytes() == b"kept"
    assert sorted(os.listdir(path)) == ["source", "subdir", "target"]
