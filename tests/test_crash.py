"""kill -9 of the FUSE process during link breaks: files old or new, leftovers swept, unseen."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import Mounts, cowfs, is_marked, run

FILES = 24
SIZE = 8 * 1024 * 1024
MARKER = b"NEW-CONTENT-WRITTEN-BY-GUEST"

WRITER = f"""
import os, sys
mnt = sys.argv[1]
for i in range({FILES}):
    try:
        fd = os.open(f"{{mnt}}/f{{i}}", os.O_WRONLY)
        os.pwrite(fd, {MARKER!r}, 0)
        os.close(fd)
    except OSError:
        break
"""


def _pid_of(mnt: Path) -> int:
    out = run("findmnt", "-n", "-o", "TARGET", mnt).stdout.strip()
    assert out == str(mnt)
    for record in Path("/run/cowfs/mounts").glob("*.json"):
        import json

        data = json.loads(record.read_text())
        if data["mountpoint"] == str(mnt):
            return int(data["pid"])
    raise AssertionError("no run record")


def test_kill_during_breaks_leaves_old_or_new(tmp_path: Path, mounts: Mounts) -> None:
    template = tmp_path / "tpl"
    template.mkdir()
    old = {}
    for i in range(FILES):
        data = os.urandom(SIZE)
        (template / f"f{i}").write_bytes(data)
        old[i] = data
    new = {i: MARKER + old[i][len(MARKER) :] for i in range(FILES)}
    digest = {i: (hashlib.sha256(old[i]).digest(), hashlib.sha256(new[i]).digest()) for i in old}
    guest = tmp_path / "guest"
    cowfs("clone", template, guest)
    mnt = tmp_path / "m"
    rng = random.Random(1234)
    broken_seen = set()
    for round_ in range(8):
        mounts.mount(guest, mnt)
        pid = _pid_of(mnt)
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(mnt)])
        time.sleep(rng.uniform(0.0, 0.6))
        os.kill(pid, signal.SIGKILL)
        writer.wait(timeout=60)
        run("umount", "-l", mnt)
        mounts.points.remove(mnt)
        for i in range(FILES):
            content = hashlib.sha256((guest / f"f{i}").read_bytes()).digest()
            assert content in digest[i], f"round {round_}: f{i} is neither old nor new"
            if content == digest[i][1]:
                broken_seen.add(i)
                assert not is_marked(guest / f"f{i}")
            assert (template / f"f{i}").read_bytes() == old[i], "the template changed"
        # the next mount sweeps whatever a break left behind, and the guest never sees it
        mounts.mount(guest, mnt)
        assert not [n for n in os.listdir(guest) if n.startswith(".cowfs~")]
        assert sorted(os.listdir(mnt)) == sorted(f"f{i}" for i in range(FILES))
        mounts.umount(mnt)
    assert broken_seen, "no break completed in any round: the kills came too early to test"


def test_leftovers_are_invisible_while_mounted(tmp_path: Path, mounts: Mounts) -> None:
    guest = tmp_path / "g"
    guest.mkdir()
    (guest / ".cowfs~0123456789abcdef").write_text("half a copy")
    (guest / "visible").write_text("x")
    mnt = mounts.mount(guest, tmp_path / "m")
    # the mount was clean before, so nothing is swept; the guest still must not see it
    assert os.listdir(mnt) == ["visible"]
    assert not (mnt / ".cowfs~0123456789abcdef").exists()
    for attempt in (
        lambda: (mnt / ".cowfs~0123456789abcdef").write_text("x"),
        lambda: (mnt / ".cowfs~new").mkdir(),
        lambda: os.rename(mnt / "visible", mnt / ".cowfs~x"),
        lambda: os.symlink("visible", mnt / ".cowfs~l"),
    ):
        try:
            attempt()
        except PermissionError:
            pass
        else:
            raise AssertionError("a reserved name was created")
    assert (guest / ".cowfs~0123456789abcdef").read_text() == "half a copy"


def test_mount_after_crash_sweeps_leftovers(tmp_path: Path, mounts: Mounts) -> None:
    guest = tmp_path / "g"
    (guest / "deep" / "er").mkdir(parents=True)
    (guest / "deep" / "er" / ".cowfs~feedfacefeedface").write_text("left by a killed break")
    (guest / "keep").write_text("x")
    os.setxattr(guest, "trusted.cowfs.dirty", b"1")  # what a killed mount leaves
    mnt = mounts.mount(guest, tmp_path / "m")
    assert os.listdir(guest / "deep" / "er") == []
    assert (mnt / "keep").read_text() == "x"
    mounts.umount(mnt)
    assert "trusted.cowfs.dirty" not in os.listxattr(guest)
