"""Per-guest disk limits, quota inside a guest, and cowfs du: enforced through real mounts."""

from __future__ import annotations

import errno
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import Mounts, cowfs, run

from cowfs.accounting.usage import scan
from cowfs.host import registry
from cowfs.serve import stats
from native import syscalls


def as_user(uid: int, script: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run a shell script as uid:uid in cwd, entered as root first, as a guest's process starts
    inside its root: host users cannot reach a mount by path (the barrier)."""
    return subprocess.run(
        ["sh", "-c", script],
        user=uid,
        group=uid,
        extra_groups=[],
        capture_output=True,
        text=True,
        check=False,
        cwd=cwd,
    )


@pytest.fixture
def guest(tmp_path: Path, guest_tree: Path) -> Path:
    """A busybox guest cloned from a template (its files shared), with a world-writable /srv."""
    path = tmp_path / "guest"
    cowfs("clone", guest_tree, path)
    (path / "srv").mkdir(mode=0o777)
    os.chmod(path / "srv", 0o1777)
    return path


def write_bytes(path: Path, size: int) -> int:
    """Write size bytes in 64 KiB chunks; how many were written before an error."""
    written = 0
    with open(path, "wb", buffering=0) as f:
        while written < size:
            written += f.write(b"x" * min(65536, size - written))
    return written


def test_df_inside_the_guest_shows_its_limits(guest: Path, tmp_path: Path, mounts: Mounts) -> None:
    cowfs("limit", "set", guest, "--space", "8M", "--inodes", "1000", "--reserved", "25%")
    mnt = mounts.mount(guest, tmp_path / "m")
    sv = os.statvfs(mnt)
    assert sv.f_blocks * sv.f_frsize == 8 * 2**20
    assert sv.f_files == 1000
    used = json.loads(cowfs("du", "--json", guest).stdout)["guests"][0]
    assert sv.f_files - sv.f_ffree == used["private_inodes"]
    assert (
        sv.f_bfree * sv.f_frsize
        == 8 * 2**20 - -(-used["private_bytes"] // sv.f_frsize) * sv.f_frsize
    )
    # df says the same (statfs of the guest's root, as root and as a user);
    # a user sees the reserve as not available
    df_root = run("df", "-k", "--output=size,avail", mnt).stdout.splitlines()[-1].split()
    assert df_root[0] == "8192"
    # (df as a user would look up the mountpoint's path, which the barrier hides)
    block, avail = as_user(1000, "stat -f -c '%S %a' .", mnt).stdout.split()
    avail_kib = int(block) * int(avail) // 1024
    assert avail_kib <= 6144 and avail_kib < int(df_root[1])
    df_inodes = run("df", "--output=itotal", mnt).stdout.splitlines()[-1].split()
    assert df_inodes[0] == "1000"


def test_space_limit_stops_writes_and_reserve_is_root_only(
    guest: Path, tmp_path: Path, mounts: Mounts
) -> None:
    cowfs("limit", "set", guest, "--space", "4M", "--reserved", "50%")
    mnt = mounts.mount(guest, tmp_path / "m")
    with pytest.raises(OSError) as err:
        write_bytes(mnt / "srv" / "root-file", 8 * 2**20)
    assert err.value.errno == errno.ENOSPC
    written = (mnt / "srv" / "root-file").stat().st_size
    assert 3 * 2**20 < written <= 4 * 2**20
    os.unlink(mnt / "srv" / "root-file")
    # alice may use only the half that is not reserved
    result = as_user(1000, "dd if=/dev/zero of=srv/alice bs=64k count=100 2>&1", mnt)
    assert "No space left" in result.stdout
    assert (mnt / "srv" / "alice").stat().st_size <= 2 * 2**20
    shown = json.loads(cowfs("limit", "show", guest, "--json").stdout)
    assert shown[0]["space"] == 4 * 2**20
    assert shown[0]["hits"]["space"] >= 2  # root's refusal and alice's, counted by the mount


def test_inode_limit_stops_creates_of_every_kind(
    guest: Path, tmp_path: Path, mounts: Mounts
) -> None:
    used = json.loads(cowfs("du", "--json", guest).stdout)["guests"][0]["private_inodes"]
    cowfs("limit", "set", guest, "--inodes", str(used + 3))
    mnt = mounts.mount(guest, tmp_path / "m")
    (mnt / "srv" / "a").write_text("1")
    os.mkdir(mnt / "srv" / "d")
    os.symlink("a", mnt / "srv" / "l")
    for attempt in (
        lambda: (mnt / "srv" / "b").write_text("2"),
        lambda: os.mkdir(mnt / "srv" / "d2"),
        lambda: os.symlink("a", mnt / "srv" / "l2"),
        lambda: os.mkfifo(mnt / "srv" / "fifo"),
    ):
        with pytest.raises(OSError) as err:
            attempt()
        assert err.value.errno == errno.ENOSPC
    os.unlink(mnt / "srv" / "a")
    (mnt / "srv" / "b").write_text("room again")


def test_link_break_over_the_limit_fails_cleanly(
    guest: Path, guest_tree: Path, tmp_path: Path, mounts: Mounts
) -> None:
    used = json.loads(cowfs("du", "--json", guest).stdout)["guests"][0]["private_bytes"]
    cowfs("limit", "set", guest, "--space", str(used + 256 * 1024))  # busybox is ~2 MiB
    mnt = mounts.mount(guest, tmp_path / "m")
    before = (guest_tree / "bin" / "busybox").read_bytes()
    with pytest.raises(OSError) as err:
        os.chmod(mnt / "bin" / "busybox", 0o700)
    assert err.value.errno == errno.ENOSPC
    with pytest.raises(OSError) as err, open(mnt / "bin" / "busybox", "r+b") as f:
        f.write(b"x")
    assert err.value.errno == errno.ENOSPC
    assert (guest / "bin" / "busybox").stat().st_ino == (
        guest_tree / "bin" / "busybox"
    ).stat().st_ino
    assert (guest / "bin" / "busybox").stat().st_mode & 0o777 == 0o755
    assert (guest_tree / "bin" / "busybox").read_bytes() == before
    assert not [n for n in os.listdir(guest / "bin") if n.startswith(".cowfs~")]
    # a small shared file still breaks fine
    (mnt / "etc" / "hostname").write_text("mine\n")
    assert (guest_tree / "etc" / "hostname").read_text() == "busybox-guest\n"


def test_fallocate_and_new_limits_apply_without_remount(
    guest: Path, tmp_path: Path, mounts: Mounts
) -> None:
    mnt = mounts.mount(guest, tmp_path / "m")
    fd = os.open(mnt / "srv" / "f", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        syscalls.fallocate(fd, 0, 0, 4 * 2**20)  # no limit yet
        cowfs("limit", "set", guest, "--space", "6M")
        with pytest.raises(OSError) as err:
            syscalls.fallocate(fd, 0, 0, 16 * 2**20)
        assert err.value.errno == errno.ENOSPC
        cowfs("limit", "clear", guest)
        syscalls.fallocate(fd, 0, 0, 16 * 2**20)
    finally:
        os.close(fd)


def test_user_quota_hard_soft_grace_and_group(guest: Path, tmp_path: Path, mounts: Mounts) -> None:
    cowfs("quota", "set", guest, "--user", "alice", "--space-hard", "1M", "--inodes-hard", "5")
    cowfs(
        "quota",
        "set",
        guest,
        "--user",
        "bob",
        "--space-soft",
        "100K",
        "--space-hard",
        "10M",
        "--grace",
        "2s",
    )
    cowfs("quota", "set", guest, "--group", "staff", "--inodes-hard", "2")
    mnt = mounts.mount(guest, tmp_path / "m")
    srv = mnt / "srv"
    result = as_user(1000, "dd if=/dev/zero of=a bs=64k count=40 2>&1", srv)
    assert "Disk quota exceeded" in result.stdout
    assert (srv / "a").stat().st_size <= 2**20
    result = as_user(1000, "for i in 1 2 3 4 5 6; do touch t$i || exit 7; done", srv)
    assert result.returncode == 7 and "quota" in result.stderr.lower()
    # root is not alice: its files are not charged to her
    (srv / "root-big").write_bytes(b"x" * 3 * 2**20)
    # bob: over the soft limit is allowed during the grace period, refused after it
    assert as_user(1001, "dd if=/dev/zero of=b bs=64k count=4 2>&1", srv).returncode == 0
    assert as_user(1001, "dd if=/dev/zero of=b2 bs=64k count=1 2>&1", srv).returncode == 0
    time.sleep(3)
    result = as_user(1001, "dd if=/dev/zero of=b3 bs=64k count=1 2>&1", srv)
    assert "Disk quota exceeded" in result.stdout
    # the staff group: files given to it count against it
    os.chown(srv / "root-big", 0, 50)
    (srv / "g1").write_text("1")
    os.chown(srv / "g1", 0, 50)
    (srv / "g2").write_text("2")
    with pytest.raises(OSError) as err:
        os.chown(srv / "g2", 0, 50)
    assert err.value.errno == errno.EDQUOT
    report = {
        (r["kind"], r["name"]): r
        for r in json.loads(cowfs("quota", "report", guest, "--json").stdout)
    }
    alice = report[("user", "alice")]
    assert alice["space_hard"] == 2**20 and 0 < alice["used_bytes"] <= 2**20  # type: ignore[operator]
    assert report[("user", "bob")]["space_grace_left"] == 0
    assert report[("group", "staff")]["used_inodes"] == 2
    text = cowfs("quota", "report", guest).stdout
    assert "alice" in text and "bob" in text and "none" in text


@pytest.mark.parametrize(
    "args, message",
    [
        (["limit", "set", "no-such-guest", "--space", "1G"], "unknown guest"),
        (["limit", "show", "no-such-guest"], "unknown guest"),
        (["du", "no-such-guest"], "unknown guest"),
        (["quota", "report", "no-such-guest"], "unknown guest"),
        (
            ["quota", "set", "no-such-guest", "--user", "alice", "--space-hard", "1M"],
            "unknown guest",
        ),
        (["quota", "clear", "no-such-guest", "--user", "alice"], "unknown guest"),
        (["limit", "set", "GUEST", "--space", "12Q"], "is not a size"),
        (["limit", "set", "GUEST", "--space", "-5G"], "is not a size"),
        (["limit", "set", "GUEST", "--inodes", "-3"], "not a whole number"),
        (["limit", "set", "GUEST", "--reserved", "150%"], "from 0 to under 100%"),
        (["limit", "set", "GUEST"], "nothing to set"),
        (
            [
                "quota",
                "set",
                "GUEST",
                "--user",
                "alice",
                "--space-soft",
                "2M",
                "--space-hard",
                "1M",
            ],
            "above",
        ),
        (["quota", "set", "GUEST", "--user", "cloudsdk", "--space-hard", "1M"], "unknown in guest"),
        (["quota", "set", "GUEST", "--user", "4242", "--space-hard", "1M"], "unknown in guest"),
        (
            ["quota", "set", "GUEST", "--user", "alice", "--group", "staff", "--space-hard", "1M"],
            "exactly one",
        ),
        (
            ["quota", "set", "GUEST", "--user", "alice", "--grace", "soon", "--space-hard", "1M"],
            "not a duration",
        ),
        (["limit", "clear", "GUEST"], "has no limits"),
    ],
)
def test_bad_input_is_refused_and_changes_nothing(
    guest: Path, args: list[str], message: str
) -> None:
    db = Path(os.environ["COWFS_ROOT"]) / "state.db"
    cowfs("limit", "show", "--json")  # the database exists
    before = _dump(db)
    result = cowfs(*[str(guest) if a == "GUEST" else a for a in args], check=False)
    assert result.returncode != 0
    assert result.stderr.startswith("cowfs: error: ") and result.stderr.count("\n") == 1, (
        result.stderr
    )
    assert message in result.stderr
    assert _dump(db) == before


def _dump(db: Path) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(db)
    try:
        rows: list[tuple[object, ...]] = []
        for table in ("limits", "quotas"):
            rows += conn.execute(f"SELECT * FROM {table}").fetchall()
        return sorted(rows, key=repr)
    finally:
        conn.close()


def test_usage_survives_remount_and_is_rescanned_after_a_crash(
    guest: Path, tmp_path: Path, mounts: Mounts
) -> None:
    mnt = mounts.mount(guest, tmp_path / "m")
    (mnt / "srv" / "data").write_bytes(b"y" * 300_000)
    mounts.umount(mnt)
    shown = json.loads(cowfs("limit", "show", guest, "--json").stdout)[0]
    scanned = json.loads(cowfs("du", "--json", guest).stdout)["guests"][0]
    assert (shown["used_bytes"], shown["used_inodes"]) == (
        scanned["private_bytes"],
        scanned["private_inodes"],
    )
    log = tmp_path / "log"
    mounts.mount(guest, mnt, "--log", str(log))
    assert "recomputed by a scan" not in log.read_text()  # exact figures were stored
    record = json.loads(
        next(
            p
            for p in Path("/run/cowfs/mounts").glob("*.json")
            if json.loads(p.read_text())["mountpoint"] == str(mnt)
        ).read_text()
    )
    (mnt / "srv" / "more").write_bytes(b"z" * 100_000)
    os.kill(record["pid"], signal.SIGKILL)
    time.sleep(0.2)
    run("umount", "-l", mnt)
    mounts.points.remove(mnt)
    log2 = tmp_path / "log2"
    mounts.mount(guest, mnt, "--log", str(log2))
    assert "recomputed by a scan" in log2.read_text()
    mounts.umount(mnt)
    shown = json.loads(cowfs("limit", "show", guest, "--json").stdout)[0]
    scanned = json.loads(cowfs("du", "--json", guest).stdout)["guests"][0]
    assert shown["used_bytes"] == scanned["private_bytes"]


def test_du_agrees_with_du_and_reports_sharing(
    guest: Path, guest_tree: Path, tmp_path: Path, mounts: Mounts
) -> None:
    mnt = mounts.mount(guest, tmp_path / "m")
    (mnt / "srv" / "own").write_bytes(os.urandom(200_000))
    os.chown(mnt / "srv" / "own", 1000, 1000)
    (mnt / "etc" / "hostname").write_text("private now\n")  # one link break
    mounts.umount(mnt)
    data = json.loads(cowfs("du", "--json", "--by-user", guest).stdout)
    g = data["guests"][0]
    du_bytes = int(run("du", "-s", "-B1", guest).stdout.split()[0])
    assert g["apparent_bytes"] == du_bytes
    assert g["apparent_bytes"] == g["private_bytes"] + g["shared_bytes"]
    assert (
        g["saved_bytes"]
        == g["shared_bytes"]
        >= (guest_tree / "bin" / "busybox").stat().st_blocks * 512
    )
    alice = next(o for o in g["by_owner"] if o["kind"] == "user" and o["name"] == "alice")
    assert alice["bytes"] >= 200_000
    # the template is a second tree sharing the same inodes: saved once for the host
    both = json.loads(cowfs("du", "--json", guest, guest_tree).stdout)
    host = both["host"]
    all_du = int(run("du", "-s", "-B1", "-c", guest, guest_tree).stdout.split()[-2])
    assert host["disk_bytes"] == all_du
    assert host["saved_bytes"] == host["apparent_bytes"] - all_du > 0
    text = cowfs("du", guest).stdout
    assert "host:" in text and "saved" in text


def test_guests_scanned_at_once_count_as_scanned_one_by_one(
    guest: Path, guest_tree: Path, tmp_path: Path
) -> None:
    """scan_many deals the guests out to forked children: the figures must not change."""
    from cowfs.accounting.usage import scan, scan_many

    second = tmp_path / "second"
    cowfs("clone", guest_tree, second)
    (second / "own").write_bytes(os.urandom(50_000))
    os.chown(second / "own", 1000, 1001)
    # Shared with a tree not scanned: an inode only this guest's scan finds shared.
    (second / "unified").write_bytes(os.urandom(30_000))
    os.setxattr(second / "unified", "trusted.cowfs.cow", b"1")
    os.link(second / "unified", tmp_path / "elsewhere")
    roots = [str(guest), str(second), str(guest_tree)]
    together, shared_together = scan_many(roots)
    shared_alone: dict[tuple[int, int], int] = {}
    alone = [scan(root, shared_alone) for root in roots]
    for usage, expected in zip(together, alone, strict=True):
        assert (usage.bytes, usage.inodes, usage.shared_bytes, usage.shared_inodes) == (
            expected.bytes,
            expected.inodes,
            expected.shared_bytes,
            expected.shared_inodes,
        )
        assert usage.owner_table() == expected.owner_table()
    assert together[1].owner_table()[("user", 1000)][0] >= 50_000
    assert shared_together == shared_alone
    unified = os.stat(second / "unified")
    assert (unified.st_dev, unified.st_ino) in shared_together


# -- attacks on the space limit (issue 13, hole 6) ----------------------------


LIMIT = 2**20


def mount_limited(guest: Path, tmp_path: Path, mounts: Mounts) -> Path:
    """The guest with a space limit of LIMIT, mounted."""
    cowfs("limit", "set", guest, "--space", str(LIMIT))
    return mounts.mount(guest, tmp_path / "m")


def used_bytes(guest: Path) -> int:
    """The guest's private bytes as its mount's counters have them (the mount writes them first)."""
    return int(json.loads(cowfs("limit", "show", guest, "--json").stdout)[0]["used_bytes"])


def private_bytes_by_du(guest: Path, template: Path) -> int:
    """What the guest alone holds, found without cowfs: du -s of its tree minus its inodes
    that the template links too (each inode once, as du counts)."""
    template_inodes = {
        (st.st_dev, st.st_ino)
        for st in (os.lstat(os.path.join(d, n)) for d, ds, fs in os.walk(template) for n in fs)
    }
    shared = {}
    for directory, _, files in os.walk(guest):
        for name in files:
            st = os.lstat(os.path.join(directory, name))
            if (st.st_dev, st.st_ino) in template_inodes:
                shared[(st.st_dev, st.st_ino)] = st.st_blocks * 512
    return int(run("du", "-s", "-B1", guest).stdout.split()[0]) - sum(shared.values())


def test_hashified_duplicates_inside_one_guest_stay_charged(
    guest: Path, guest_tree: Path, tmp_path: Path, mounts: Mounts
) -> None:
    """Attack: make each file twice, let hashify put the pair in the store, repeat.

    A file only this guest links (and the store) is the guest's: each content
    costs it once, and it meets its limit as if it had never been hashified.
    Before, a marked file with a second link counted as shared and free, so
    every round of hashify gave the guest its space back.
    """
    limit = LIMIT
    size = 150 * 1024
    store = tmp_path / "store"
    mnt = mount_limited(guest, tmp_path, mounts)
    accepted = 0
    refusal = None
    for round_ in range(8):
        content = os.urandom(size)
        try:
            for copy in ("a", "b"):
                (mnt / "srv" / f"f{round_}{copy}").write_bytes(content)
                os.utime(mnt / "srv" / f"f{round_}{copy}", ns=(0, 0))  # equal, as hashify wants
        except OSError as e:
            refusal = e
            break
        accepted += 1
        mounts.umount(mnt)
        cowfs("hashify", "--store", store, guest)
        pair = [os.stat(guest / "srv" / f"f{round_}{copy}") for copy in ("a", "b")]
        assert pair[0].st_ino == pair[1].st_ino and pair[0].st_nlink == 3  # two names + the store
        assert os.getxattr(guest / "srv" / f"f{round_}a", "trusted.cowfs.cow") == b"s"
        by_du = private_bytes_by_du(guest, guest_tree)
        scanned = json.loads(cowfs("du", "--json", guest).stdout)["guests"][0]
        assert scanned["private_bytes"] == by_du
        mounts.mount(guest, mnt)  # rescans: hashify marked the guest's usage stale
        assert used_bytes(guest) == by_du
    assert refusal is not None, "eight rounds of 150 KiB passed a 1 MiB limit"
    assert refusal.errno == errno.ENOSPC
    # what the guest holds, each content once, fits the limit, and one more did not
    assert used_bytes(guest) <= limit < used_bytes(guest) + 2 * size
    assert accepted * size < limit
    # the guest lets go of one name, then the other: the inode leaves it with the last
    before = used_bytes(guest)
    blocks = (guest / "srv" / "f0a").stat().st_blocks * 512
    os.unlink(mnt / "srv" / "f0a")
    assert used_bytes(guest) == before
    os.unlink(mnt / "srv" / "f0b")
    assert used_bytes(guest) == before - blocks
    mounts.umount(mnt)
    assert used_bytes(guest) == private_bytes_by_du(guest, guest_tree)


def test_the_last_other_holder_leaving_moves_the_charge_at_the_next_scan(
    guest: Path, guest_tree: Path, tmp_path: Path
) -> None:
    """A file shared with the template is free until nobody but the store shares it.

    Then it is the guest's, from the next scan on (here: cowfs du --recalc).
    """
    before = json.loads(cowfs("du", "--json", guest).stdout)["guests"][0]["private_bytes"]
    busybox = guest_tree / "bin" / "busybox"
    st = busybox.stat()
    assert st.st_nlink == 2  # the template's name and the guest's
    # the template gets a second name for it and a copy of it: hashify puts the
    # inode with most names (busybox's) in the store and links the copy to it
    os.link(busybox, guest_tree / "bin" / "busybox-again")
    copy = guest_tree / "bin" / "busybox-copy"
    copy.write_bytes(busybox.read_bytes())
    os.chmod(copy, st.st_mode)
    os.utime(copy, ns=(st.st_atime_ns, st.st_mtime_ns))
    cowfs("hashify", "--store", tmp_path / "store", guest_tree)
    assert (guest / "bin" / "busybox").stat().st_nlink == 5  # guest, template x3, store
    figures = json.loads(cowfs("du", "--json", guest).stdout)["guests"][0]
    assert figures["private_bytes"] == before
    for name in ("busybox", "busybox-again", "busybox-copy"):
        os.unlink(guest_tree / "bin" / name)
    figures = json.loads(cowfs("du", "--json", "--recalc", guest).stdout)["guests"][0]
    assert figures["private_bytes"] == before + st.st_blocks * 512
    assert figures["private_bytes"] == private_bytes_by_du(guest, guest_tree)
    assert used_bytes(guest) == figures["private_bytes"]


def test_writes_into_holes_below_preallocated_space_are_charged(
    guest: Path, tmp_path: Path, mounts: Mounts
) -> None:
    """Attack: preallocate past the end (fallocate -n), then fill holes inside the file.

    Before, a write inside the file's size counted as an overwrite whenever
    st_blocks covered st_size, which the blocks past the end made true: the
    holes filled past the limit unchecked.
    """
    limit = LIMIT
    mnt = mount_limited(guest, tmp_path, mounts)
    target = mnt / "srv" / "holes"
    room = limit - used_bytes(guest)
    span = room * 3 // 4 // 65536 * 65536  # preallocated past the end, then the holes below it
    run("truncate", "-s", str(span), target)
    run("fallocate", "-n", "-o", str(span), "-l", str(span), target)
    assert target.stat().st_size == span and target.stat().st_blocks * 512 >= span
    result = run(
        "dd",
        "if=/dev/urandom",
        f"of={target}",
        "bs=64K",
        f"count={span // 65536}",
        "conv=notrunc",
        check=False,
    )
    assert result.returncode != 0 and "No space left on device" in result.stderr
    assert used_bytes(guest) <= limit
    assert target.stat().st_size == span  # the writes went into the holes, not past the end
    mounts.umount(mnt)
    assert used_bytes(guest) == scan(str(guest)).bytes


def test_a_quota_counts_writes_into_holes_too(guest: Path, tmp_path: Path, mounts: Mounts) -> None:
    cowfs("quota", "set", guest, "--user", "alice", "--space-hard", "1M")
    mnt = mounts.mount(guest, tmp_path / "m")
    span = 768 * 1024
    script = (
        f"truncate -s {span} holes && fallocate -n -o {span} -l {span} holes"
        f" && dd if=/dev/zero of=holes bs=64K count={span // 65536} conv=notrunc"
    )
    result = as_user(1000, script + " 2>&1", mnt / "srv")
    assert result.returncode != 0 and "Disk quota exceeded" in result.stdout
    report = {
        (r["kind"], r["name"]): r
        for r in json.loads(cowfs("quota", "report", guest, "--json").stdout)
    }
    assert report[("user", "alice")]["used_bytes"] <= 2**20  # type: ignore[operator]


def test_space_fallocate_reserved_can_be_written_at_the_limit(
    guest: Path, tmp_path: Path, mounts: Mounts
) -> None:
    """What fallocate promises: writes into space it reserved do not fail for want of space."""
    limit = LIMIT
    mnt = mount_limited(guest, tmp_path, mounts)
    reserved = 256 * 1024
    (mnt / "srv" / "log").touch()
    too_much = run("fallocate", "-n", "-l", str(limit), mnt / "srv" / "log", check=False)
    assert "No space left on device" in too_much.stderr  # preallocating is allocating
    run("fallocate", "-n", "-l", str(reserved), mnt / "srv" / "log")  # its size stays 0
    assert (mnt / "srv" / "log").stat().st_size == 0
    with pytest.raises(OSError) as err:
        write_bytes(mnt / "srv" / "filler", limit)
    assert err.value.errno == errno.ENOSPC
    assert limit - used_bytes(guest) < 64 * 1024
    with open(mnt / "srv" / "log", "ab", buffering=0) as log:
        for _ in range(reserved // 65536):
            log.write(os.urandom(65536))
    assert (mnt / "srv" / "log").stat().st_size == reserved
    with pytest.raises(OSError) as err, open(mnt / "srv" / "log", "ab", buffering=0) as log:
        log.write(os.urandom(65536))  # past what was reserved
    assert err.value.errno == errno.ENOSPC
    mounts.umount(mnt)
    assert used_bytes(guest) == scan(str(guest)).bytes


def test_nothing_that_adds_a_name_passes_a_full_limit(
    guest: Path, tmp_path: Path, mounts: Mounts
) -> None:
    """At the limit, long symlinks and new names (each may take a block) are refused too."""
    limit = LIMIT
    mnt = mount_limited(guest, tmp_path, mounts)
    srv = mnt / "srv"
    (srv / "file").write_text("x")
    with open(srv / "filler", "wb", buffering=0) as filler:
        for chunk in (65536, 4096):
            with pytest.raises(OSError) as err:
                while True:
                    filler.write(b"f" * chunk)
            assert err.value.errno == errno.ENOSPC
    assert limit - used_bytes(guest) < 4096
    for attempt in (
        lambda: os.symlink("t" * 4000, srv / "long-link"),
        lambda: os.mkfifo(srv / "fifo"),
        lambda: (srv / "new").write_text(""),
        lambda: os.link(srv / "file", srv / "second-name"),
        lambda: os.rename(srv / "file", srv / "renamed"),
        lambda: os.setxattr(srv / "file", "user.big", b"v" * 3000),
    ):
        with pytest.raises(OSError) as err:
            attempt()
        assert err.value.errno == errno.ENOSPC
    assert used_bytes(guest) <= limit
    os.unlink(srv / "filler")
    os.symlink("t" * 4000, srv / "long-link")
    os.rename(srv / "file", srv / "renamed")
    mounts.umount(mnt)
    assert used_bytes(guest) == scan(str(guest)).bytes


@pytest.mark.parametrize("drop", ["unlink", "write"])
@pytest.mark.parametrize("shared_by", ["hashify", "clone"])
def test_a_file_never_charged_is_not_credited_when_its_other_holders_left_first(
    guest: Path, tmp_path: Path, mounts: Mounts, shared_by: str, drop: str
) -> None:
    """Attack with two guests: share a file, drop it in one, then in the other.

    The second guest's mount counted the file as shared (free). When it drops
    its last name, only the store (or nobody) holds the file, but crediting
    its bytes then would take off a charge that was never made: free space.
    Writing to it instead makes it the guest's: charged then, copy or not.
    """
    other = tmp_path / "other"
    content = os.urandom(300_000)
    if shared_by == "hashify":
        cowfs("clone", guest, other)  # a second guest; the shared file is made below
        for tree in (guest, other):
            (tree / "srv" / "x").write_bytes(content)
            os.utime(tree / "srv" / "x", ns=(0, 0))
        cowfs("hashify", "--store", tmp_path / "store", guest, other)
    else:
        (guest / "srv" / "x").write_bytes(content)
        cowfs("clone", guest, other)  # the guest's own file, now shared with the clone
    assert (guest / "srv" / "x").stat().st_ino == (other / "srv" / "x").stat().st_ino
    mnt = mounts.mount(guest, tmp_path / "m")
    other_mnt = mounts.mount(other, tmp_path / "om")
    charged = used_bytes(guest)
    assert charged == scan(str(guest)).bytes  # the file is shared: not in it
    os.unlink(other_mnt / "srv" / "x")
    if drop == "unlink":
        os.unlink(mnt / "srv" / "x")
        assert used_bytes(guest) == charged
    else:
        with open(mnt / "srv" / "x", "r+b") as f:
            f.write(b"mine now")
        assert used_bytes(guest) >= charged + len(content)
    mounts.umount(mnt)
    assert used_bytes(guest) == scan(str(guest)).bytes


def test_a_link_break_past_a_users_quota_is_refused_and_changes_nothing(
    guest_tree: Path, tmp_path: Path, mounts: Mounts
) -> None:
    """A private copy is charged to the file's owner: past their quota, EDQUOT, and the
    guest keeps the shared file."""
    big = guest_tree / "home" / "alice" / "big"
    big.write_bytes(b"alice's data" * 30_000)  # 360 KB
    os.chown(big, 1000, 1000)
    os.chmod(big, 0o644)
    guest = tmp_path / "g"
    cowfs("clone", guest_tree, guest)
    cowfs("quota", "set", guest, "--user", "alice", "--space-hard", "200K")
    mnt = mounts.mount(guest, tmp_path / "m")
    result = as_user(1000, "echo more >> big", mnt / "home" / "alice")
    assert result.returncode != 0 and "Disk quota exceeded" in result.stderr
    assert (guest / "home/alice/big").stat().st_ino == big.stat().st_ino  # still shared
    assert big.read_bytes() == b"alice's data" * 30_000
    assert not [n for n in os.listdir(guest / "home/alice") if n.startswith(".cowfs~")]
    # root is not charged for alice's file either way: its write of it goes through
    (mnt / "home/alice/big").write_bytes(b"root's")
    assert big.read_bytes() == b"alice's data" * 30_000


def test_quota_set_and_cleared_reach_a_running_mount(
    guest: Path, tmp_path: Path, mounts: Mounts
) -> None:
    mnt = mounts.mount(guest, tmp_path / "m")
    srv = mnt / "srv"
    assert as_user(1000, "dd if=/dev/zero of=a bs=64k count=16 2>&1", srv).returncode == 0
    cowfs("quota", "set", guest, "--user", "alice", "--space-hard", "1M")  # used: 1 MiB
    result = as_user(1000, "dd if=/dev/zero of=b bs=64k count=4 2>&1", srv)
    assert result.returncode != 0 and "Disk quota exceeded" in result.stdout
    cowfs("quota", "clear", guest, "--user", "alice")
    assert as_user(1000, "dd if=/dev/zero of=c bs=64k count=4 2>&1", srv).returncode == 0
    report = {
        (r["kind"], r["name"]): r
        for r in json.loads(cowfs("quota", "report", guest, "--json").stdout)
    }
    assert report[("user", "alice")].get("space_hard") is None  # no quota left


def test_a_guest_that_never_pauses_does_not_keep_its_server_from_its_books(
    guest: Path, tmp_path: Path, mounts: Mounts
) -> None:
    # A server of one mount waits for the guest's next request outside its event loop
    # (REQUEST_LINGER_NS in serve/mount.py), LINGER_BURST requests at most in a row.
    # Processes asking back to back (an fstat after each read: GETATTRs, answered
    # without waiting) must still not keep it from the rest of its work: here the books
    # and counts it keeps at once on SIGHUP (`cowfs limit` and `quota` send it).
    mnt = mounts.mount(guest, tmp_path / "m")
    (mnt / "srv" / "hot").write_bytes(b"x")
    hammer = (
        "import os, sys\n"
        "fd = os.open(sys.argv[1], os.O_RDONLY)\n"
        "while True:\n"
        "    os.pread(fd, 1, 0)\n"
        "    os.fstat(fd)\n"
    )
    where = os.path.realpath(mnt)
    record = registry.read_record(where)
    assert record is not None
    busy = [
        subprocess.Popen([sys.executable, "-c", hammer, str(mnt / "srv" / "hot")]) for _ in range(6)
    ]
    try:
        time.sleep(0.5)
        assert all(p.poll() is None for p in busy)
        for _ in range(3):
            before = stats.read(where).get("written")
            os.kill(record.pid, signal.SIGHUP)
            deadline = time.monotonic() + 3
            while stats.read(where).get("written") == before:
                assert time.monotonic() < deadline, "the server kept no books while busy"
                time.sleep(0.01)
        assert all(p.poll() is None for p in busy)
    finally:
        for p in busy:
            p.kill()
            p.wait()


def test_an_extending_truncate_past_the_limit_allocates_nothing(
    guest: Path, tmp_path: Path, mounts: Mounts
) -> None:
    """truncate(2) to beyond the space limit makes a hole, which takes no space and so is
    allowed; filling the hole is what the limit refuses."""
    mnt = mount_limited(guest, tmp_path, mounts)
    (mnt / "srv" / "holes").touch()
    before = used_bytes(guest)
    os.truncate(mnt / "srv" / "holes", 10 * LIMIT)
    assert (mnt / "srv" / "holes").stat().st_size == 10 * LIMIT
    assert used_bytes(guest) - before < 64 * 1024
    with pytest.raises(OSError) as err, open(mnt / "srv" / "holes", "r+b", buffering=0) as f:
        for _ in range(2 * LIMIT // 65536):
            f.write(b"x" * 65536)
    assert err.value.errno == errno.ENOSPC


def test_an_inode_soft_limit_has_a_grace_period_that_ends_and_starts_again(
    guest: Path, tmp_path: Path, mounts: Mounts
) -> None:
    def alice() -> dict[str, object]:
        report = json.loads(cowfs("quota", "report", guest, "--json").stdout)
        return next(r for r in report if (r["kind"], r["name"]) == ("user", "alice"))

    held = int(alice()["used_inodes"])  # type: ignore[call-overload]
    cowfs("quota", "set", guest, "--user", "alice", "--inodes-soft", str(held + 2), "--grace", "2s")
    mnt = mounts.mount(guest, tmp_path / "m")
    srv = mnt / "srv"
    assert as_user(1000, "touch t1 t2", srv).returncode == 0  # at the soft limit
    assert as_user(1000, "touch t3 t4", srv).returncode == 0  # over it: the grace period
    time.sleep(3)
    result = as_user(1000, "touch t5", srv)
    assert result.returncode != 0 and "Disk quota exceeded" in result.stderr
    # Back at the soft limit the clock stops; over it again, a new grace period starts.
    assert as_user(1000, "rm t3 t4 && touch t3", srv).returncode == 0
    assert as_user(1000, "touch t6", srv).returncode == 0
    assert not (srv / "t5").exists()


def test_du_recalc_stores_the_scanned_usage(
    guest: Path, guest_tree: Path, tmp_path: Path, mounts: Mounts
) -> None:
    cowfs("limit", "set", guest, "--space", "1G")  # listed by limit show
    mnt = mounts.mount(guest, tmp_path / "m")  # which stores the guest's usage
    (mnt / "srv" / "data").write_bytes(os.urandom(300_000))
    (mnt / "etc" / "hostname").write_text("private now\n")
    mounts.umount(mnt)
    db = Path(os.environ["COWFS_ROOT"]) / "state.db"
    conn = sqlite3.connect(db)
    try:
        with conn:
            conn.execute("UPDATE usage SET bytes = 1, inodes = 1")  # wrong counters
    finally:
        conn.close()
    shown = json.loads(cowfs("limit", "show", guest, "--json").stdout)[0]
    assert (shown["used_bytes"], shown["used_inodes"]) == (1, 1)
    cowfs("du", "--recalc", guest)
    shown = json.loads(cowfs("limit", "show", guest, "--json").stdout)[0]
    # found without cowfs: what du counts, less the template's inodes; each inode once
    template = {(st.st_dev, st.st_ino) for st in _every_inode(guest_tree)}
    own = {(st.st_dev, st.st_ino) for st in _every_inode(guest)} - template
    assert (shown["used_bytes"], shown["used_inodes"]) == (
        private_bytes_by_du(guest, guest_tree),
        len(own),
    )


def _every_inode(tree: Path) -> list[os.stat_result]:
    """lstat of tree and of every name below it."""
    found = [os.lstat(tree)]
    for directory, dirs, files in os.walk(tree):
        found += [os.lstat(os.path.join(directory, name)) for name in dirs + files]
    return found


def test_a_guest_named_through_a_symlink_is_the_guest_itself(
    guest: Path, tmp_path: Path, mounts: Mounts
) -> None:
    """Limits and quotas set through an alias reach the guest's running mount at once, the
    alias shows the guest's own books, and it cannot be mounted beside the guest."""
    alias = tmp_path / "alias"
    alias.symlink_to(guest)
    mnt = mounts.mount(guest, tmp_path / "m")
    limit = used_bytes(guest) + 256 * 1024
    cowfs("limit", "set", alias, "--space", str(limit))
    with pytest.raises(OSError) as err:
        write_bytes(mnt / "srv" / "root-big", 2**20)
    assert err.value.errno == errno.ENOSPC
    os.unlink(mnt / "srv" / "root-big")
    cowfs("quota", "set", alias, "--user", "alice", "--space-hard", "64K")
    result = as_user(1000, "dd if=/dev/zero of=a bs=64k count=2 2>&1", mnt / "srv")
    assert result.returncode != 0 and "Disk quota exceeded" in result.stdout
    shown = [
        g
        for g in json.loads(cowfs("limit", "show", "--json").stdout)
        if g["path"] in (str(guest), str(alias))
    ]
    assert [(g["path"], g["space"]) for g in shown] == [(str(guest), limit)]
    other = tmp_path / "m2"
    other.mkdir()
    refused = cowfs("mount", alias, other, check=False)
    assert (refused.returncode, refused.stderr) == (
        1,
        f"cowfs: error: backing tree {alias}: already served by another cowfs mount\n",
    )
    mounts.umount(mnt)
    by_alias = json.loads(cowfs("du", "--json", alias).stdout)["guests"][0]
    assert (by_alias["path"], by_alias["space_limit"]) == (str(guest), limit)
    report = json.loads(cowfs("quota", "report", alias, "--json").stdout)
    assert next(r for r in report if r["name"] == "alice")["space_hard"] == 64 * 1024
