"""The system install on a machine whose PID 1 is systemd, used as an administrator uses it:
tools/system.sh install; metrics turned on in /etc/default/contextd; the daemon run by its
unit; `man contextd`; Tab completing `contextd start ` with the guests' names in root's
login shell; two guests made and started with the `contextd` on PATH and seen in a
Prometheus scrape; the unit reloaded, restarted, killed and stopped while they run
(they keep running, in their own cgroups, and are adopted); then everything taken back.

It changes the machine (/usr/local, /etc/systemd/system, /etc/default/contextd,
/etc/contextd, /var/lib/cowfs): it runs only where systemd is PID 1 and nothing of a
system install is there yet (tools/vm.sh test tests/test_system_unit.py runs it in a
throwaway VM), and takes back what it made.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import select
import shutil
import socket
import struct
import subprocess
import termios
import time
import tomllib
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import tomli_w
from conftest import build_busybox_guest
from contextd_harness import SLEEPER, cgroup_of, cgroup_v2, parent_of, procfs_alive, wait_for
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
SYSTEM_SH = ROOT / "tools" / "system.sh"
UNIT = Path("/etc/systemd/system/contextd.service")
DEFAULTS = Path("/etc/default/contextd")
CONFIG_DIR = Path("/etc/contextd")
CGROUP = Path("/sys/fs/cgroup")
GUESTS = ("alpha", "bravo")
# What a login shell of root's has: none of the test run's own variables (COWFS_ROOT,
# CONTEXTD_*), which the daemon under its unit does not have either.
ADMIN_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
    "TERM": "xterm",
    "USER": "root",
    "LOGNAME": "root",
    "SHELL": "/bin/bash",
}


def _not_here() -> str | None:
    """Why the test cannot run here (None: it can)."""
    if not Path("/run/systemd/system").is_dir() or Path("/proc/1/comm").read_text() != "systemd\n":
        return "PID 1 is not systemd (tools/vm.sh test tests/test_system_unit.py runs it in a VM)"
    if not cgroup_v2():
        return "not a cgroup v2 host (the memory, cpu and pids controllers are not unified)"
    for program in ("systemctl", "journalctl", "man", "bash"):
        if shutil.which(program) is None:
            return f"no {program} on PATH"
    if not Path("/usr/share/bash-completion/bash_completion").exists():
        return "no bash-completion package (what loads completion scripts in a login shell)"
    for path in (UNIT, DEFAULTS, Path("/usr/local/sbin/contextd"), Path("/run/contextd")):
        if path.exists() or path.is_symlink():
            return f"{path} is there: a system install of contextd is not to be touched"
    for name in GUESTS:
        if (CONFIG_DIR / f"{name}.toml").exists():
            return f"a guest {name} is configured on this machine"
    return None


pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or _not_here() is not None,
    reason=f"the system install under systemd: {_not_here()}",
)


def sh(*args: str | Path, check: bool = True, timeout: float = 300) -> str:
    """Run a command as root's shell would; its stdout."""
    done = subprocess.run(
        [str(a) for a in args],
        env=ADMIN_ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if check and done.returncode != 0:
        raise AssertionError(f"{args} exited {done.returncode}: {done.stderr}{done.stdout}")
    return done.stdout


def contextd(*args: str, check: bool = True) -> str:
    """The contextd on root's PATH (the installed one)."""
    return sh("contextd", *args, check=check)


def status(name: str) -> dict[str, object]:
    return dict(json.loads(contextd("status", name, "--json")))


def init_pid(name: str) -> int:
    pid = status(name)["init_pid"]
    assert isinstance(pid, int), (name, pid)
    return pid


def unit_property(name: str) -> str:
    return sh("systemctl", "show", "--value", "-p", name, "contextd").strip()


def unit_cgroup_pids() -> set[int]:
    """The processes in contextd.service's own cgroup."""
    path = CGROUP / "system.slice" / "contextd.service" / "cgroup.procs"
    try:
        return {int(p) for p in path.read_text().split()}
    except FileNotFoundError:
        return set()


def daemon_ready() -> bool:
    return (
        subprocess.run(
            ["contextd", "list"], env=ADMIN_ENV, capture_output=True, timeout=60
        ).returncode
        == 0
    )


def daemon_events(message: str) -> list[dict[str, object]]:
    """The JSON log lines with this message that the unit's current run wrote to the
    journal."""
    invocation = unit_property("InvocationID")
    text = sh("journalctl", "-o", "cat", "--no-pager", f"_SYSTEMD_INVOCATION_ID={invocation}")
    events = []
    for line in text.splitlines():
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if isinstance(entry, dict) and entry.get("msg") == message:
                events.append(entry)
    return events


def scrape(port: int) -> dict[tuple[str, str], float]:
    """contextd_guest_up and contextd_guest_state{state="running"} by guest, over HTTP."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=60) as answer:
        assert answer.status == 200
        text = answer.read().decode()
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "contextd_guest_up":
                found[(sample.labels["name"], "up")] = sample.value
            if sample.name == "contextd_guest_state" and sample.labels["state"] == "running":
                found[(sample.labels["name"], "running")] = sample.value
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tab_complete(line: str, want: tuple[str, ...], seconds: float = 120) -> str:
    """Type line and Tab twice in an interactive login shell of root's on a terminal; what
    the terminal showed (once every word of want is on it, or the time is up)."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 200, 0, 0))
    shell = subprocess.Popen(
        ["bash", "--login", "-i"],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env=ADMIN_ENV,
        cwd="/root",
        start_new_session=True,
    )
    os.close(slave)
    seen = b""

    def read(until: float) -> None:
        nonlocal seen
        while time.monotonic() < until:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:
                    return
                if not chunk:
                    return
                seen += chunk
            after = seen.decode(errors="replace").split(line.rstrip(), 1)
            if len(after) == 2 and all(word in after[1] for word in want):
                return

    try:
        # Typed ahead of the prompt, Tab would reach the terminal's line discipline
        # rather than readline: first the prompt after a command's output.
        os.write(master, b"echo RE''ADY\n")
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and "# " not in seen.partition(b"READY\r\n")[2].decode(
            errors="replace"
        ):
            read(time.monotonic() + 0.5)
        time.sleep(0.5)
        os.write(master, line.encode() + b"\t\t")
        read(deadline)
        os.write(master, b"\x03exit\n")
    finally:
        with contextlib.suppress(subprocess.TimeoutExpired):
            shell.wait(timeout=10)
        if shell.poll() is None:
            shell.kill()
            shell.wait()
        os.close(master)
    text = seen.decode(errors="replace")
    return text.split(line.rstrip(), 1)[1] if line.rstrip() in text else ""


def cgroups_of_guests() -> dict[str, str]:
    """Where each guest's init and FUSE server are, and the controllers systemd's root
    and contextd's part of the tree pass down."""
    seen = {
        "root subtree_control": (CGROUP / "cgroup.subtree_control").read_text().strip(),
        "contextd subtree_control": (CGROUP / "contextd" / "cgroup.subtree_control")
        .read_text()
        .strip(),
    }
    for name in GUESTS:
        pid = init_pid(name)
        seen[f"{name} init"] = f"{pid} {cgroup_of(pid)}"
        for limit in ("memory.max", "cpu.max", "guest/pids.max"):
            seen[f"{name} {limit}"] = (CGROUP / "contextd" / name / limit).read_text().strip()
        servers = (CGROUP / "contextd" / name / "cowfs" / "cgroup.procs").read_text().split()
        seen[f"{name} cowfs servers"] = " ".join(sorted(servers))
    return seen


@pytest.fixture
def installed() -> Iterator[int]:
    """The system install, metrics on a free port in /etc/default/contextd; the port.
    Whatever the test left: guests stopped and deleted, the unit stopped, the install
    taken back."""
    port = free_port()
    try:
        sh(SYSTEM_SH, "install", timeout=900)
        DEFAULTS.write_text(
            "# contextd serve's options (tests/test_system_unit.py)\n"
            f'CONTEXTD_OPTS="--metrics 127.0.0.1:{port}"\n'
        )
        yield port
    finally:
        if any((CONFIG_DIR / f"{name}.toml").exists() for name in GUESTS) and UNIT.exists():
            if unit_property("ActiveState") != "active":
                sh("systemctl", "start", "contextd", check=False)
                wait_for(daemon_ready, 120)
            for name in GUESTS:
                contextd("stop", name, "--timeout", "0", check=False)
                contextd("delete", name, "--remove-root", check=False)
        sh("systemctl", "stop", "contextd", check=False)
        sh(SYSTEM_SH, "uninstall", check=False)
        DEFAULTS.unlink(missing_ok=True)
        sh("systemctl", "daemon-reload", check=False)
        sh("systemctl", "reset-failed", "contextd", check=False)


def test_the_system_install_under_systemd(installed: int, tmp_path: Path) -> None:
    port = installed
    sh("systemctl", "daemon-reload")
    sh("systemctl", "start", "contextd")
    assert sh("systemctl", "is-active", "contextd").strip() == "active"
    # Type=notify: started means the daemon answers, at once.
    assert daemon_ready(), sh("journalctl", "-u", "contextd", "--no-pager")
    # The unit took its options from /etc/default/contextd.
    daemon = int(unit_property("MainPID"))
    argv = Path(f"/proc/{daemon}/cmdline").read_bytes().split(b"\0")
    assert argv[-3:] == [b"--metrics", f"127.0.0.1:{port}".encode(), b""], argv

    # man contextd: the page installed in /usr/local, found by man-db's own search path.
    # (/usr/local/man is Debian's link to /usr/local/share/man)
    found = sh("man", "-w", "contextd").strip()
    assert os.path.realpath(found) == "/usr/local/share/man/man8/contextd.8", found
    page = subprocess.run(
        ["man", "8", "contextd"],
        env={**ADMIN_ENV, "MANPAGER": "cat", "MANWIDTH": "120"},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    assert "boot, stop, enter and account guests" in page

    # Two guests, made and started through the contextd on PATH.
    tree = build_busybox_guest(tmp_path / "template")
    for name in GUESTS:
        contextd("create", name, "--from", str(tree), "--init", SLEEPER)
        # Limits in each of the controllers it uses, as an administrator sets them.
        config = CONFIG_DIR / f"{name}.toml"
        settings = tomllib.loads(config.read_text())
        settings["limits"] = {"memory": "256M", "pids": 64, "cpu_quota": 0.5}
        config.write_text(tomli_w.dumps(settings))
        contextd("start", name)
        assert status(name)["state"] == "running"

    # Tab after `contextd start ` lists them, in root's login shell.
    shown = tab_complete("contextd start ", GUESTS)
    assert all(name in shown for name in GUESTS), repr(shown)

    # A Prometheus scrape shows both, up.
    metrics = scrape(port)
    for name in GUESTS:
        assert metrics.get((name, "up")) == 1 and metrics.get((name, "running")) == 1, metrics

    # The guests' processes are in contextd's own part of the tree, not the unit's.
    before = cgroups_of_guests()
    for name in GUESTS:
        assert before[f"{name} memory.max"] == str(256 << 20), before
        assert before[f"{name} cpu.max"] == "50000 100000", before
        assert before[f"{name} guest/pids.max"] == "64", before
    inits = {name: init_pid(name) for name in GUESTS}
    for name, pid in inits.items():
        assert cgroup_of(pid) == f"/contextd/{name}/guest/delegated", before
    assert cgroup_of(daemon) == "/system.slice/contextd.service"
    assert not set(inits.values()) & unit_cgroup_pids()
    print("\nthe unit's cgroup:", sorted(unit_cgroup_pids()), "daemon", daemon)
    print("cgroups:", json.dumps(before, indent=1))

    # daemon-reload, and daemon-reexec (what an upgrade of systemd does): systemd reads
    # its units and the tree anew, and leaves the guests' cgroups, controllers and
    # limits alone.
    sh("systemctl", "daemon-reload")
    assert cgroups_of_guests() == before
    sh("systemctl", "daemon-reexec")
    assert daemon_ready()
    assert cgroups_of_guests() == before
    assert int(unit_property("MainPID")) == daemon

    # restart: a new daemon, the guests still running, adopted, scraped again.
    sh("systemctl", "restart", "contextd")
    assert daemon_ready()
    assert int(unit_property("MainPID")) != daemon
    for name, pid in inits.items():
        assert procfs_alive(pid)
        assert status(name)["state"] == "running" and init_pid(name) == pid
    assert wait_for(lambda: len(daemon_events("adopted")) == len(GUESTS), 30)
    assert {e["guest"] for e in daemon_events("adopted")} == set(GUESTS)
    metrics = scrape(port)
    assert all(metrics.get((name, "up")) == 1 for name in GUESTS), metrics
    assert cgroups_of_guests() == before

    # systemctl kill: SIGTERM to every process of the unit. The guests' supervisors
    # (init's parents) are not among them: with the fork server they came from, they
    # are in contextd/_helpers. The daemon ends; the guests run on, and the next daemon
    # finds them running, not ended with a dead supervisor.
    supervisors = {name: parent_of(pid) for name, pid in inits.items()}
    assert not set(supervisors.values()) & unit_cgroup_pids(), supervisors
    assert {cgroup_of(pid) for pid in supervisors.values()} == {"/contextd/_helpers"}
    sh("systemctl", "kill", "contextd")
    assert wait_for(lambda: unit_property("ActiveState") == "inactive", 60)
    time.sleep(2)
    for name, pid in inits.items():
        assert procfs_alive(pid) and procfs_alive(supervisors[name]), name
    sh("systemctl", "start", "contextd")
    assert daemon_ready()
    assert {name: init_pid(name) for name in GUESTS} == inits
    assert wait_for(lambda: len(daemon_events("adopted")) == len(GUESTS), 30)
    time.sleep(3)  # a guest found with its supervisor dead is ended at once
    assert not daemon_events("guest ended")
    assert all(status(name)["state"] == "running" for name in GUESTS)
    assert cgroups_of_guests() == before

    # stop: systemd ends the daemon (KillMode=process); the guests and their
    # supervisors keep running where they were, and nothing is left in the unit.
    in_unit = unit_cgroup_pids()
    assert not set(supervisors.values()) & in_unit, (supervisors, in_unit)
    sh("systemctl", "stop", "contextd")
    assert sh("systemctl", "is-active", "contextd", check=False).strip() == "inactive"
    time.sleep(5)  # time for anything systemd would do after the stop
    for name, pid in inits.items():
        assert procfs_alive(pid), name
        assert procfs_alive(supervisors[name]) and parent_of(pid) == supervisors[name], name
    left = unit_cgroup_pids()
    print("in the unit's cgroup before the stop:", sorted(in_unit), "after:", sorted(left))
    assert left == set()
    assert cgroups_of_guests_without_daemon(inits) == {
        name: f"/contextd/{name}/guest/delegated" for name in GUESTS
    }
    # ... and they are the same guests when it starts again.
    sh("systemctl", "start", "contextd")
    assert daemon_ready()
    assert {name: init_pid(name) for name in GUESTS} == inits
    assert cgroups_of_guests() == before
    assert wait_for(lambda: len(daemon_events("adopted")) == len(GUESTS), 30)

    # The guests' own verbs under the unit: restart one, stop both.
    contextd("restart", GUESTS[0])
    assert init_pid(GUESTS[0]) != inits[GUESTS[0]]
    assert status(GUESTS[0])["state"] == "running"
    assert not procfs_alive(inits[GUESTS[0]])
    for name in GUESTS:
        contextd("stop", name)
        assert status(name)["state"] == "stopped"
        assert not (CGROUP / "contextd" / name).exists()
    metrics = scrape(port)
    assert all(metrics.get((name, "up")) == 0 for name in GUESTS), metrics
    journal = sh("journalctl", "-u", "contextd", "--no-pager", "-o", "short-monotonic")
    print("journal:\n" + journal)
    assert "cannot notify" not in journal and '"level": "error"' not in journal

    # Taken back: the guests deleted, the daemon stopped, the install removed.
    for name in GUESTS:
        contextd("delete", name, "--remove-root")
    sh("systemctl", "stop", "contextd")
    sh(SYSTEM_SH, "uninstall")
    sh("systemctl", "daemon-reload")
    assert sh("systemctl", "cat", "contextd", check=False) == ""
    assert shutil.which("contextd", path=ADMIN_ENV["PATH"]) is None
    assert subprocess.run(["man", "-w", "contextd"], env=ADMIN_ENV, capture_output=True).returncode
    assert not (CGROUP / "contextd" / GUESTS[0]).exists()


def cgroups_of_guests_without_daemon(inits: dict[str, int]) -> dict[str, str]:
    """Where each guest's init is, read from /proc (no daemon to ask)."""
    return {name: cgroup_of(pid) for name, pid in inits.items()}
