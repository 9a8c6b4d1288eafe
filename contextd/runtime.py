"""Starting, stopping and observing guests: the library behind contextd's verbs.

Start is transactional: mount the guest's cowfs root -> its cgroup with the
limits -> the console logger -> the new context (contextd.spawn: namespaces,
/proc, /sys, /dev, pivot_root, hostname, capabilities, exec of init; for an
isolated network, contextd.network plugs the new namespace into its bridge
before init runs). A step that fails undoes every step before it. Stop sends
the stop signal to init, waits, then kills every process left in the cgroup
(frozen first), unmounts the root, removes the guest's interfaces and the
cgroup: nothing is left.

A running guest is recorded in /run/contextd/guests/NAME.json (contextd.runstate):
a restarted contextd finds and adopts it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import signal
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from contextd import network, procfs, runstate
from contextd.cgroups import Cgroup
from contextd.config import GuestConfig
from contextd.forkserver import ForkServer, ForkServerError
from contextd.paths import log_dir, run_dir
from cowfs.errors import CowfsError
from cowfs.host import registry
from cowfs.host.guests import Guest as CowfsGuest
from cowfs.host.guests import set_disk_limits
from cowfs.host.statedb import StateDB
from cowfs.serve.mount import unmount

log = logging.getLogger(__name__)


class GuestError(CowfsError):
    """A guest operation that cannot be done; one line for the admin."""


class _Undo:
    """Steps to undo, last first, if a later step fails."""

    def __init__(self) -> None:
        self.steps: list[tuple[str, Callable[[], object]]] = []

    def push(self, what: str, step: Callable[[], object]) -> None:
        self.steps.append((what, step))

    def run(self) -> None:
        for what, step in reversed(self.steps):
            try:
                step()
            except Exception as e:  # keep undoing the rest
                log.error("undo %s failed: %s", what, e)


def _apply_disk_limits(config: GuestConfig) -> None:
    """The configuration's disk limits into cowfs's books (the reserve stays as set there)."""
    limits = config.limits
    if limits.disk_space is None and limits.disk_inodes is None:
        return
    set_disk_limits(
        CowfsGuest(config.name, config.root), space=limits.disk_space, inodes=limits.disk_inodes
    )


def _kill_and_remove(cgroup: Cgroup) -> None:
    """Undo a start's cgroup: its processes, and a FUSE server a lazy unmount left running."""
    cgroup.kill_all()
    for pid in cgroup.fuse_server_pids():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    cgroup.remove()


@contextlib.contextmanager
def _devnull() -> Iterator[int]:
    fd = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    try:
        yield fd
    finally:
        os.close(fd)


