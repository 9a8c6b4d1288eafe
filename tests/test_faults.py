"""Faults: a guest whose FUSE server, init or restart fails is noticed, cleaned up and
restarted as its policy says; each verb answers in one line."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import run
from contextd_harness import (
    CONTEXTD,
    SLEEPER,
    Contextd,
    fuse_server_of,
    guest_status,
    left_behind,
    running_contextd,
    wait_for,
)


def _started(ctx: Contextd, tree: Path, name: str, init: str = SLEEPER, **settings: object) -> None:
    ctx("create", name, "--from", str(tree), "--init", init)
    if settings:
        ctx.configure(name, **settings)
    ctx("start", name)


def test_a_dead_supervisor_ends_its_guest_and_says_why(ctx: Contextd, guest_tree: Path) -> None:
    _started(ctx, guest_tree, "lost")
    init = guest_status(ctx, "lost")["init_pid"]
    record = json.loads((ctx.base / "run" / "guests" / "lost.json").read_text())
    os.kill(record["supervisor_pid"], signal.SIGKILL)
    assert wait_for(lambda: left_behind("lost", ctx) == [], 10), left_behind("lost", ctx)
    assert not Path(f"/proc/{init}").exists()
    status = guest_status(ctx, "lost")
    assert status["state"] == "failed", status
    assert status["last_end"].startswith("its supervisor died"), status
    assert "not restarted: restart policy is 'no'" in status["last_end"]
    # Verbs on it answer in one line.
    result = ctx("exec", "lost", "--", "/bin/true", check=False)
    assert result.returncode == 1
    assert result.stderr == "contextd: error: guest lost is not running\n"
    assert "its supervisor died" in ctx("status").stdout


def test_on_failure_restarts_a_guest_whose_init_was_killed(ctx: Contextd, guest_tree: Path) -> None:
    _started(ctx, guest_tree, "phoenix", restart="on-failure", restart_delay=0.1)
    ctx("exec", "phoenix", "--", "/bin/sh", "-c", "echo kept > /root/note; sync")
    first = guest_status(ctx, "phoenix")["init_pid"]
    os.kill(first, signal.SIGKILL)
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
    assert wait_for(lambda: '"restarted by its policy"' in ctx.log(), 5)


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
    events = [json.loads(line) for line in ctx.log().splitlines() if line.strip()]
    restarted = {e.get("guest") for e in events if e["msg"] == "restarted by its policy"}
    assert restarted == {"again"}, restarted


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


# -- a FUSE server replaced under a running guest -----------------------------------

# In the guest: files opened before the crash and used after it, a cwd deep in the
# tree, reads and appends all along; every failure is written down.
WORKLOAD = """#!/bin/sh
cd /usr/share/doc-test/deep
exec 3</etc/passwd 4>>/root/held
read first <&3
echo before >&4
echo ready > /root/ready
i=0
while [ ! -e /root/stop ]; do
    echo $i >> /root/counter || echo "append $i" >> /root/errors
    cat /bin/busybox > /dev/null || echo "read $i" >> /root/errors
    ls . > /dev/null || echo "cwd $i" >> /root/errors
    i=$((i+1))
