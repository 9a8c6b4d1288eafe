"""Host-side readers of guest trees cannot be hung, crashed or pointed at host files by a guest.

Issue 13, hole 8: a guest's root shapes its tree as it likes. The admin tools
that read it (cowfs du, quota report, hashify, clone, the accounting scan and
the crash sweep of a mount) must open only regular files, never block, never
follow the guest's symlinks, and walk any tree within a fixed number of fds
(a service started by systemd gets 1,024).
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import COWFS, Mounts, cowfs, run

from cowfs.tree.walk import remove_tree, walk

FD_LIMIT = "--nofile=1024:1024"
DEPTH = 2000
WIDTH = 1100
LINK = "ddd"  # each step of the chain: 2,000 of them make a path longer than PATH_MAX


def limited(
    *args: str | os.PathLike[str], timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run the cowfs CLI with the fd limit systemd gives a service."""
    argv = ["prlimit", FD_LIMIT, COWFS, *map(str, args)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)


def bottom_of_chain(root: Path) -> int:
    """An O_PATH fd on the deepest directory of root's chain."""
    fd = os.open(root / "deep", os.O_PATH | os.O_DIRECTORY)
    for _ in range(DEPTH):
        next_fd = os.open(LINK, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
        os.close(fd)
        fd = next_fd
    return fd


def write_at(dir_fd: int, name: str, data: bytes) -> None:
    fd = os.open(f"/proc/self/fd/{dir_fd}/{name}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, data)
        os.utime(fd, ns=(0, 0))  # equal mtimes: hashify may unify equal files
    finally:
        os.close(fd)


@pytest.fixture
def shaped(tmp_path: Path) -> Iterator[Path]:
    """A tree with 1,100 subdirectories in one directory and a chain of them 2,000 deep.

    Equal files sit at the bottom of the chain and in the last wide directory.
    Removed with remove_tree at the end (pytest's own cleanup would recurse 2,000 deep).
    """
    root = tmp_path / "shaped"
    (root / "wide").mkdir(parents=True)
    for index in range(WIDTH):
        (root / "wide" / f"w{index}").mkdir()
    (root / "deep").mkdir()
    fd = os.open(root / "deep", os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(DEPTH):
        os.mkdir(LINK, dir_fd=fd)
        next_fd = os.open(LINK, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = next_fd
    content = os.urandom(100_000)
    write_at(fd, "bottom", content)
    os.close(fd)
    (root / "wide" / f"w{WIDTH - 1}" / "top").write_bytes(content)
    os.utime(root / "wide" / f"w{WIDTH - 1}" / "top", ns=(0, 0))
    try:
        yield root
    finally:
        parent = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for name in os.listdir(tmp_path):
                remove_tree(parent, name.encode())
        finally:
            os.close(parent)


def du_bytes(path: Path) -> int:
    return int(run("du", "-s", "-B1", path).stdout.split()[0])


def count_inodes(path: Path) -> int:
    return len(run("find", path).stdout.splitlines())


def test_du_walks_any_shape_within_the_fd_limit(shaped: Path) -> None:
    result = limited("du", "--json", shaped)
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)["guests"][0]
    assert figures["private_bytes"] == figures["apparent_bytes"] == du_bytes(shaped)
    assert figures["private_inodes"] == count_inodes(shaped) == 3 + WIDTH + DEPTH + 2


def test_the_mount_scan_and_crash_sweep_walk_any_shape_within_the_fd_limit(
    shaped: Path, tmp_path: Path, mounts: Mounts
) -> None:
    cowfs("limit", "set", shaped, "--space", "1G")  # no usage stored yet: the mount scans
    expected = (du_bytes(shaped), count_inodes(shaped))
    bottom = bottom_of_chain(shaped)
    try:
        write_at(bottom, ".cowfs~leftover", b"half a link break")
    finally:
        os.close(bottom)
    os.setxattr(shaped, "trusted.cowfs.dirty", b"1")  # as a killed mount leaves it: swept
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    log = tmp_path / "mount.log"
    result = subprocess.run(
        ["prlimit", FD_LIMIT, COWFS, "mount", "--log", str(log), str(shaped), str(mnt)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr + log.read_text()
    mounts.points.append(mnt)
    assert "recomputed by a scan" in log.read_text()
    assert "removed leftover" in log.read_text()
    shown = json.loads(cowfs("limit", "show", shaped, "--json").stdout)[0]
    assert (shown["used_bytes"], shown["used_inodes"]) == expected
    bottom = bottom_of_chain(shaped)
    try:
        assert os.listdir(f"/proc/self/fd/{bottom}") == ["bottom"]
    finally:
        os.close(bottom)
    mounts.umount(mnt)


def test_hashify_walks_any_shape_within_the_fd_limit(shaped: Path, tmp_path: Path) -> None:
    result = limited("hashify", "--json", "--store", tmp_path / "store", shaped)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["errors"] == []
    assert report["unified_files"] == 2 and report["new_store_entries"] == 1
    top = os.stat(shaped / "wide" / f"w{WIDTH - 1}" / "top")
    bottom = bottom_of_chain(shaped)
    try:
        deepest = os.stat("bottom", dir_fd=bottom)
    finally:
        os.close(bottom)
    assert top.st_ino == deepest.st_ino and top.st_nlink == 3


def test_clone_copies_any_shape_within_the_fd_limit(shaped: Path, tmp_path: Path) -> None:
    result = limited("clone", "--json", shaped, tmp_path / "copy")
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout)
    assert stats["directories"] == 2 + WIDTH + DEPTH
    listing = run("find", shaped, "-printf", "%P %y %m\n").stdout.splitlines()
    copied = run("find", tmp_path / "copy", "-printf", "%P %y %m\n").stdout.splitlines()
    assert sorted(copied) == sorted(listing)


def test_remove_tree_removes_any_shape_within_the_fd_limit(shaped: Path) -> None:
    code = (
        "import os, sys; from cowfs.tree.walk import remove_tree;"
        " fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY);"
        " remove_tree(fd, sys.argv[2].encode())"
    )
    python = str(Path(COWFS).parent / "python")
    run("prlimit", FD_LIMIT, python, "-c", code, shaped.parent, shaped.name, timeout=120)
    assert not shaped.exists()


# -- the guest's /etc/passwd ------------------------------------------------


HOST_SECRET = "intruder:x:1000:1000:read from the host:/:/bin/sh\n"


def host_file(tmp_path: Path) -> Path:
    """A host file a guest's symlink may point at: its name for uid 1000 must never be shown."""
    path = tmp_path / "host-passwd"
    path.write_text(HOST_SECRET)
    return path


def fifo(passwd: Path, tmp_path: Path) -> None:
    os.mkfifo(passwd)


def absolute_symlink(passwd: Path, tmp_path: Path) -> None:
    os.symlink(host_file(tmp_path), passwd)


def climbing_symlink(passwd: Path, tmp_path: Path) -> None:
    os.symlink("../" * 40 + str(host_file(tmp_path)).lstrip("/"), passwd)


def directory(passwd: Path, tmp_path: Path) -> None:
    passwd.mkdir()
    (passwd / "x").write_text(HOST_SECRET)


def huge_sparse_file(passwd: Path, tmp_path: Path) -> None:
    with open(passwd, "wb") as f:
        f.truncate(2**30)


@pytest.mark.parametrize(
    "replace", [fifo, absolute_symlink, climbing_symlink, directory, huge_sparse_file]
)
@pytest.mark.parametrize("command", [["quota", "report"], ["du", "--by-user"]])
def test_a_guests_passwd_that_is_no_regular_file_is_not_read(
    guest_tree: Path, tmp_path: Path, command: list[str], replace: object
) -> None:
    passwd = guest_tree / "etc" / "passwd"
    passwd.unlink()
    replace(passwd, tmp_path)  # type: ignore[operator]
    # A cap on memory: reading a 1 GiB file whole (or as one line) does not fit in it.
    argv = ["prlimit", "--as=629145600", COWFS, *command, str(guest_tree)]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 0, result.stderr
    assert "intruder" not in result.stdout  # the host's file was not read
    users = [line.split() for line in result.stdout.splitlines() if line.split()[:1] == ["user"]]
    assert ["user", "1000"] in [u[:2] for u in users]  # alice's home, shown by number
    assert "alice" not in [u[1] for u in users]
    assert any(line.split()[:2] == ["group", "alice"] for line in result.stdout.splitlines())
    warnings = result.stderr.splitlines()
    assert len(warnings) == 1 and warnings[0].startswith("cowfs: warning: "), result.stderr
    assert "/etc/passwd not read" in warnings[0]


def test_quota_set_names_an_unreadable_passwd_in_its_error(guest_tree: Path) -> None:
    passwd = guest_tree / "etc" / "passwd"
    passwd.unlink()
    os.mkfifo(passwd)
    result = subprocess.run(
        [COWFS, "quota", "set", str(guest_tree), "--user", "alice", "--space-hard", "1M"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr.startswith("cowfs: error: user 'alice': unknown")
    assert "not read" in result.stderr and result.stderr.count("\n") == 1


# -- the walk itself ----------------------------------------------------------


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd")) - 1  # not listdir's own


def test_walk_visits_each_directory_once_within_its_fd_budget(tmp_path: Path) -> None:
    # a comb: a chain 60 deep with a side directory holding a file at every level
    path = tmp_path / "comb"
    for _ in range(60):
        (path / "side").mkdir(parents=True)
        (path / "side" / "leaf").write_text("x")
        path = path / "next"
    path.mkdir()
    expected = sorted(
        b"/" + os.fsencode(os.path.relpath(d, tmp_path / "comb"))
        for d, _, _ in os.walk(tmp_path / "comb")
    )
    expected[0] = b""  # the root (b"/." sorts first)
    baseline = open_fds()
    root = os.open(tmp_path / "comb", os.O_PATH | os.O_DIRECTORY)
    entered: list[bytes] = []
    left: list[bytes] = []
    most = 0
    try:
        for listing in walk(root, leave=True, max_fds=4):
            most = max(most, open_fds() - baseline - 1)
            st = os.fstat(listing.fd)
            assert (st.st_dev, st.st_ino) == (listing.st.st_dev, listing.st.st_ino)
            if listing.leaving:
                # after everything below it
                assert all(p in left for p in entered if p.startswith(listing.path + b"/"))
                left.append(listing.path)
            else:
                entered.append(listing.path)
                names = sorted(e.name for e in listing.entries)
                assert names == sorted(os.listdir(f"/proc/self/fd/{listing.fd}"))
    finally:
        os.close(root)
    assert sorted(entered) == sorted(left) == expected
    assert len(entered) == 1 + 60 * 2
    assert entered[0] == left[-1] == b""
    assert most <= 4
    assert open_fds() == baseline


def test_walk_skips_a_directory_swapped_while_its_fd_was_let_go(tmp_path: Path) -> None:
    for name in ("y1", "y2"):
        (tmp_path / "t" / "x" / name).mkdir(parents=True)
    root = os.open(tmp_path / "t", os.O_RDONLY | os.O_DIRECTORY)
    errors: list[tuple[bytes, int | None]] = []
    seen: list[bytes] = []
    try:
        for listing in walk(
            root, on_error=lambda path, e: errors.append((path, e.errno)), max_fds=2
        ):
            seen.append(listing.path)
            if listing.path == b"/x/y1":  # x's fd was let go: the budget is the root and y1
                os.rename(tmp_path / "t" / "x", tmp_path / "t" / "x-old")
                (tmp_path / "t" / "x" / "y2").mkdir(parents=True)
    finally:
        os.close(root)
    assert errors == [(b"/x", errno.ESTALE)]
    assert seen == [b"", b"/x", b"/x/y1"]  # not the new x's y2, nor the old one


def test_a_guest_tree_of_any_shape_is_deleted_within_the_fd_limit(shaped: Path) -> None:
    """What contextd delete --remove-root calls: treelock.remove_tree."""
    code = "import sys; from cowfs.host.treelock import remove_tree; remove_tree(sys.argv[1])"
    python = str(Path(COWFS).parent / "python")
    run("prlimit", FD_LIMIT, python, "-c", code, shaped, timeout=120)
    assert not shaped.exists()
