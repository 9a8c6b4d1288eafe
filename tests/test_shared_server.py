"""Guests whose roots one cowfs process serves (``fuse_server = "shared"``): they stay
apart, each mount ends alone, and the death of that process costs no guest its root."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from contextd_harness import (
    SLEEPER,
    Contextd,
    guest_status,
    left_behind,
    procfs_alive,
    wait_for,
)


def _records(ctx: Contextd) -> dict[str, dict[str, Any]]:
    """The mount records of this daemon's guests' roots, by guest name."""
    roots = os.path.realpath(ctx.base / "run" / "roots")
    found = {}
    for record in Path("/run/cowfs/mounts").glob("*.json"):
        with contextlib.suppress(OSError, ValueError):
            mount = json.loads(record.read_text())
            if os.path.dirname(mount["mountpoint"]) == roots:
                found[os.path.basename(mount["mountpoint"])] = mount
    return found


def _start_shared(ctx: Contextd, tree: Path, *names: str) -> None:
    for name in names:
        ctx("create", name, "--from", str(tree), "--init", SLEEPER)
        ctx.configure(name, fuse_server="shared")
        ctx("start", name)


def _replaced_once(ctx: Contextd, name: str) -> bool:
    return bool(guest_status(ctx, name)["root_server_replacements"] == 1)


def _cgroup_procs(name: str) -> set[int]:
    """Every process in the guest's cgroups (its own and its FUSE server's)."""
    found: set[int] = set()
    for procs in Path("/sys/fs/cgroup/pids/contextd", name).rglob("cgroup.procs"):
        found |= {int(pid) for pid in procs.read_text().split()}
    return found


def test_guests_sharing_a_server_stay_apart_and_end_alone(ctx: Contextd, guest_tree: Path) -> None:
    _start_shared(ctx, guest_tree, "one", "two")
    records = _records(ctx)
    assert set(records) == {"one", "two"}
    server = records["one"]["pid"]
    assert records["two"]["pid"] == server and procfs_alive(server)
    assert records["one"]["shared"] and records["two"]["shared"]
    assert records["one"]["session_fd"] != records["two"]["session_fd"]
    # The shared server is no guest's: it is in neither guest's cgroup.
    assert server not in _cgroup_procs("one") | _cgroup_procs("two")
    # Each mount logs to its guest's own log.
    for name in ("one", "two"):
        log = (ctx.base / "log" / f"{name}.cowfs.log").read_text()
        assert f"roots/{name} (pid {server}, shared" in log, log

    template_hostname = (guest_tree / "etc" / "hostname").read_bytes()
    ctx("exec", "one", "--", "/bin/sh", "-c", "echo one > /etc/hostname")
    assert ctx("exec", "one", "--", "/bin/cat", "/etc/hostname").stdout == "one\n"
    assert ctx("exec", "two", "--", "/bin/cat", "/etc/hostname").stdout.encode() == (
        template_hostname
    )
    assert (guest_tree / "etc" / "hostname").read_bytes() == template_hostname

    ctx("stop", "one")
    assert left_behind("one", ctx) == []
    assert procfs_alive(server)  # it serves two still
    ctx("exec", "two", "--", "/bin/sh", "-c", "echo two > /etc/motd")
    assert ctx("exec", "two", "--", "/bin/cat", "/etc/motd").stdout == "two\n"
    assert guest_status(ctx, "two")["state"] == "running"

    ctx("stop", "two")
    assert left_behind("two", ctx) == []
    assert wait_for(lambda: not procfs_alive(server)), "the shared server outlived its mounts"
    assert not (ctx.base / "run" / "cowfs-host.sock").exists()


def test_a_guest_started_again_gets_a_new_shared_server(ctx: Contextd, guest_tree: Path) -> None:
    _start_shared(ctx, guest_tree, "again")
    first = _records(ctx)["again"]["pid"]
    ctx("stop", "again")
    assert wait_for(lambda: not procfs_alive(first))
    ctx("start", "again")
    second = _records(ctx)["again"]["pid"]
    assert second != first and procfs_alive(second)
    assert ctx("exec", "again", "--", "/bin/cat", "/etc/passwd").stdout.startswith("root:")
    ctx("stop", "again")
    assert left_behind("again", ctx) == []


def test_the_shared_servers_death_gives_each_guest_a_server_of_its_own(
    ctx: Contextd, guest_tree: Path
) -> None:
    _start_shared(ctx, guest_tree, "left", "right")
    server = _records(ctx)["left"]["pid"]
    for name in ("left", "right"):
        ctx("exec", name, "--", "/bin/sh", "-c", f"echo {name} > /root/mine")
    os.kill(server, signal.SIGKILL)
    for name in ("left", "right"):
        assert wait_for(functools.partial(_replaced_once, ctx, name), 20), ctx.log()
    records = _records(ctx)
    successors = {records[name]["pid"] for name in ("left", "right")}
    assert server not in successors and len(successors) == 2
    assert not records["left"]["shared"] and not records["right"]["shared"]
    for name in ("left", "right"):
        assert ctx("exec", name, "--", "/bin/cat", "/root/mine").stdout == f"{name}\n"
        assert guest_status(ctx, name)["state"] == "running"
        # The successor is the guest's own: in its cgroup.
        assert records[name]["pid"] in _cgroup_procs(name)
    for name in ("left", "right"):
        ctx("stop", name)
        assert left_behind(name, ctx) == []


def test_shared_guests_outlive_a_daemon_restart_and_take_limits_at_once(
    ctx: Contextd, guest_tree: Path
) -> None:
    _start_shared(ctx, guest_tree, "kept")
    server = _records(ctx)["kept"]["pid"]
    ctx.kill()  # the daemon ends; its guests and their shared server run on
    ctx.serve()
    assert guest_status(ctx, "kept")["state"] == "running"
    _start_shared(ctx, guest_tree, "joined")  # the new daemon finds the server listening
    assert _records(ctx)["joined"]["pid"] == server
    # `cowfs limit` tells the server at once (SIGHUP), whatever mount it is for.
    root = ctx.base / "cowfs" / "guests" / "joined"
    cowfs = str(Path(sys.executable).parent / "cowfs")
    used = json.loads(
        subprocess.run(
            [cowfs, "du", "--json", str(root)], env=ctx.env, capture_output=True, check=True
        ).stdout
    )["guests"][0]["private_bytes"]
    subprocess.run(
        [cowfs, "limit", "set", str(root), "--space", str(used + 65536)],
        env=ctx.env,
        capture_output=True,
        check=True,
    )
    wrote = ctx(
        "exec",
        "joined",
        "--",
        "/bin/dd",
        "if=/dev/zero",
        "of=/root/big",
        "bs=1024",
        "count=1024",
        check=False,
    )
    assert wrote.returncode != 0 and "No space left on device" in wrote.stderr, wrote
    # by the same server, told, not replaced
    assert procfs_alive(server) and _records(ctx)["joined"]["pid"] == server
    assert guest_status(ctx, "joined")["root_server_replacements"] == 0
    assert (
        ctx(
            "exec", "kept", "--", "/bin/dd", "if=/dev/zero", "of=/root/big", "bs=1024", "count=1024"
        ).returncode
        == 0
    )  # another guest's mount has no such limit
    for name in ("kept", "joined"):
        ctx("stop", name)
        assert left_behind(name, ctx) == []
    assert wait_for(lambda: not procfs_alive(server))
