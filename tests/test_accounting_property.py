"""Property: after any workload through a mount, its usage counters equal a fresh scan."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
from conftest import Mounts, cowfs, run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cowfs.accounting.usage import scan
from native import syscalls

NAMES = [
    "a",
    "b",
    "c",
    "d/e",
    "d/f",
    "etc/hostname",
    "etc/passwd",
    "bin/busybox",
    "srv/x",
    "p/one",  # p/one and p/two: one inode that only this guest and the store link
    "p/two",
    "p/solo",  # an inode this guest links once, and the store
    "p/tmpl",  # p/tmpl and p/copy: one inode this guest, the template and the store link
    "p/copy",
]

op = st.one_of(
    st.tuples(
        st.just("write"), st.sampled_from(NAMES), st.integers(0, 300_000), st.integers(1, 70_000)
    ),
    st.tuples(st.just("truncate"), st.sampled_from(NAMES), st.integers(0, 200_000)),
    st.tuples(st.just("unlink"), st.sampled_from(NAMES)),
    st.tuples(st.just("mkdir"), st.sampled_from(["d", "srv", "d/g"])),
    st.tuples(st.just("rmdir"), st.sampled_from(["d", "srv", "d/g"])),
    st.tuples(st.just("rename"), st.sampled_from(NAMES), st.sampled_from(NAMES)),
    st.tuples(st.just("link"), st.sampled_from(NAMES), st.sampled_from(NAMES)),
    st.tuples(st.just("symlink"), st.sampled_from(NAMES)),
    st.tuples(st.just("chown"), st.sampled_from(NAMES), st.sampled_from([0, 1000, 1001])),
    st.tuples(st.just("xattr"), st.sampled_from(NAMES), st.integers(1, 3000)),
    st.tuples(st.just("fallocate"), st.sampled_from(NAMES), st.integers(1, 300_000)),
    st.tuples(st.just("orphan"), st.sampled_from(NAMES), st.integers(1, 100_000)),
)


# What a step may fail with besides a refusal for space: a name that is not there, or not
# of the kind the step needs (a symlink's 300-byte target is too long a name to follow).
# Anything else (EIO from a handler that broke) fails the test.
NOT_THERE = {errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.ENOTEMPTY,
             errno.ENAMETOOLONG}  # fmt: skip
ALSO = {"rename": {errno.EINVAL}, "link": {errno.EPERM}}  # into itself; a directory's link


def apply(mnt: Path, step: tuple[object, ...], refusals: list[int]) -> None:
    """Do step through the mount; the errno of a refusal for space (ENOSPC, EDQUOT) is
    added to refusals, a failure for a name that is not there ignored."""
    try:
        _apply(mnt, step)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            refusals.append(e.errno)
        elif e.errno not in NOT_THERE | ALSO.get(str(step[0]), set()):
            raise AssertionError(f"{step} failed: {e}") from e


def _apply(mnt: Path, step: tuple[object, ...]) -> None:
    kind, *args = step
    p = lambda name: mnt / str(name)  # noqa: E731
    if kind == "write":
        fd = os.open(p(args[0]), os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.pwrite(fd, os.urandom(int(args[2])), int(args[1]))  # type: ignore[call-overload]
        finally:
            os.close(fd)
    elif kind == "truncate":
        os.truncate(p(args[0]), int(args[1]))  # type: ignore[call-overload]
    elif kind == "unlink":
        os.unlink(p(args[0]))
    elif kind == "mkdir":
        os.mkdir(p(args[0]))
    elif kind == "rmdir":
        os.rmdir(p(args[0]))
    elif kind == "rename":
        os.rename(p(args[0]), p(args[1]))
    elif kind == "link":
        os.link(p(args[0]), p(args[1]))
    elif kind == "symlink":
        os.symlink("x" * 300, p(args[0]))
    elif kind == "chown":
        os.chown(p(args[0]), int(args[1]), int(args[1]), follow_symlinks=False)  # type: ignore[call-overload]
    elif kind == "xattr":
        os.setxattr(p(args[0]), "user.blob", b"v" * int(args[1]))  # type: ignore[call-overload]
    elif kind == "fallocate":
        fd = os.open(p(args[0]), os.O_RDWR)
        try:
            syscalls.fallocate(fd, 0, 0, int(args[1]))  # type: ignore[call-overload]
        finally:
            os.close(fd)
    elif kind == "orphan":
        fd = os.open(p(args[0]), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.unlink(p(args[0]))
            os.pwrite(fd, b"o" * int(args[1]), 0)  # type: ignore[call-overload]
        finally:
            os.close(fd)


@pytest.mark.parametrize("limited", [False, True], ids=["unlimited", "at-the-limits"])
def test_counters_equal_a_fresh_scan(
    tmp_path_factory: object, busybox_template: Path, mounts: Mounts, limited: bool
) -> None:
    """And with a space, inode and user limit close above what the guest holds, so that
    many steps are refused: a refused change leaves the counters as they were."""
    base = Path(str(tmp_path_factory.mktemp("acct")))  # type: ignore[attr-defined]
    template = base / "template"
    run("cp", "-a", busybox_template, template)  # a clone would mark the shared pristine tree
    (template / "p").mkdir()
    in_template = os.urandom(5000)
    write_unifiable(template / "p" / "tmpl", in_template)
    counter = iter(range(10_000))
    refusals: list[int] = []

    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(op, min_size=1, max_size=25))
    def check(steps: list[tuple[object, ...]]) -> None:
        n = next(counter)
        guest = base / f"g{n}"
        cowfs("clone", template, guest)
        (guest / "d").mkdir()
        twice = os.urandom(9000)
        write_unifiable(guest / "p" / "one", twice)
        write_unifiable(guest / "p" / "two", twice)
        write_unifiable(guest / "p" / "copy", in_template)
        once = os.urandom(7000)
        write_unifiable(guest / "p" / "solo", once)
        write_unifiable(guest / "p" / "solo-again", once)
        cowfs("hashify", "--store", base / "store", guest)
        os.unlink(guest / "p" / "solo-again")
        if limited:
            held = scan(str(guest))
            cowfs("limit", "set", guest, "--space", str(held.bytes + 80_000),
                  "--inodes", str(held.inodes + 4))  # fmt: skip
            cowfs("quota", "set", guest, "--user", "alice", "--space-hard", "10K")
            # Refused for certain, whatever else is drawn: over alice's quota, over the space.
            steps = [("write", "a", 0, 70_000), ("chown", "a", 1000),
                     ("write", "b", 0, 70_000), *steps]  # fmt: skip
        assert os.stat(guest / "p" / "solo").st_nlink == 2
        assert os.stat(guest / "p" / "one").st_nlink == 3
        assert os.stat(guest / "p" / "copy").st_ino == os.stat(template / "p" / "tmpl").st_ino
        # two mounts: the second starts from what the first stored, not a scan
        half = len(steps) // 2
        for part in (steps[:half], steps[half:]):
            mnt = mounts.mount(guest, base / f"m{n}")
            for step in part:
                apply(mnt, step, refusals)
            mounts.umount(mnt)
        shown = json.loads(cowfs("limit", "show", guest, "--json").stdout)[0]
        fresh = scan(str(guest))
        assert (shown["used_bytes"], shown["used_inodes"]) == (fresh.bytes, fresh.inodes), steps
        db_owners = _owners(guest)
        assert db_owners == fresh.owner_table(), steps

    check()
    if limited:  # the limits were reached, of space and of quota both
        assert errno.ENOSPC in refusals and errno.EDQUOT in refusals, refusals


def write_unifiable(path: Path, content: bytes) -> None:
    """A file hashify may unify with others of the same content (same mode, owner, mtime)."""
    path.write_bytes(content)
    os.chmod(path, 0o644)
    os.utime(path, ns=(0, 0))


def _owners(guest: Path) -> dict[tuple[str, int], tuple[int, int]]:
    from cowfs.host.statedb import StateDB

    db = StateDB()
    try:
        row = db.guest(str(guest), create=False)
        assert row is not None
        return db.owner_usage(row.id)
    finally:
        db.close()
