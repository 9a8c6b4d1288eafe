"""Acceptance: Debian guests boot with their own init (systemd, sysvinit) under contextd.

Each guest is a debootstrapped bookworm with openssh-server, cron and
nginx-light (tools/mkguest-debian.sh, cached per machine), on an isolated
network inside a network namespace of the test's own. Each test boots it
with its own /sbin/init, checks that it came up (systemd: `systemctl
is-system-running` says running; sysvinit: runlevel 2), that sshd and nginx
answer at the guest's address, that the console log shows the boot, that
stop shuts it down cleanly through its init, and that it starts again.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import ROOT, have, run
from contextd_harness import Contextd, cgroup_v2

pytestmark = pytest.mark.slow

PACKAGES = "openssh-server cron nginx-light"
ADDRESS = "10.77.0.60"


@pytest.fixture(scope="module")
def templates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    if not have("debootstrap"):
        pytest.skip("debootstrap is not installed (tools/install.sh installs it)")
    base = tmp_path_factory.mktemp("distributions")
    trees = {}
    for init in ("systemd", "sysvinit"):
        trees[init] = base / init
        run(
            ROOT / "tools" / "mkguest-debian.sh",
            "--init",
            init,
            "--packages",
            PACKAGES,
            trees[init],
        )
    return trees


def _until(predicate: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def _ssh_banner(ctx: Contextd) -> str:
    script = (
        "import socket, sys; s = socket.create_connection((sys.argv[1], 22), timeout=2);"
        "sys.stdout.write(s.recv(64).decode())"
    )
    return ctx.on_host(sys.executable, "-c", script, ADDRESS, check=False).stdout


def _http(ctx: Contextd) -> str:
    script = (
        "import sys, urllib.request;"
        "r = urllib.request.urlopen('http://' + sys.argv[1] + '/', timeout=3);"
        "sys.stdout.write(str(r.status))"
    )
    return ctx.on_host(sys.executable, "-c", script, ADDRESS, check=False).stdout


def _came_up(ctx: Contextd, init: str) -> str:
    if init == "systemd":
        return ctx(
            "exec", "deb", "--", "systemctl", "is-system-running", "--wait", check=False
        ).stdout.strip()
    return ctx("exec", "deb", "--", "runlevel", check=False).stdout.strip()


@pytest.mark.parametrize("mode", ["userns", "privileged"])
@pytest.mark.parametrize("init", ["systemd", "sysvinit"])
def test_a_debian_guest_boots_serves_and_stops_with_its_own_init(
    netctx: Contextd, templates: dict[str, Path], init: str, mode: str
) -> None:
    ctx = netctx
    ctx("create", "deb", "--from", str(templates[init]), "--address", ADDRESS, f"--{mode}")
    for boot in (1, 2):  # started, stopped and started again
        ctx("start", "deb")
        assert _until(lambda: _ssh_banner(ctx).startswith("SSH-2.0-OpenSSH"), 30), ctx(
            "logs", "deb"
        ).stdout
        expected = "running" if init == "systemd" else "N 2"
        came_up = _came_up(ctx, init)
        if came_up != expected and init == "systemd":
            failed = ctx("exec", "deb", "--", "systemctl", "--failed", "--no-pager", check=False)
            journal = ctx("exec", "deb", "--", "journalctl", "-b", "-p", "warning", check=False)
            pytest.fail(f"{came_up}:\n{failed.stdout}\n{journal.stdout[-3000:]}")
        assert came_up == expected, ctx("logs", "deb").stdout[-3000:]
        if init == "systemd" and cgroup_v2():  # its units' cgroups, in its own subtree
            own = Path("/sys/fs/cgroup/contextd/deb/guest/delegated")
            assert (own / "init.scope").is_dir() and (own / "system.slice").is_dir()
        assert _until(lambda: _http(ctx) == "200", 10)
        log = ctx("logs", "deb").stdout
        booted = (
            r"Reached target .*multi-user\.target" if init == "systemd" else "Entering runlevel: 2"
        )
        assert len(re.findall(booted, log)) == boot, log[-3000:]
        assert ctx("exec", "deb", "--", "dpkg", "--verify").stdout == ""
        began = time.monotonic()
        ctx("stop", "deb")
        took = time.monotonic() - began
        status = json.loads(ctx("status", "deb", "--json").stdout)
        # a clean halt by init itself, not the SIGKILL after the stop timeout (5 s)
        assert status["state"] == "stopped", status
        assert status["last_end"].startswith("stopped by contextd (init asked for a halt)"), status
        assert took < 5.0, took
    assert _ssh_banner(ctx) == ""  # and nothing answers any more
