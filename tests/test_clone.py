"""cowfs clone: a new guest of COW hard links, exact metadata, and refusals that change nothing."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest
from conftest import COWFS, cowfs, is_marked, run, snapshot


def _rich_template(root: Path) -> Path:
    """A template with every kind of entry and unusual metadata."""
    root.mkdir()
    (root / "dir").mkdir(mode=0o750)
    os.chown(root / "dir", 1000, 50)
    os.setxattr(root / "dir", "user.dirattr", b"d")
    (root / "dir" / "file").write_bytes(b"content")
    os.chmod(root / "dir" / "file", 0o4711)
    os.chown(root / "dir" / "file", 1001, 1001)
    os.chmod(root / "dir" / "file", 0o4711)
    os.setxattr(root / "dir" / "file", "user.fileattr", b"f")
    os.link(root / "dir" / "file", root / "hardlink")
    os.symlink("dir/file", root / "symlink")
    os.chown(root / "symlink", 7, 8, follow_symlinks=False)
    os.mkfifo(root / "fifo", 0o620)
    os.mknod(root / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    (root / "empty").write_bytes(b"")
    weird = os.fsencode(root) + b"/name with\nnewline and \xff invalid utf8"
    with open(weird, "wb") as f:
        f.write(b"weird")
    deep = root
    for i in range(40):
        deep = deep / f"d{i}"
    deep.mkdir(parents=True)
    (deep / "leaf").write_text("deep")
    os.utime(root / "dir", ns=(1_000_000_000, 2_000_000_000))
    os.utime(root / "symlink", ns=(3_000_000_000, 4_000_000_000), follow_symlinks=False)
    return root


def test_clone_recreates_tree_with_shared_files(tmp_path: Path) -> None:
    template = _rich_template(tmp_path / "tpl")
    before = snapshot(template)
    result = cowfs("clone", "--json", template, tmp_path / "new")
    stats = json.loads(result.stdout)
    new = tmp_path / "new"
    assert snapshot(new) == before
    assert snapshot(template) == before  # only the (hidden) mark was added
    assert stats["linked_files"] == 5 and stats["symlinks"] == 1 and stats["special_files"] == 2
    for rel in (
        "dir/file",
        "hardlink",
        "empty",
        "d0/d1/d2/d3/d4/d5/d6/d7/d8/d9/d10/d11/d12/d13/d14/d15/d16/d17/d18/d19/d20/d21/d22/d23/d24/d25/d26/d27/d28/d29/d30/d31/d32/d33/d34/d35/d36/d37/d38/d39/leaf",
    ):
        assert (new / rel).stat().st_ino == (template / rel).stat().st_ino, rel
        assert is_marked(new / rel)
    assert (new / "hardlink").stat().st_ino == (new / "dir" / "file").stat().st_ino
    assert (new / "symlink").lstat().st_ino != (template / "symlink").lstat().st_ino
    assert os.getxattr(new / "dir", "user.dirattr") == b"d"
    st = (new / "dir").stat()
    assert (st.st_mode & 0o7777, st.st_uid, st.st_gid, st.st_mtime_ns) == (
        0o750,
        1000,
        50,
        2_000_000_000,
    )
    assert not any(name.startswith(".new.cowfs-clone") for name in os.listdir(tmp_path))


def test_clone_of_a_clone_shares_the_same_inodes(tmp_path: Path) -> None:
    template = _rich_template(tmp_path / "tpl")
    cowfs("clone", template, tmp_path / "a")
    cowfs("clone", tmp_path / "a", tmp_path / "b")
    assert (tmp_path / "b" / "dir" / "file").stat().st_ino == (
        template / "dir" / "file"
    ).stat().st_ino
    assert (template / "dir" / "file").stat().st_nlink == 6


@pytest.mark.parametrize(
    "case, message",
    [
        ("new-exists", "already exists"),
        ("template-missing", "no such directory"),
        ("template-is-file", "not a directory"),
        ("new-inside-template", "inside the template"),
        ("new-parent-is-a-file", "is not a directory"),
        ("other-filesystem", "another filesystem"),
    ],
)
def test_clone_refuses_bad_input_and_changes_nothing(
    tmp_path: Path, case: str, message: str
) -> None:
    template = _rich_template(tmp_path / "tpl")
    new = tmp_path / "new"
    if case == "new-exists":
        new.mkdir()
    elif case == "template-missing":
        template = tmp_path / "missing"
    elif case == "template-is-file":
        template = template / "dir" / "file"
    elif case == "new-inside-template":
        new = template / "dir" / "inner"
    elif case == "new-parent-is-a-file":
        (tmp_path / "plain").write_text("x")
        new = tmp_path / "plain" / "new"
    elif case == "other-filesystem":
        (tmp_path / "tmpfs").mkdir()
        run("mount", "-t", "tmpfs", "none", tmp_path / "tmpfs")
        new = tmp_path / "tmpfs" / "new"
    try:
        before = snapshot(tmp_path)
        result = cowfs("clone", template, new, check=False)
        assert result.returncode == 1
        assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
        assert result.stderr.startswith("cowfs: error: ")
        assert snapshot(tmp_path) == before
        if (tmp_path / "tpl" / "dir" / "file").exists():
            assert not is_marked(tmp_path / "tpl" / "dir" / "file")
    finally:
        if case == "other-filesystem":
            run("umount", tmp_path / "tmpfs")


def test_clone_makes_missing_parents_root_only(tmp_path: Path) -> None:
    template = _rich_template(tmp_path / "tpl")
    old_umask = os.umask(0)  # whatever the caller's umask, parents are 0700
    try:
        new = tmp_path / "no" / "such" / "new"
        cowfs("clone", template, new)
    finally:
        os.umask(old_umask)
    for made in (tmp_path / "no", tmp_path / "no" / "such"):
        st = made.stat()
        assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o700, 0), made
    assert (new / "dir" / "file").stat().st_ino == (template / "dir" / "file").stat().st_ino


def test_killed_clone_leaves_no_half_made_guest(tmp_path: Path) -> None:
    template = tmp_path / "tpl"
    template.mkdir()
    for i in range(200):
        sub = template / f"d{i}"
        sub.mkdir()
        for j in range(50):
            (sub / f"f{j}").write_text("x")
    killed_midway = 0
    for attempt, delay in enumerate((0.05, 0.1, 0.15, 0.2, 0.3, 0.6)):
        new = tmp_path / f"new{attempt}"
        proc = subprocess.Popen(
            [COWFS, "clone", str(template), str(new)], stdout=subprocess.DEVNULL
        )
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if new.exists():  # finished before the kill: then it is complete
            assert len(list(new.rglob("f*"))) == 200 * 50
        else:
            killed_midway += 1
        cowfs(
            "clone", template, tmp_path / "again"
        )  # sweeps dead clones' work dirs of "again" only
        run("rm", "-rf", tmp_path / "again")
    assert killed_midway > 0, "no kill landed during a clone: the test proves nothing"
    new = tmp_path / "new0"
    if not new.exists():
        cowfs("clone", template, new)  # a re-run works and sweeps the dead clone's work dir
        assert [n for n in os.listdir(tmp_path) if n.startswith(".new0.cowfs-clone")] == []
    assert len(list(new.rglob("f*"))) == 200 * 50


def test_clone_help_explains() -> None:
    out = cowfs("clone", "--help").stdout
    assert "TEMPLATE" in out and "COW" in out