done
cat <&3 > /root/rest || echo "held read" >> /root/errors
echo after >&4 || echo "held write" >> /root/errors
echo done > /root/done
"""


def _guest_file(ctx: Contextd, name: str, path: str) -> Path:
    return ctx.base / "cowfs" / "guests" / name / path.lstrip("/")


def _replacements(ctx: Contextd, name: str) -> int:
    return int(guest_status(ctx, name)["root_server_replacements"])


def _replaced(ctx: Contextd, name: str, times: int) -> bool:
    return _replacements(ctx, name) == times


def test_a_guest_outlives_the_death_of_its_fuse_server(ctx: Contextd, guest_tree: Path) -> None:
    ctx("create", "steady", "--from", str(guest_tree), "--init", SLEEPER)
    script = _guest_file(ctx, "steady", "/root/work.sh")
    script.write_text(WORKLOAD)
    script.chmod(0o755)
    _guest_file(ctx, "steady", "/usr/share/doc-test/deep").mkdir(parents=True)
    ctx("start", "steady")
    init = guest_status(ctx, "steady")["init_pid"]
    ctx("exec", "steady", "--", "/bin/sh", "-c", "/root/work.sh > /dev/null 2>&1 &")
    assert wait_for(lambda: _guest_file(ctx, "steady", "/root/ready").exists())
    first = fuse_server_of("steady")
    os.kill(first, signal.SIGKILL)
    assert wait_for(lambda: _replacements(ctx, "steady") == 1, 20), ctx.log()
    successor = fuse_server_of("steady")
    assert successor != first
    counted = len(_guest_file(ctx, "steady", "/root/counter").read_text().split())
    assert wait_for(
        lambda: len(_guest_file(ctx, "steady", "/root/counter").read_text().split()) > counted + 5
    )
    ctx("exec", "steady", "--", "/bin/touch", "/root/stop")
    assert wait_for(lambda: _guest_file(ctx, "steady", "/root/done").exists(), 20)
    status = guest_status(ctx, "steady")
    assert status["state"] == "running" and status["init_pid"] == init
    assert not _guest_file(ctx, "steady", "/root/errors").exists(), _guest_file(
        ctx, "steady", "/root/errors"
    ).read_text()
    numbers = [int(n) for n in _guest_file(ctx, "steady", "/root/counter").read_text().split()]
    assert numbers == list(range(len(numbers)))  # every append, once, in order
    passwd = _guest_file(ctx, "steady", "/etc/passwd").read_text().splitlines(keepends=True)
    assert _guest_file(ctx, "steady", "/root/rest").read_text() == "".join(passwd[1:])
    assert _guest_file(ctx, "steady", "/root/held").read_text() == "before\nafter\n"
    # The successor serves on: a link break, and a clean stop that leaves nothing.
    template_file = guest_tree / "etc" / "hostname"
    template_before = template_file.read_bytes() if template_file.exists() else None
    ctx("exec", "steady", "--", "/bin/sh", "-c", "echo changed > /etc/hostname")
    assert ctx("exec", "steady", "--", "/bin/cat", "/etc/hostname").stdout == "changed\n"
    if template_before is not None:
        assert template_file.read_bytes() == template_before
    ctx("stop", "steady")
    assert left_behind("steady", ctx) == []
    assert not Path(f"/proc/{successor}").exists()


def test_a_fuse_server_that_keeps_dying_ends_its_guest(ctx: Contextd, guest_tree: Path) -> None:
    _started(ctx, guest_tree, "doomed")
    for deaths in range(1, 7):
        os.kill(fuse_server_of("doomed"), signal.SIGKILL)
        if deaths <= 5:
            assert wait_for(functools.partial(_replaced, ctx, "doomed", deaths), 20), ctx.log()
    assert wait_for(lambda: left_behind("doomed", ctx) == [], 20), left_behind("doomed", ctx)
    status = guest_status(ctx, "doomed")
    assert status["state"] == "failed"
    assert status["last_end"].startswith("its cowfs server died 6 times within 60 s"), status


def test_requests_in_flight_are_answered_by_the_successor(ctx: Contextd, guest_tree: Path) -> None:
    _started(ctx, guest_tree, "flight")
    # An fsync of much dirty data: the server is at it (in a worker thread) when it dies.
    ctx(
        "exec",
        "flight",
        "--",
        "/bin/sh",
        "-c",
        "(dd if=/dev/zero of=/root/out bs=1M count=400 2>/dev/null && touch /root/written"
        " && sync /root/out && touch /root/synced) > /dev/null 2>&1 &",
    )
    assert wait_for(lambda: _guest_file(ctx, "flight", "/root/written").exists(), 60)
    time.sleep(0.05)
    os.kill(fuse_server_of("flight"), signal.SIGKILL)
    assert not _guest_file(ctx, "flight", "/root/synced").exists()  # (it was in flight)
    assert wait_for(lambda: _replacements(ctx, "flight") == 1, 20), ctx.log()
    assert wait_for(lambda: _guest_file(ctx, "flight", "/root/synced").exists(), 60), ctx.log()
    out = _guest_file(ctx, "flight", "/root/out").read_bytes()
    assert len(out) == 400 << 20 and out.count(0) == len(out)


@contextlib.contextmanager
def _frozen(pid: int) -> Iterator[None]:
    """Process pid stopped (SIGSTOP) for the block, and killed after it if it still runs."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _stopped_leaving_nothing(ctx: Contextd, name: str, server: int) -> None:
    ctx("stop", name, "--timeout", "1")
    assert left_behind(name, ctx) == []
    assert not Path(f"/proc/{server}").exists()