def _root_only_dir(path: Path) -> Path:
    """path, made if missing, readable by root only: guests' roots and consoles are the
    admin's (a host user must not reach a guest's setuid files through its mount point)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.stat().st_mode & 0o077:
        path.chmod(0o700)
    return path


class Runtime:
    """Guests' lifecycle, and what the daemon keeps for it: the fork server its guests'
    helper processes come from (contextd.forkserver), and a pidfd of each guest's
    console logger (stop waits for it: it ends with the guest's last process)."""

    def __init__(self, helpers: ForkServer | None = None):
        self.helpers = helpers or ForkServer()
        self._console_loggers: dict[str, int] = {}

    def close(self) -> None:
        """End the fork server (guests and their helpers run on)."""
        self.helpers.close()

    def start(self, config: GuestConfig) -> runstate.RunState:
        """Boot a guest (see the module docstring); its run state."""
        existing = runstate.load(config.name)
        if existing is not None and runstate.is_running(existing):
            raise GuestError(
                f"guest {config.name} is already running (init pid {existing.init_pid})"
            )
        if not os.path.isdir(config.root):
            raise GuestError(f"guest {config.name}: root {config.root} does not exist")
        if registry.mounts_serving(config.root):
            raise GuestError(f"guest {config.name}: its root {config.root} is mounted already")
        undo = _Undo()
        try:
            cgroup = Cgroup(config.name)
            if cgroup.exists():
                cgroup.kill_all()
                cgroup.remove()
            cgroup.create(config.limits)
            undo.push("cgroup", lambda: _kill_and_remove(cgroup))
            mountpoint = _root_only_dir(run_dir() / "roots") / config.name
            mountpoint.mkdir(exist_ok=True)
            _apply_disk_limits(config)
            fuse_server = self._mount_root(config, str(mountpoint))
            undo.push("cowfs mount", lambda: unmount(str(mountpoint), lazy=True))
            # The console logger (started below) ends once nothing of the guest holds
            # its pipe: waited for after the cgroup's processes are killed.
            undo.push("console logger", lambda: self._end_logger(config.name))
            console_log = _root_only_dir(log_dir()) / f"{config.name}.console.log"
            console_r, console_w = os.pipe2(os.O_CLOEXEC)
            try:
                with _devnull() as null:
                    logger = self.helpers.run(
                        "console", {"log": str(console_log)}, [console_r, null, null]
                    )
                with contextlib.suppress(ProcessLookupError):  # gone already: nothing to wait for
                    self._console_loggers[config.name] = os.pidfd_open(logger)
            except ForkServerError as e:
                os.close(console_w)
                raise GuestError(f"guest {config.name}: console logger not started: {e}") from None
            finally:
                os.close(console_r)
            undo.push("network", lambda: network.unplug(config))
            try:
                pid = self._spawn(config, str(mountpoint), console_w, cgroup, fuse_server)
            finally:
                os.close(console_w)
            state = runstate.RunState(
                name=config.name,
                xid=config.xid,
                init_pid=pid,
                init_start=procfs.start_time(pid) or 0,
                mountpoint=str(mountpoint),
                root=config.root,
                started=time.time(),
                console_log=str(console_log),
            )
            runstate.save(state)
            return state
        except BaseException:
            undo.run()
            raise

    def _mount_root(self, config: GuestConfig, mountpoint: str) -> int:
        """Mount the guest's cowfs root at mountpoint: a FUSE server forked by the fork
        server; its pid."""
        # Not forked from contextd itself: its threads must not be forked.
        answer_r, answer_w = os.pipe2(os.O_CLOEXEC)
        try:
            with _devnull() as null:
                args = {
                    "backing": config.root,
                    "mountpoint": mountpoint,
                    "xid": config.xid,
                    "log": str(_root_only_dir(log_dir()) / f"{config.name}.cowfs.log"),
                }
                self.helpers.run("mount", args, [null, answer_w, answer_w])
        except ForkServerError as e:
            os.close(answer_r)
            raise GuestError(f"guest {config.name}: root not mounted: {e}") from None
        finally:
            os.close(answer_w)
        with os.fdopen(answer_r) as answer:  # until the job ends
            output = answer.read().strip()
        # Its answer is its last line; anything before it went to its stderr.
        try:
            reply = json.loads(output.splitlines()[-1])
        except (IndexError, ValueError):
            raise GuestError(f"guest {config.name}: root not mounted: {output}") from None
        if "error" in reply:
            raise GuestError(f"guest {config.name}: {reply['error']}")
        return int(reply["pid"])

    def _spawn(
        self, config: GuestConfig, mountpoint: str, console_w: int, cgroup: Cgroup, fuse_server: int
    ) -> int:
        request: dict[str, object] = {
            "root": mountpoint,
            "hostname": config.hostname,
            "init": config.init,
            "environment": config.environment,
            "capabilities": config.capabilities,
            "net": config.net.mode,
            "console_fd": 3,
        }
        ours, theirs = socket.socketpair()
        errors_r, errors_w = os.pipe2(os.O_CLOEXEC)
        try:
            self.helpers.run("spawn", {}, [theirs.fileno(), theirs.fileno(), errors_w, console_w])
        except ForkServerError as e:
            ours.close()
            os.close(errors_r)
            raise GuestError(f"guest {config.name}: context not created: {e}") from None
        finally:
            theirs.close()
            os.close(errors_w)
        to_helper = ours.makefile("w")
        from_helper = ours.makefile("r")
        try:
            to_helper.write(json.dumps(request) + "\n")
            to_helper.flush()
            line = from_helper.readline().strip()
            if not line.isdigit():
                with os.fdopen(os.dup(errors_r)) as errors:
                    problem = errors.read().strip()
                raise GuestError(f"guest {config.name}: context not created: {problem}")
            pid = int(line)
            try:
                cgroup.add(pid)
                # The FUSE server is the guest's too, so that the guest pays for the
                # work it makes it do. Moved right after init: in cgroup v1 the first
                # move of a burst waits for an RCU grace period (~10 ms here), the
                # ones right after it do not.
                cgroup.add_fuse_server(fuse_server)
                if config.net.mode == "isolated":
                    network.plug(config, pid)
            except BaseException:
                os.kill(pid, signal.SIGKILL)
                raise
            to_helper.write("go\n")
            to_helper.flush()
            result = from_helper.readline().strip()
            if result != "ok":
                raise GuestError(
                    f"guest {config.name}: init did not start: {result.removeprefix('error: ')}"
                )
            return pid
        finally:
            to_helper.close()
            from_helper.close()
            ours.close()
            os.close(errors_r)

    def stop(self, config: GuestConfig, timeout: float | None = None) -> None:
        """Stop a running guest and leave nothing behind."""
        state = runstate.load(config.name)
        cgroup = Cgroup(config.name)
        if state is None and not cgroup.exists():
            raise GuestError(f"guest {config.name} is not running")
        timeout = config.stop_timeout if timeout is None else timeout
        if state is not None and runstate.is_running(state):
            with contextlib.suppress(ProcessLookupError):
                os.kill(state.init_pid, config.stop_signal)
            deadline = time.monotonic() + timeout
            pause = 0.001  # init mostly ends within a few ms: look again soon, then less often
            while time.monotonic() < deadline and cgroup.pids():
                time.sleep(pause)
                pause = min(pause * 2, 0.05)
        cgroup.kill_all()
        self._reap(config.name, state)
        mountpoint = state.mountpoint if state else str(run_dir() / "roots" / config.name)
        if os.path.realpath(mountpoint) in registry.mounted_points():
            for _ in range(100):
                try:
                    unmount(mountpoint)
                    break
                except CowfsError as e:
                    if "busy" not in str(e):
                        raise
                    time.sleep(0.05)  # the guest's mount namespace is being torn down
            else:
                unmount(mountpoint, lazy=True)
        network.unplug(config)
        cgroup.remove()
        runstate.drop(config.name)

    def _reap(self, name: str, state: runstate.RunState | None) -> None:
        """Collect a stopped guest's init (ours while we are its subreaper) and console logger."""
        if state is not None:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(state.init_pid, os.WNOHANG)
        self._end_logger(name)

    def _end_logger(self, name: str) -> None:
        """Wait for a guest's console logger to end (it does with the guest's last process)."""
        logger = self._console_loggers.pop(name, None)
        if logger is not None:
            # The fork server's child, not ours: wait through its pidfd, so that the
            # log is complete once stop returns.
            try:
                if not select.select([logger], [], [], 5)[0]:
                    with contextlib.suppress(ProcessLookupError):
                        signal.pidfd_send_signal(logger, signal.SIGKILL)
                    select.select([logger], [], [], 5)
                # Ours to reap if the fork server died before it: we are the subreaper.
                with contextlib.suppress(ChildProcessError):
                    os.waitid(os.P_PIDFD, logger, os.WEXITED | os.WNOHANG)
            finally:
                os.close(logger)


@dataclass
class Status:
    """What ``contextd status`` shows of a guest (vserver-stat)."""

    name: str
    xid: int
    state: str
    init_pid: int | None
    processes: int
    memory_bytes: int | None
    cpu_user_seconds: float | None
    cpu_system_seconds: float | None
    uptime_seconds: float | None
    disk_bytes: int | None
    disk_inodes: int | None
    limit_hits: dict[str, int]
    root: str
    hostname: str
    net_mode: str
    bridge: str | None
    addresses: list[str]
    traffic: dict[str, int] | None


def status(config: GuestConfig) -> Status:
    """A guest's state and accounting."""
    state = runstate.load(config.name)
    running = state is not None and runstate.is_running(state)
    cgroup = Cgroup(config.name)
    stats = cgroup.stats() if cgroup.exists() else None
    hits: dict[str, int] = {}
    disk_bytes = disk_inodes = None
    db = StateDB()
    try:
        guest = db.guest(config.root, create=False)
        if guest is not None:
            usage = db.usage(guest.id)
            if usage is not None:
                disk_bytes, disk_inodes = usage.bytes, usage.inodes
            hits.update({f"disk {k}": v for k, v in db.hits(guest.id).items()})
    finally:
        db.close()
    counters = network.traffic(config) if running else None
    if stats is not None:
        if stats.pids_limit_hits:
            hits["pids"] = stats.pids_limit_hits
        if stats.memory_limit_hits:
            hits["memory"] = stats.memory_limit_hits
    return Status(
        name=config.name,
        xid=config.xid,
        state="running" if running else "stopped",
        init_pid=state.init_pid if running and state else None,
        processes=stats.processes if stats else 0,
        memory_bytes=stats.memory_bytes if stats else None,
        cpu_user_seconds=stats.cpu_user_seconds if stats else None,
        cpu_system_seconds=stats.cpu_system_seconds if stats else None,
        uptime_seconds=time.time() - state.started if running and state else None,
        disk_bytes=disk_bytes,
        disk_inodes=disk_inodes,
        limit_hits=hits,
        root=config.root,
        hostname=config.hostname,
        net_mode=config.net.mode,
        bridge=config.net.bridge if config.net.mode == "isolated" else None,
        addresses=[str(a) for a in config.net.addresses],
        traffic=asdict(counters) if counters else None,
    )
