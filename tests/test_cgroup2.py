"""Guests on a host with the unified cgroup hierarchy only (cgroup v2).

A guest's processes are in contextd/NAME/guest/delegated, the root of its
cgroup namespace, which its own init manages; its limits are above that
(memory and CPU on contextd/NAME, pids and devices on contextd/NAME/guest).
Each test runs a real guest of each mode; on a cgroup v1 host they skip
(tools/vm.sh test tests/test_cgroup2.py runs them in a VM that has cgroup v2).
"""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from contextd_harness import (
    CONTEXTD,
    SLEEPER,
    Contextd,
    cgroup_of,
    cgroup_v2,
    fuse_server_of,
    guest_status,
    running_contextd,
    wait_for,
)

CGROUP = Path("/sys/fs/cgroup")


pytestmark = pytest.mark.skipif(
    not cgroup_v2(),
    reason="cgroup v2 only: this host's memory, cpu and pids controllers are not on a"
    " unified hierarchy at /sys/fs/cgroup (tools/vm.sh test runs these in a VM)",
)

PIDS_LIMIT = 40


@pytest.fixture(params=["privileged", "userns"])
def ctx(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Contextd]:
    with running_contextd(tmp_path / "contextd", guest_mode=request.param) as daemon:
        yield daemon


def start_guest(ctx: Contextd, tree: Path, name: str) -> int:
    """Create and start a busybox guest with limits; its init's host pid."""
    ctx("create", name, "--from", str(tree), "--init", SLEEPER, f"--{ctx.guest_mode}")
    ctx.configure(
        name,
        limits={"memory": "256M", "pids": PIDS_LIMIT, "cpu_quota": 0.5, "cpu_weight": 50},
    )
    ctx("start", name)
    return int(guest_status(ctx, name)["init_pid"])


def in_guest(ctx: Contextd, name: str, script: str) -> subprocess.CompletedProcess[str]:
    return ctx("exec", name, "--", "/bin/sh", "-c", script, check=False)


def host_pids_of(command: bytes) -> list[int]:
    """Host pids of the processes whose command line is exactly command (NUL-separated)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "cmdline").read_bytes() == command:
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def test_limits_are_set_above_the_subtree_the_guest_manages(
    ctx: Contextd, guest_tree: Path
) -> None:
    init = start_guest(ctx, guest_tree, "lim")
    base = CGROUP / "contextd" / "lim"
    assert (base / "memory.max").read_text() == f"{256 << 20}\n"
    assert (base / "cpu.max").read_text() == "50000 100000\n"
    assert (base / "cpu.weight").read_text() == "50\n"
    assert (base / "guest" / "pids.max").read_text() == f"{PIDS_LIMIT}\n"
    assert cgroup_of(init) == "/contextd/lim/guest/delegated"
    assert (
        cgroup_of(fuse_server_of("lim")) == "/contextd/lim/cowfs"
    )  # charged to the guest's memory and CPU
    # The guest may use memory, cpu and pids in the cgroups it makes.
    delegated = base / "guest" / "delegated"
    assert set((delegated / "cgroup.controllers").read_text().split()) >= {"memory", "cpu", "pids"}
    if ctx.guest_mode == "userns":
        guest_root = (int(guest_status(ctx, "lim")["xid"]) + 16) * 65536
        assert delegated.stat().st_uid == guest_root
        assert (delegated / "cgroup.procs").stat().st_uid == guest_root
        assert (base / "guest" / "pids.max").stat().st_uid == 0
    # Inside, that subtree is all there is: its root is the guest's /sys/fs/cgroup.
    seen = in_guest(ctx, "lim", "cat /proc/self/cgroup /sys/fs/cgroup/cgroup.controllers")
    assert seen.returncode == 0, seen.stderr
    assert seen.stdout.splitlines()[0] == "0::/"
    assert in_guest(ctx, "lim", "test -e /sys/fs/cgroup/delegated").returncode == 1


def test_the_guest_cannot_raise_its_limits(ctx: Contextd, guest_tree: Path) -> None:
    """Root in the guest writes "max" to every limit it can see: its limits stay, and
    the pids limit holds when it forks past it. Control: its writes do reach the kernel
    (a cgroup it made takes them, in the first cgroup it sees, top first, that lets it
    make one: its tree's root while that is its own subtree)."""
    start_guest(ctx, guest_tree, "raise")
    guest = CGROUP / "contextd" / "raise" / "guest"
    attack = (
        "for f in $(find /sys/fs/cgroup -name pids.max -o -name memory.max -o -name cpu.max"
        " -o -name cgroup.max.descendants); do echo max > $f 2>/dev/null && echo wrote $f; done;"
        " for d in $(find /sys/fs/cgroup -type d); do mkdir $d/own 2>/dev/null && break; done;"
        " echo 5 > $d/own/cgroup.max.descendants && echo own $(cat $d/own/cgroup.max.descendants)"
    )
    result = in_guest(ctx, "raise", attack)
    assert "own 5" in result.stdout, result.stdout + result.stderr  # the control
    assert (guest / "pids.max").read_text() == f"{PIDS_LIMIT}\n"
    assert (guest.parent / "memory.max").read_text() == f"{256 << 20}\n"
    assert (guest.parent / "cpu.max").read_text() == "50000 100000\n"
    # And the pids limit holds: twice the limit of sleepers cannot all start. A subshell
    # forks them (busybox's sh ends at a fork refused); the shell then becomes a sleeper
    # of another name, without forking, while they are counted.
    forks = f"i=0; while [ $i -lt {2 * PIDS_LIMIT} ]; do sleep 1000 & i=$((i+1)); done"
    command = [CONTEXTD, "exec", "raise", "--", "/bin/sh", "-c", f"({forks}); exec sleep 4321"]
    process = subprocess.Popen(command, env=ctx.env, stdin=subprocess.DEVNULL)
    try:
        assert wait_for(lambda: len(host_pids_of(b"sleep\x004321\x00")) == 1, 60)
        assert 0 < len(host_pids_of(b"sleep\x001000\x00")) < PIDS_LIMIT
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
    events = dict(line.split() for line in (guest / "pids.events").read_text().splitlines())
    assert int(events["max"]) > 0


def test_the_guest_cannot_leave_its_subtree(ctx: Contextd, guest_tree: Path) -> None:
    """Root in the guest moves a process to the top of every cgroup tree it can reach,
    then into one it makes in the first cgroup it sees, top first, that lets it (and
    takes it): the host sees it in the guest's subtree, at the place the guest chose
    there (the control: the moves did happen)."""
    start_guest(ctx, guest_tree, "leave")
    script = (
        "echo $$ > /sys/fs/cgroup/cgroup.procs; echo $$ > /sys/fs/cgroup/../cgroup.procs;"
        " for d in $(find /sys/fs/cgroup -type d); do mkdir $d/out 2>/dev/null"
        " && echo $$ > $d/out/cgroup.procs && break; done; exec sleep 4321"
    )
    command = [CONTEXTD, "exec", "leave", "--", "/bin/sh", "-c", script]
    process = subprocess.Popen(command, env=ctx.env, stdin=subprocess.DEVNULL)
    try:
        assert wait_for(lambda: len(host_pids_of(b"sleep\x004321\x00")) == 1)
        (sleeper,) = host_pids_of(b"sleep\x004321\x00")
        assert cgroup_of(sleeper) == "/contextd/leave/guest/delegated/out"
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)


