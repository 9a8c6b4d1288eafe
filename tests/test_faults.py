"""Faults: a guest whose FUSE server, init or restart fails is noticed, cleaned up and
restarted as its policy says; each verb answers in one line."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

from contextd_harness import (
    SLEEPER,
    Contextd,
    fuse_server_of,
    guest_status,
    left_behind,
    wait_for,
)


def _started(ctx: Contextd, tree: Path, name: str, init: str = SLEEPER, **settings: object) -> None:
    ctx("create", name, "--from", str(tree), "--init", init)
    if settings:
        ctx.configure(name, **settings)
    ctx("start", name)


def test_a_dead_fuse_server_ends_its_guest_and_says_why(ctx: Contextd, guest_tree: Path) -> None:
    _started(ctx, guest_tree, "lost")
    init = guest_status(ctx, "lost")["init_pid"]
    # A workload on the root when it goes.
    ctx("exec", "lost", "--", "/bin/sh", "-c", "(while :; do cat /bin/busybox >/dev/null; done) &")
    os.kill(fuse_server_of("lost"), signal.SIGKILL)
    assert wait_for(lambda: left_behind("lost", ctx) == [], 10), left_behind("lost", ctx)
    assert not Path(f"/proc/{init}").exists()
    status = guest_status(ctx, "lost")
    assert status["state"] == "failed", status
    assert status["last_end"].startswith("its cowfs server ended"), status
    assert "not restarted: restart policy is 'no'" in status["last_end"]
    # Verbs on it answer in one line.
    result = ctx("exec", "lost", "--", "/bin/true", check=False)
    assert result.returncode == 1
    assert result.stderr == "contextd: error: guest lost is not running\n"
    assert "its cowfs server ended" in ctx("status").stdout


def test_on_failure_restarts_a_guest_whose_root_was_lost(ctx: Contextd, guest_tree: Path) -> None:
    _started(ctx, guest_tree, "phoenix", restart="on-failure", restart_delay=0.1)
    ctx("exec", "phoenix", "--", "/bin/sh", "-c", "echo kept > /root/note; sync")
    first = guest_status(ctx, "phoenix")["init_pid"]
    os.kill(fuse_server_of("phoenix"), signal.SIGKILL)
    assert wait_for(
        lambda: (
            guest_status(ctx, "phoenix")["state"] == "running"
            and guest_status(ctx, "phoenix")["init_pid"] != first
        ),
        15,
    ), ctx.log()
    status = guest_status(ctx, "phoenix")
    assert status["restarts"] == 1
    assert ctx("exec", "phoenix", "--", "/bin/cat", "/root/note").stdout == "kept\n"
    assert '"restarted by its policy"' in ctx.log()


def test_a_restart_limit_leaves_a_failing_guest_failed(ctx: Contextd, guest_tree: Path) -> None:
    _started(
        ctx,
        guest_tree,
        "crashy",
        init="/bin/sh -c 'echo up >> /root/boots; sleep 0.7; exit 4'",
        restart="on-failure",
        restart_delay=0.1,
        restart_limit=2,
    )
    assert wait_for(lambda: guest_status(ctx, "crashy")["state"] == "failed", 20), ctx.log()
    status = guest_status(ctx, "crashy")
    assert status["last_end"].startswith("init exited with status 4"), status
    assert "restart limit reached: 2 automatic restarts within 60 s" in status["last_end"]
    time.sleep(1.5)  # and nothing starts it again
    assert guest_status(ctx, "crashy")["state"] == "failed"
    assert left_behind("crashy", ctx) == []
    boots = (ctx.base / "cowfs" / "guests" / "crashy" / "root" / "boots").read_text()
    assert boots == "up\n" * 3  # the start and two restarts


def test_policies_for_a_clean_exit(ctx: Contextd, guest_tree: Path) -> None:
    quick = "/bin/sh -c 'sleep 0.7; exit 0'"
    _started(ctx, guest_tree, "once", init=quick, restart="on-failure", restart_delay=0.1)
    _started(ctx, guest_tree, "again", init=quick, restart="always", restart_delay=0.1)
    assert wait_for(lambda: '"restarted by its policy", "guest": "again"' in ctx.log(), 10)
    assert wait_for(lambda: left_behind("once", ctx) == [], 5)
    status = guest_status(ctx, "once")
    assert status["state"] == "stopped", status  # an exit with status 0 is no failure
    assert '"guest": "once"' not in ctx.log().split('"restarted by its policy"', 1)[-1]


def test_stop_cancels_a_pending_restart(ctx: Contextd, guest_tree: Path) -> None:
    _started(ctx, guest_tree, "later", restart="always", restart_delay=30)
    os.kill(guest_status(ctx, "later")["init_pid"], signal.SIGKILL)
    assert wait_for(lambda: guest_status(ctx, "later")["state"] == "restarting", 10), ctx.log()
    assert "restarting by its policy" in guest_status(ctx, "later")["last_end"]
    ctx("stop", "later")
    status = guest_status(ctx, "later")
    assert status["state"] == "failed" and "restarting" not in status["last_end"], status
    ctx("start", "later")  # and a start is a start
    assert guest_status(ctx, "later")["state"] == "running"


def test_an_init_killed_for_memory_is_a_failure_said_so(ctx: Contextd, guest_tree: Path) -> None:
    if not Path("/sys/fs/cgroup/memory/cgroup.procs").exists():
        return  # (cgroup v2 hosts: memory.events, same code path)
    # Init itself grows until the guest's memory limit kills it.
    hog = "/bin/sh -c 'sleep 0.7; x=y; while :; do x=$x$x; done'"
    ctx("create", "hog", "--from", str(guest_tree), "--init", hog)
    ctx.configure("hog", limits={"memory": "48M"})
    ctx("start", "hog")
    assert wait_for(lambda: left_behind("hog", ctx) == [], 30), left_behind("hog", ctx)
    status = guest_status(ctx, "hog")
    assert status["state"] == "failed"
    assert status["last_end"].startswith("init was killed by SIGKILL (out of memory)"), status


def test_policy_applies_to_a_guest_that_died_while_the_daemon_was_away(
    ctx: Contextd, guest_tree: Path
) -> None:
    _started(ctx, guest_tree, "orphan", restart="on-failure", restart_delay=0.1)
    first = guest_status(ctx, "orphan")["init_pid"]
    ctx.kill(signal.SIGKILL)
    os.kill(first, signal.SIGKILL)
    assert wait_for(lambda: not Path(f"/proc/{first}").exists(), 5)
    ctx.serve()
    assert wait_for(lambda: guest_status(ctx, "orphan")["state"] == "running", 10), ctx.log()
    assert guest_status(ctx, "orphan")["init_pid"] != first
    record = json.loads((ctx.base / "run" / "guests" / "orphan.json").read_text())
    assert len(record["restarts"]) == 1
