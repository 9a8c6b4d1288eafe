"""A contextd daemon of a test's own, and what tests of it share."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import tomli_w

CONTEXTD = str(Path(sys.executable).parent / "contextd")


class Contextd:
    """A contextd daemon of the test's own, with its own directories."""

    def __init__(
        self,
        base: Path,
        own_network: bool = False,
        guest_mode: str = "userns",
        serve_args: tuple[str, ...] = (),
    ):
        self.base = base
        self.serve_args = serve_args  # more of `contextd serve`'s options
        # What `create` is told, for tests that try a thing in both modes: "userns"
        # (the default) or "privileged".
        self.guest_mode = guest_mode
        # In a network namespace of the test's own, the daemon's bridges and the
        # guests' traffic never touch the machine's network. Named (ip netns), so
        # that it outlives a daemon the test stops, for the one it starts next.
        self.own_network = own_network
        digest = hashlib.sha256(str(base).encode()).hexdigest()[:12]
        self.netns = f"contextd-test-{digest}" if own_network else ""
        self.env = dict(os.environ)
        self.env.update(
            CONTEXTD_CONFIG_DIR=str(base / "etc"),
            CONTEXTD_RUN_DIR=str(base / "run"),
            CONTEXTD_LOG_DIR=str(base / "log"),
            CONTEXTD_SOCKET=str(base / "run" / "contextd.sock"),
            COWFS_ROOT=str(base / "cowfs"),  # guests' roots: guests/NAME of this test only
        )
        (base / "etc").mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen[bytes] | None = None

    def serve(self) -> None:
        if self.own_network and not Path("/run/netns", self.netns).exists():
            subprocess.run(["ip", "netns", "add", self.netns], check=True)
        wrapper = self._in_network()
        self.proc = subprocess.Popen(
            [*wrapper, CONTEXTD, "serve", "--log", str(self.base / "daemon.log"), *self.serve_args],
            env=self.env,
        )
        for _ in range(400):
            sock = socket.socket(socket.AF_UNIX)
            try:
                sock.connect(str(self.base / "run" / "contextd.sock"))
                return
            except OSError:
                time.sleep(0.05)
            finally:
                sock.close()
        raise AssertionError("contextd did not start: " + self.log())

    def on_host(self, *command: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a command on the daemon's side of the guests' network (its namespace)."""
        prefix = self._in_network()
        return subprocess.run(
            [*prefix, *command], capture_output=True, text=True, timeout=60, check=check
        )

    def _in_network(self) -> list[str]:
        """The command prefix that runs a command in the daemon's network namespace
        (nsenter, not `ip netns exec`: that one gives the command a mount namespace
        of its own, where the daemon's mounts would be out of the tests' sight)."""
        return ["nsenter", f"--net=/run/netns/{self.netns}", "--"] if self.own_network else []

    def zombie_children(self) -> list[str]:
        """Children of the daemon that ended and that it has not reaped."""
        assert self.proc is not None
        zombies: list[str] = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rpartition(")")[2].split()
            except OSError:
                continue
            if fields[0] == "Z" and int(fields[1]) == self.proc.pid:
                zombies.append(stat.parent.name + " " + stat.read_text().split()[1])
        return zombies

    def kill(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=30)
            self.proc = None

    def log(self) -> str:
        path = self.base / "daemon.log"
        return path.read_text() if path.exists() else ""

    def __call__(
        self, *args: str, check: bool = True, stdin: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [CONTEXTD, *args],
            env=self.env,
            capture_output=True,
            text=True,
            input=stdin,
            timeout=120,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"contextd {args} exited {result.returncode}: {result.stderr}")
        return result

    def configure(self, name: str, **settings: object) -> Path:
        """Rewrite a created guest's configuration with other values of its keys."""
        path = self.base / "etc" / f"{name}.toml"
        data = tomllib.loads(path.read_text())
        data.update(settings)
        path.write_text(tomli_w.dumps(data))
        return path

    def cleanup(self) -> None:
        for config in (self.base / "etc").glob("*.toml"):
            self("stop", config.stem, "--timeout", "0", check=False)
        self.kill()
        if self.own_network:
            subprocess.run(["ip", "netns", "delete", self.netns], check=False)


@contextmanager
def running_contextd(
    base: Path, own_network: bool = False, guest_mode: str = "userns"
) -> Iterator[Contextd]:
    """A daemon of the test's own, serving until the block ends; then its guests are
    stopped and it is stopped."""
    daemon = Contextd(base, own_network=own_network, guest_mode=guest_mode)
    daemon.serve()
    try:
        yield daemon
    finally:
        daemon.cleanup()


SLEEPER = "/bin/sh -c 'echo booted; exec sleep 1000000'"


def procfs_alive(pid: int) -> bool:
    """True if pid is a process that has not ended (a zombie has)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def parent_of(pid: int) -> int:
    """A process's parent's pid (the field after its command name in /proc/PID/stat)."""
    return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])


def cgroup_of(pid: int) -> str:
    """A process's cgroup v2 path as the host sees it."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return line[3:]
    raise AssertionError(f"process {pid} has no cgroup v2 path")


def fuse_server_of(name: str) -> int:
    """The pid of the cowfs server of a running guest's root."""
    for record in Path("/run/cowfs/mounts").glob("*.json"):
        with contextlib.suppress(OSError, ValueError):
            mount = json.loads(record.read_text())
            if mount["mountpoint"].endswith(f"/roots/{name}") and procfs_alive(mount["pid"]):
                return int(mount["pid"])
    raise AssertionError(f"no FUSE server serves guest {name}")


def left_behind(name: str, ctx: Contextd) -> list[str]:
    """Anything of the guest still on the host: processes, mounts, cgroups, state."""
    found = []
    for controller in ("memory", "cpu", "cpuacct", "pids", "freezer"):
        if Path(f"/sys/fs/cgroup/{controller}/contextd/{name}").exists():
            found.append(f"cgroup {controller}")
    if Path(f"/sys/fs/cgroup/contextd/{name}").is_dir():  # cgroup v2
        found.append("cgroup")
    mounts = Path("/proc/self/mountinfo").read_text()
    if f"/roots/{name} " in mounts:
        found.append("mount")
    if (ctx.base / "run" / "guests" / f"{name}.json").exists():
        found.append("state")
    mountpoint = os.path.realpath(ctx.base / "run" / "roots" / name)
    key = hashlib.sha256(mountpoint.encode()).hexdigest()[:16]
    if Path("/run/cowfs/sessions", key).exists():
        found.append("session journal")
    for record in Path("/run/cowfs/mounts").glob("*.json"):
        with contextlib.suppress(OSError, ValueError):
            if json.loads(record.read_text())["mountpoint"] == mountpoint:
                found.append(f"mount record {record.name}")
    found += [f"zombie {pid}" for pid in ctx.zombie_children()]
    return found


def cgroup_v2() -> bool:
    """True on a host whose memory, cpu and pids controllers are on the unified hierarchy
    (contextd then uses cgroup v2)."""
    try:
        controllers = Path("/sys/fs/cgroup/cgroup.controllers").read_text().split()
    except OSError:
        return False
    return {"memory", "cpu", "pids"} <= set(controllers)


def wait_for(predicate: Callable[[], bool], seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def guest_status(ctx: Contextd, name: str) -> dict[str, Any]:
    return dict(json.loads(ctx("status", name, "--json").stdout))
