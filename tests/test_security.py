"""Attacks from inside a guest: no symlink or rename race makes cowfs touch the host."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from conftest import Mounts, run

SWAPPER = """
while true; do
    mv /d /d.real 2>/dev/null; mv /evil /d 2>/dev/null
    mv /d /evil 2>/dev/null; mv /d.real /d 2>/dev/null
done
"""

VICTIM = """
i=0
while [ $i -lt 400 ]; do
    echo pwned > /d/file 2>/dev/null
    chmod 777 /d/file 2>/dev/null
    chown 1000 /d/file 2>/dev/null
    mkdir /d/sub 2>/dev/null; rmdir /d/sub 2>/dev/null
    ln -s /etc/passwd /d/link 2>/dev/null; rm -f /d/link 2>/dev/null
    touch /d/new$i 2>/dev/null; rm -f /d/new$i 2>/dev/null
    cat /d/secret 2>/dev/null
    i=$((i+1))
done
"""


def test_rename_symlink_race_never_reaches_the_host(
    tmp_path: Path, guest_tree: Path, mounts: Mounts
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "file").write_text("host data\n")
    (outside / "secret").write_text("host secret\n")
    os.chmod(outside / "file", 0o600)
    before = {
        p.name: (p.read_bytes(), p.stat().st_mode, p.stat().st_uid) for p in outside.iterdir()
    }
    (guest_tree / "d").mkdir()
    (guest_tree / "d" / "file").write_text("guest data\n")
    # Inside the guest this symlink points nowhere (chroot); a filesystem that
    # resolved guest paths on the host would follow it to the host's directory.
    os.symlink(str(outside), guest_tree / "evil")
    mnt = mounts.mount(guest_tree, tmp_path / "m")
    swapper = subprocess.Popen(["chroot", str(mnt), "/bin/sh", "-c", SWAPPER])
    try:
        victim = run("chroot", mnt, "/bin/sh", "-c", VICTIM, check=False)
        assert "host secret" not in victim.stdout
    finally:
        swapper.kill()
        swapper.wait()
    time.sleep(0.1)
    after = {p.name: (p.read_bytes(), p.stat().st_mode, p.stat().st_uid) for p in outside.iterdir()}
    assert after == before


def test_dotdot_at_guest_root_stays_inside(
    tmp_path: Path, guest_tree: Path, mounts: Mounts
) -> None:
    mnt = mounts.mount(guest_tree, tmp_path / "m")
    out = run("chroot", mnt, "/bin/sh", "-c", "cd /../../..; ls /").stdout.split()
    assert "bin" in out and "pytest-of-root" not in out
    # and from the host side, ".." of the mount root is the host directory holding the mount
    assert os.path.samefile(mnt / "..", tmp_path)


def test_guest_cannot_read_the_backing_tree_temporaries_or_marks(
    tmp_path: Path, guest_tree: Path, mounts: Mounts
) -> None:
    mnt = mounts.mount(guest_tree, tmp_path / "m")
    out = run("chroot", mnt, "/bin/sh", "-c", "ls -a / /etc").stdout
    assert ".cowfs~" not in out
    assert "trusted.cowfs" not in run("getfattr", "-d", "-m", "-", "-R", mnt / "etc").stdout