def test_cgroups_the_guest_makes_are_counted_and_go_with_it(
    ctx: Contextd, guest_tree: Path
) -> None:
    script = "mkdir -p /sys/fs/cgroup/a/b && echo $$ > /sys/fs/cgroup/a/b/cgroup.procs"
    ctx("create", "tree", "--from", str(guest_tree), f"--{ctx.guest_mode}", "--init", (
        f"/bin/sh -c '{script}; sleep 1000 & exec sleep 1000000'"
    ))  # fmt: skip
    ctx("start", "tree")
    assert wait_for(lambda: len(host_pids_of(b"sleep\x001000\x00")) == 1)
    (sleeper,) = host_pids_of(b"sleep\x001000\x00")
    assert cgroup_of(sleeper) == "/contextd/tree/guest/delegated/a/b"
    assert guest_status(ctx, "tree")["processes"] == 2  # both in the cgroup it made
    ctx("stop", "tree")
    assert not (CGROUP / "contextd" / "tree").exists()
    assert wait_for(lambda: not Path(f"/proc/{sleeper}").exists())


def test_exec_joins_a_guest_whose_init_left_the_root_of_its_tree(
    ctx: Contextd, guest_tree: Path
) -> None:
    """What a distribution's systemd does in its namespace: init into init.scope, then
    controllers for the subtree (after which its root may hold no process)."""
    script = (
        "mkdir /sys/fs/cgroup/init.scope && echo 1 > /sys/fs/cgroup/init.scope/cgroup.procs"
        " && echo +pids > /sys/fs/cgroup/cgroup.subtree_control && echo controllers on"
    )
    ctx("create", "sd", "--from", str(guest_tree), f"--{ctx.guest_mode}", "--init", (
        f"/bin/sh -c '{script}; exec sleep 1000000'"
    ))  # fmt: skip
    ctx("start", "sd")
    assert wait_for(lambda: "controllers on" in ctx("logs", "sd").stdout), ctx("logs", "sd").stdout
    joined = ctx("exec", "sd", "--", "/bin/cat", "/proc/self/cgroup")
    assert joined.stdout == "0::/init.scope\n"
    assert guest_status(ctx, "sd")["state"] == "running"