def test_a_hung_fuse_server_does_not_keep_its_guest_from_stopping(
    ctx: Contextd, guest_tree: Path
) -> None:
    _started(ctx, guest_tree, "hung")
    ctx(
        "exec",
        "hung",
        "--",
        "/bin/sh",
        "-c",
        "(dd if=/dev/zero of=/root/out bs=1M count=400 2>/dev/null && touch /root/written"
        " && sync /root/out && touch /root/synced) > /dev/null 2>&1 &",
    )
    assert wait_for(lambda: _guest_file(ctx, "hung", "/root/written").exists(), 60)
    server = fuse_server_of("hung")
    assert wait_for(lambda: _in_fsync(server), 20)
    with _frozen(server):  # with the fsync in its hands: its caller cannot be killed
        assert not _guest_file(ctx, "hung", "/root/synced").exists()
        _stopped_leaving_nothing(ctx, "hung", server)
        assert "FUSE connection aborted" in ctx.log()


def _traced(pid: int) -> bool:
    return all(
        "TracerPid:\t0\n" not in (task / "status").read_text()
        for task in Path(f"/proc/{pid}/task").iterdir()
    )


def test_an_append_the_dead_server_had_done_is_not_done_twice(
    ctx: Contextd, guest_tree: Path
) -> None:
    log = guest_tree / "root" / "log"
    log.write_text("first\n")
    _started(ctx, guest_tree, "appender")
    writer = subprocess.Popen(
        [CONTEXTD, "exec", "appender", "--", "/bin/sh", "-c",
         "exec 3>>/root/log; echo armed; read go; echo second >&3; echo done"],
        env=ctx.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert writer.stdin is not None and writer.stdout is not None
    assert writer.stdout.readline() == "armed\n"  # the log is open: only its write is left
    server = fuse_server_of("appender")
    # The server's answers to /dev/fuse held back after the first (to the write's
    # GETXATTR security.capability): it dies having appended, before it could say so,
    # and the kernel resends the write to its successor.
    tracer = subprocess.Popen(
        ["strace", "-qq", "-f", "-o", "/dev/null", "-p", str(server),
         "-e", "trace=writev", "-e", "inject=writev:delay_enter=60000000:when=2+"],
    )  # fmt: skip
    try:
        assert wait_for(lambda: _traced(server), 10)
        writer.stdin.write("go\n")
        writer.stdin.flush()
        private = _guest_file(ctx, "appender", "/root/log")
        assert wait_for(lambda: private.read_text() == "first\nsecond\n", 10)
        time.sleep(0.2)
        assert writer.poll() is None  # (not answered)
        os.kill(server, signal.SIGKILL)
        tracer.kill()  # its parent hears of the death once the tracer is gone
        assert wait_for(lambda: _replacements(ctx, "appender") == 1, 20), ctx.log()
        assert writer.stdout.readline() == "done\n"
        assert writer.wait(timeout=20) == 0
    finally:
        tracer.kill()
        tracer.wait()
        writer.kill()
        writer.wait()
    assert private.read_text() == "first\nsecond\n"


def _in_fsync(pid: int) -> bool:
    """True while a thread of process pid is in fsync(2) or fdatasync(2)."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            if (task / "syscall").read_text().split()[0] in ("74", "75"):
                return True
    return False


def test_a_stopped_fuse_server_of_an_idle_guest_is_killed_at_its_stop(
    ctx: Contextd, guest_tree: Path
) -> None:
    _started(ctx, guest_tree, "frozen")
    server = fuse_server_of("frozen")
    with _frozen(server):  # nothing asked of it: the guest ends, the unmount is done
        _stopped_leaving_nothing(ctx, "frozen", server)
        assert "did not end within 10 s of its unmount: killed" in ctx.log()


def _making_a_copy(server: int) -> bool:
    """True while the server has an unnamed private copy (O_TMPFILE) open."""
    for fd in Path(f"/proc/{server}/fd").iterdir():
        with contextlib.suppress(OSError):
            if "/#" in os.readlink(fd):
                return True
    return False


def test_a_link_break_cut_short_by_the_servers_death_is_done_again(
    ctx: Contextd, guest_tree: Path
) -> None:
    shared = guest_tree / "srv" / "big"
    shared.parent.mkdir()
    with shared.open("wb") as f:
        for _ in range(64):
            f.write(b"\x01" * (4 << 20))
    ctx("create", "breaker", "--from", str(guest_tree), "--init", SLEEPER)
    assert _guest_file(ctx, "breaker", "/srv/big").stat().st_ino == shared.stat().st_ino
    ctx("start", "breaker")
    # The append's open breaks the link: a 256 MiB copy, under way when the server dies.
    server = fuse_server_of("breaker")
    ctx("exec", "breaker", "--", "/bin/sh", "-c", "(echo tail >> /srv/big; touch /done) &")
    assert wait_for(lambda: _making_a_copy(server), 10)
    os.kill(server, signal.SIGKILL)
    assert not _guest_file(ctx, "breaker", "/done").exists()  # (it was under way)
    assert wait_for(lambda: _replacements(ctx, "breaker") == 1, 30), ctx.log()
    assert wait_for(lambda: _guest_file(ctx, "breaker", "/done").exists(), 60), ctx.log()
    private = _guest_file(ctx, "breaker", "/srv/big")
    assert private.stat().st_ino != shared.stat().st_ino
    assert private.stat().st_size == (256 << 20) + 5
    with private.open("rb") as f:
        f.seek(256 << 20)
        assert f.read() == b"tail\n"
    assert shared.stat().st_size == 256 << 20  # the template never saw it
    leftovers = [p.name for p in private.parent.iterdir() if p.name != "big"]
    assert leftovers == []


def test_a_daemon_killed_during_start_or_stop_leaves_a_guest_that_works(
    ctx: Contextd, guest_tree: Path
) -> None:
    ctx("create", "torn", "--from", str(guest_tree), "--init", SLEEPER)
    for delay in (0.02, 0.1, 0.2, 0.3, 0.45):
        for verb in ("start", "stop"):
            running = guest_status(ctx, "torn")["state"] == "running"
            if (verb == "start") == running:
                continue
            args = [verb, "torn"] + (["--timeout", "0.1"] if verb == "stop" else [])
            client = subprocess.Popen(
                [CONTEXTD, *args],
                env=ctx.env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            time.sleep(delay)
            ctx.kill(signal.SIGKILL)
            client.wait(timeout=30)
            ctx.serve()
            # Adopted, or cleaned up after: never half there.
            state = guest_status(ctx, "torn")["state"]
            if state == "running":
                assert ctx("exec", "torn", "--", "/bin/echo", "ok").stdout == "ok\n"
            else:
                assert wait_for(lambda: left_behind("torn", ctx) == [], 10), (
                    delay,
                    verb,
                    left_behind("torn", ctx),
                )
    ctx("stop", "torn", check=False)
    ctx("start", "torn")
    assert ctx("exec", "torn", "--", "/bin/echo", "ok").stdout == "ok\n"
    ctx("stop", "torn")
    assert left_behind("torn", ctx) == []


def test_a_locked_state_database_holds_up_no_guest(ctx: Contextd, guest_tree: Path) -> None:
    _started(ctx, guest_tree, "booked")
    database = ctx.base / "cowfs" / "state.db"
    before = _usage_inodes(database, ctx)
    holder = sqlite3.connect(database, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # as a stuck admin's sqlite3 shell would
    try:
        # Past two of the server's book-keeping rounds (every 5 s): the guest works on.
        deadline = time.monotonic() + 11
        rounds = 0
        longest = 0.0
        while time.monotonic() < deadline:
            began = time.monotonic()
            ctx("exec", "booked", "--", "/bin/sh", "-c", f"echo {rounds} > /root/r{rounds}")
            longest = max(longest, time.monotonic() - began)
            rounds += 1
            time.sleep(0.3)
        # (a server that waited for the lock would stall its guest for sqlite's 30 s)
        assert longest < 10, longest
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert _guest_file(ctx, "booked", f"/root/r{rounds - 1}").read_text() == f"{rounds - 1}\n"
    # and the books catch up once the lock is gone
    assert wait_for(lambda: _usage_inodes(database, ctx) >= before + rounds, 15)
    ctx("stop", "booked")
    assert left_behind("booked", ctx) == []


def _usage_inodes(database: Path, ctx: Contextd) -> int:
    root = str(ctx.base / "cowfs" / "guests" / "booked")
    with contextlib.closing(sqlite3.connect(database)) as db:
        row = db.execute(
            "SELECT u.inodes FROM usage u JOIN guests g ON g.id = u.guest_id WHERE g.path = ?",
            (root,),
        ).fetchone()
    return int(row[0]) if row else 0


def test_a_full_backing_filesystem_is_enospc_inside_and_nothing_worse(
    tmp_path: Path, busybox_template: Path
) -> None:
    image = tmp_path / "small.img"
    with open(image, "wb") as f:
        f.truncate(64 << 20)
    run("mkfs.ext4", "-q", "-F", "-E", "nodiscard", image)
    base = tmp_path / "contextd"
    small = base / "cowfs"  # the guests' roots and the state database: the daemon's COWFS_ROOT
    small.mkdir(parents=True)
    run("mount", "-o", "loop", image, small)
    try:
        template = small / "template"
        run("cp", "-a", busybox_template, template)
        (template / "srv").mkdir()
        (template / "srv" / "data").write_bytes(b"d" * (1 << 20))
        with running_contextd(base) as ctx:
            _started(ctx, template, "full")
            ctx("exec", "full", "--", "/bin/sh", "-c", "echo kept > /root/kept")
            # The host's filesystem fills up (not a guest limit: none is set).
            filled = ctx(
                "exec",
                "full",
                "--",
                "/bin/dd",
                "if=/dev/zero",
                "of=/root/fill",
                "bs=1M",
                check=False,
            )
            assert filled.returncode != 0 and "No space left on device" in filled.stderr
            # A link break that needs room fails the same way and changes nothing.
            broken = ctx("exec", "full", "--", "/bin/sh", "-c", "echo x >> /srv/data", check=False)
            assert broken.returncode != 0 and "No space left on device" in broken.stderr
            assert (template / "srv" / "data").read_bytes() == b"d" * (1 << 20)
            shared = (template / "srv" / "data").stat().st_ino
            assert _guest_file(ctx, "full", "/srv/data").stat().st_ino == shared
            # The guest, its server and the daemon go on; the books too, once there is room.
            assert guest_status(ctx, "full")["state"] == "running"
            assert ctx("exec", "full", "--", "/bin/cat", "/root/kept").stdout == "kept\n"
            ctx("exec", "full", "--", "/bin/rm", "/root/fill")
            ctx("exec", "full", "--", "/bin/sh", "-c", "echo more > /root/more")
            assert _guest_file(ctx, "full", "/root/more").read_text() == "more\n"
            assert _replacements(ctx, "full") == 0
            ctx("stop", "full")
            assert left_behind("full", ctx) == []
    finally:
        run("umount", "-l", small, check=False)


def test_a_fuse_server_killed_for_memory_is_replaced(ctx: Contextd, guest_tree: Path) -> None:
    if not Path("/sys/fs/cgroup/memory/cgroup.procs").exists():
        pytest.skip("needs the cgroup v1 memory hierarchy (this host has none)")
    _started(ctx, guest_tree, "squeezed", limits={"memory": "96M"})
    ctx("exec", "squeezed", "--", "/bin/sh", "-c", "echo kept > /root/kept")
    server = fuse_server_of("squeezed")
    # The guest's memory runs out; the OOM killer is made to pick the server first.
    Path(f"/proc/{server}/oom_score_adj").write_text("1000")
    ctx("exec", "squeezed", "--", "/bin/sh", "-c", "(x=y; while :; do x=$x$x; done) &")
    assert wait_for(lambda: not Path(f"/proc/{server}").exists(), 30)
    assert wait_for(lambda: _replacements(ctx, "squeezed") >= 1, 30), ctx.log()
    status = guest_status(ctx, "squeezed")
    assert status["state"] == "running" and status["limit_hits"].get("memory", 0) >= 1
    assert ctx("exec", "squeezed", "--", "/bin/cat", "/root/kept").stdout == "kept\n"
