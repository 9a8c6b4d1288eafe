"""cowfs mount / umount: readiness, logs, bad input refused with one line and no change."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
from conftest import Mounts, cowfs, run


def _mounted(point: Path) -> bool:
    return str(point) in run("findmnt", "-rn", "-o", "TARGET").stdout.split("\n")


def test_mount_is_ready_on_return_and_umount_waits(tmp_path: Path, backing: Path) -> None:
    (backing / "hello").write_text("hi")
    mnt = tmp_path / "m"
    mnt.mkdir()
    out = cowfs("mount", "--log", tmp_path / "log", backing, mnt).stdout
    pid = int(out.rsplit("pid ", 1)[1].rstrip(")\n"))
    try:
        # Ready means initialized: read-ahead raised after the kernel set it from INIT.
        device = run("findmnt", "-n", "-o", "MAJ:MIN", mnt).stdout.strip()
        assert Path(f"/sys/class/bdi/{device}/read_ahead_kb").read_text() == "1024\n"
        assert (mnt / "hello").read_text() == "hi"  # no waiting: ready on return
        assert "fuse.cowfs" in run("findmnt", "-n", "-o", "FSTYPE", mnt).stdout
        options = run("findmnt", "-n", "-o", "OPTIONS", mnt).stdout
        assert "allow_other" in options and "default_permissions" in options
        assert "serving" in (tmp_path / "log").read_text()
    finally:
        cowfs("umount", mnt)
    assert not _mounted(mnt)
    assert not os.path.exists(f"/proc/{pid}") or "Z" in Path(f"/proc/{pid}/stat").read_text()
    assert "stopped serving" in (tmp_path / "log").read_text()


def test_daemon_survives_sigterm_cleanly(tmp_path: Path, backing: Path) -> None:
    mnt = tmp_path / "m"
    mnt.mkdir()
    out = cowfs("mount", backing, mnt).stdout
    pid = int(out.rsplit("pid ", 1)[1].rstrip(")\n"))
    os.kill(pid, 15)
    for _ in range(200):
        if not _mounted(mnt):
            break
        import time

        time.sleep(0.05)
    assert not _mounted(mnt)
    with pytest.raises(OSError):
        os.getxattr(backing, "trusted.cowfs.dirty")  # marked clean


@pytest.mark.parametrize(
    "case, message",
    [
        ("backing-missing", "no such directory"),
        ("backing-is-file", "not a directory"),
        ("mountpoint-missing", "no such directory"),
        ("mountpoint-in-use", "already in use"),
        ("backing-already-served", "already served"),
        ("mountpoint-inside-backing", "inside the backing tree"),
    ],
)
def test_mount_refuses_bad_input(
    tmp_path: Path, backing: Path, mounts: Mounts, case: str, message: str
) -> None:
    mnt = tmp_path / "m"
    mnt.mkdir()
    source = backing
    if case == "backing-missing":
        source = tmp_path / "nope"
    elif case == "backing-is-file":
        source = tmp_path / "file"
        source.write_text("x")
    elif case == "mountpoint-missing":
        mnt = tmp_path / "nothere"
    elif case == "mountpoint-in-use":
        other = tmp_path / "other"
        other.mkdir()
        mounts.mount(other, mnt)
    elif case == "backing-already-served":
        mounts.mount(backing, tmp_path / "first")
    elif case == "mountpoint-inside-backing":
        mnt = backing / "inner"
        mnt.mkdir()
    before = run("findmnt", "-rn", "-o", "TARGET").stdout
    result = cowfs("mount", source, mnt, check=False)
    assert result.returncode == 1
    assert result.stderr.startswith("cowfs: error: ") and result.stderr.count("\n") == 1
    assert message in result.stderr, result.stderr
    assert run("findmnt", "-rn", "-o", "TARGET").stdout == before


def test_umount_refuses_what_is_not_a_cowfs_mount(tmp_path: Path) -> None:
    result = cowfs("umount", tmp_path, check=False)
    assert result.returncode == 1 and "not mounted" in result.stderr
    result = cowfs("umount", tmp_path / "missing", check=False)
    assert result.returncode == 1 and "no such directory" in result.stderr
    result = cowfs("umount", "/proc", check=False)
    assert result.returncode == 1 and "not a cowfs mount" in result.stderr


def test_busy_mount_needs_lazy(tmp_path: Path, backing: Path, mounts: Mounts) -> None:
    mnt = mounts.mount(backing, tmp_path / "m")
    fd = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY)
    try:
        result = cowfs("umount", mnt, check=False)
        assert result.returncode == 1 and "busy" in result.stderr
        assert _mounted(mnt)
    finally:
        os.close(fd)


def test_run_record_names_backing_and_pid(tmp_path: Path, backing: Path, mounts: Mounts) -> None:
    mnt = mounts.mount(backing, tmp_path / "m", "--xid", "42")
    records = [json.loads(p.read_text()) for p in Path("/run/cowfs/mounts").glob("*.json")]
    mine = [r for r in records if r["mountpoint"] == str(mnt)]
    assert mine and mine[0]["backing"] == str(backing) and mine[0]["xid"] == 42
    assert os.path.exists(f"/proc/{mine[0]['pid']}")


def test_umount_of_a_mount_whose_server_died(tmp_path: Path, backing: Path) -> None:
    # Its mount point cannot be stat'ed any more (ENOTCONN): `cowfs umount` still knows
    # it by its mount entry, detaches it and withdraws its record.
    mnt = tmp_path / "m"
    mnt.mkdir()
    out = cowfs("mount", "--log", tmp_path / "log", backing, mnt).stdout
    pid = int(out.rsplit("pid ", 1)[1].rstrip(")\n"))
    try:
        os.kill(pid, signal.SIGKILL)
        for _ in range(100):
            try:
                os.stat(mnt)
            except OSError:
                break
            time.sleep(0.05)
        with pytest.raises(OSError):
            os.stat(mnt)  # what made `cowfs umount` say "no such directory"
        result = cowfs("umount", mnt, check=False)
        assert result.returncode == 0, result.stderr
        assert not _mounted(mnt)
        records = [json.loads(p.read_text()) for p in Path("/run/cowfs/mounts").glob("*.json")]
        assert not [r for r in records if r["mountpoint"] == str(mnt)]
    finally:
        run("umount", "-l", mnt, check=False)
