"""Starting, stopping and observing guests: the library behind contextd's verbs.

Start is transactional: the guest's cgroup with its limits -> its cowfs root ->
its supervisor (contextd.supervisor: namespaces, /proc, /sys, /dev, the console,
pivot_root, hostname, capabilities, exec of init; for an isolated network,
contextd.network plugs the new namespace into its bridge before init runs). A
step that fails undoes every step before it, and so does an init that ends
within the boot check. Stop sends the stop signal to init and waits for it to
end, then kills every process left in the cgroup (frozen first), unmounts the
root, removes the guest's interfaces and the cgroup: nothing is left.

A running guest is recorded in /run/contextd/guests/NAME.json (contextd.runstate):
a restarted contextd finds and adopts it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import select
import signal
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from contextd import hostids, network, procfs, restarts, runstate
from contextd.cgroups import Cgroup
from contextd.config import AUTO_SIGNAL, ID_RANGE, GuestConfig
from contextd.forkserver import ForkServer, ForkServerError
from contextd.paths import log_dir, run_dir
from cowfs.errors import CowfsError
from cowfs.host import registry
from cowfs.host.guests import Guest as CowfsGuest
from cowfs.host.guests import set_disk_limits
from cowfs.host.statedb import StateDB
from cowfs.serve import host
from cowfs.serve.mount import abort_connection, unmount
from native.syscalls import open_in_root

log = logging.getLogger(__name__)

# Seconds a guest's root server has to end after the unmount at stop before it is
# killed: one that hung or was stopped (SIGSTOP) never notices the unmount.
SERVER_END_TIMEOUT = 10.0


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


def half_started(config: GuestConfig) -> bool:
    """True if some of a guest's start is there (its cgroup, its root mounted)."""
    mountpoint = os.path.realpath(run_dir() / "roots" / config.name)
    return Cgroup(config.name).exists() or mountpoint in registry.mounted_points()


def apply_disk_limits(config: GuestConfig) -> None:
    """The configuration's disk limits into cowfs's books (the reserve stays as set there)."""
    limits = config.limits
    if limits.disk_space is None and limits.disk_inodes is None:
        return
    set_disk_limits(
        CowfsGuest(config.name, config.root), space=limits.disk_space, inodes=limits.disk_inodes
    )


def kill_and_remove(cgroup: Cgroup) -> None:
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


def root_only_dir(path: Path) -> Path:
    """path, made if missing, readable by root only: guests' roots and consoles are the
    admin's (a host user must not reach a guest's setuid files through its mount point)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.stat().st_mode & 0o077:
        path.chmod(0o700)
    return path


class Runtime:
    """Guests' lifecycle, and what the daemon keeps for it: the fork server its guests'
    helper processes come from (contextd.forkserver)."""

    def __init__(self, helpers: ForkServer | None = None):
        self.helpers = helpers or ForkServer()

    def close(self) -> None:
        """End the fork server (guests and their helpers run on)."""
        self.helpers.close()

    def start(self, config: GuestConfig, restarts: list[float] | None = None) -> runstate.RunState:
        """Boot a guest (see the module docstring); its run state. restarts: when its
        restart policy started it lately (recorded with it).

        The start fails if init ends within config.boot_check seconds: a boot
        that failed at once is not a running guest (what its console said
        last is in the error).
        """
        existing = runstate.load(config.name)
        if existing is not None and runstate.is_running(existing):
            raise GuestError(
                f"guest {config.name} is already running (init pid {existing.init_pid})"
            )
        if not os.path.isdir(config.root):
            raise GuestError(f"guest {config.name}: root {config.root} does not exist")
        _refuse_owned_ids(config)
        if registry.mounts_serving(config.root):
            raise GuestError(f"guest {config.name}: its root {config.root} is mounted already")
        undo = _Undo()
        try:
            cgroup = Cgroup(config.name)
            if cgroup.exists():
                cgroup.kill_all()
                cgroup.remove()
            cgroup.create(config.limits)
            undo.push("cgroup", lambda: kill_and_remove(cgroup))
            idmap = config.idmap()
            if idmap is not None:
                cgroup.delegate(idmap["base"], idmap["base"])
            mountpoint = root_only_dir(run_dir() / "roots") / config.name
            mountpoint.mkdir(exist_ok=True)
            apply_disk_limits(config)
            fuse_server = self.mount_root(config, str(mountpoint))
            undo.push("cowfs mount", lambda: unmount(str(mountpoint), lazy=True))
            undo.push("network", lambda: network.unplug(config))
            console_log = log_dir() / f"{config.name}.console.log"
            runstate.exit_record_path(config.name).unlink(missing_ok=True)
            runstate.root_server_record_path(config.name).unlink(missing_ok=True)
            supervisor, pid = self._supervise(
                config, str(mountpoint), console_log, cgroup, fuse_server
            )
            undo.push("supervisor", lambda: _end_started(supervisor, cgroup))
            state = runstate.RunState(
                name=config.name,
                xid=config.xid,
                init_pid=pid,
                init_start=procfs.start_time(pid) or 0,
                mountpoint=str(mountpoint),
                root=config.root,
                started=time.time(),
                console_log=str(console_log),
                supervisor_pid=supervisor.pid,
                supervisor_start=procfs.start_time(supervisor.pid) or 0,
                fuse_server_pid=fuse_server,
                restarts=list(restarts or []),
            )
            runstate.save(state)
            undo.push("run state", lambda: runstate.drop(config.name))
            if _wait_pidfd(supervisor, config.boot_check):
                record = runstate.load_exit(config.name) or {}
                said = "; console: " + " | ".join(last_lines(record)) if last_lines(record) else ""
                raise GuestError(
                    f"guest {config.name}: {runstate.describe_exit(record)} within"
                    f" {config.boot_check:g} s of its start{said}"
                )
            os.close(supervisor.fd)
            return state
        except BaseException:
            undo.run()
            raise

    def mount_root(self, config: GuestConfig, mountpoint: str) -> int:
        """Mount the guest's cowfs root at mountpoint: a FUSE server forked by the fork
        server, or the shared one (config.fuse_server); its pid."""
        if config.fuse_server == "shared":
            return self._mount_shared(config, mountpoint)
        # Not forked from contextd itself: its threads must not be forked.
        answer_r, answer_w = os.pipe2(os.O_CLOEXEC)
        try:
            with _devnull() as null:
                self.helpers.run(
                    "mount", self.mount_args(config, mountpoint), [null, answer_w, answer_w]
                )
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

    def _mount_shared(self, config: GuestConfig, mountpoint: str) -> int:
        """Mount the root through the shared FUSE server (cowfs.serve.host), started from
        the fork server if none is listening; its pid."""
        args = self.mount_args(config, mountpoint)
        for _attempt in range(3):  # a host that was ending as it was asked: start another
            answer = host.request_mount(self.host_socket(), args)
            if answer is None:
                self._start_host()
                continue
            if "error" in answer:
                raise GuestError(f"guest {config.name}: {answer['error']}")
            return int(answer["pid"])
        raise GuestError(
            f"guest {config.name}: root not mounted: the shared cowfs server did not answer"
        )

    @staticmethod
    def host_socket() -> Path:
        """Where this contextd's shared FUSE server listens."""
        return run_dir() / "cowfs-host.sock"

    def _start_host(self) -> None:
        """Fork the shared FUSE server and wait until it listens."""
        socket_path = self.host_socket()
        with contextlib.suppress(FileNotFoundError):
            socket_path.unlink()  # a dead host's
        with _devnull() as null:
            try:
                pid = self.helpers.run(
                    "host",
                    {"log": str(log_dir() / "cowfs-shared.log"), "socket": str(socket_path)},
                    [null, null, null],
                )
            except ForkServerError as e:
                raise GuestError(f"the shared cowfs server did not start: {e}") from None
        deadline = time.monotonic() + 10
        while not socket_path.exists():
            if time.monotonic() > deadline or not procfs.is_alive(pid):
                raise GuestError(
                    f"the shared cowfs server did not start; see {log_dir() / 'cowfs-shared.log'}"
                )
            time.sleep(0.005)

    @staticmethod
    def mount_args(config: GuestConfig, mountpoint: str) -> dict[str, Any]:
        """The fork server's mount job's arguments (contextd.forkserver.mount_options)."""
        return {
            "backing": config.root,
            "mountpoint": mountpoint,
            "xid": config.xid,
            "log": str(log_dir() / f"{config.name}.cowfs.log"),
            "idmap": config.idmap(),
            "passthrough": config.passthrough,
        }

    def _supervise(
        self,
        config: GuestConfig,
        mountpoint: str,
        console_log: Path,
        cgroup: Cgroup,
        fuse_server: int,
    ) -> tuple[_Process, int]:
        """Start the guest's supervisor (contextd.supervisor), which makes its context and
        execs init; (the supervisor, init's pid)."""
        request: dict[str, object] = {
            "root": mountpoint,
            "hostname": config.hostname,
            "init": list(config.init),
            "environment": dict(config.environment),
            "capabilities": list(config.capabilities),
            "net": config.net.mode,
            "log": str(console_log),
            "exit_record": str(runstate.exit_record_path(config.name)),
            "idmap": config.idmap(),
            "fuse_server": {
                "pid": fuse_server,
                "start": procfs.start_time(fuse_server) or 0,
                "mount": {
                    **self.mount_args(config, mountpoint),
                    "cgroup_dirs": [str(d) for d in cgroup.fuse_server_dirs],
                },
                "record": str(runstate.root_server_record_path(config.name)),
            },
        }
        ours, theirs = socket.socketpair()
        with _devnull() as null:
            try:
                supervisor_pid = self.helpers.run(
                    "supervisor", {}, [theirs.fileno(), theirs.fileno(), null]
                )
            except ForkServerError as e:
                ours.close()
                raise GuestError(f"guest {config.name}: context not created: {e}") from None
            finally:
                theirs.close()
        try:
            supervisor = _Process(supervisor_pid)
        except ProcessLookupError:
            ours.close()
            raise GuestError(f"guest {config.name}: its supervisor ended at once") from None
        to_supervisor = ours.makefile("w")
        from_supervisor = ours.makefile("r")
        try:
            to_supervisor.write(json.dumps(request) + "\n")
            to_supervisor.flush()
            answer = _answer(from_supervisor.readline())
            if "pid" not in answer:
                raise GuestError(f"guest {config.name}: context not created: {answer.get('error')}")
            pid = int(str(answer["pid"]))
            try:
                cgroup.add(pid)
                # The FUSE server is the guest's too, so that the guest pays for the
                # work it makes it do. Moved right after init: in cgroup v1 the first
                # move of a burst waits for an RCU grace period (~10 ms here), the
                # ones right after it do not.
                if config.fuse_server == "own":
                    cgroup.add_fuse_server(fuse_server)
                if config.net.mode == "isolated":
                    network.plug(config, pid)
            except BaseException:
                os.kill(pid, signal.SIGKILL)
                raise
            to_supervisor.write("go\n")
            to_supervisor.flush()
            answer = _answer(from_supervisor.readline())
            if not answer.get("ok"):
                raise GuestError(f"guest {config.name}: init did not start: {answer.get('error')}")
            return supervisor, pid
        except BaseException:
            _wait_pidfd(supervisor, 5)
            os.close(supervisor.fd)
            raise
        finally:
            to_supervisor.close()
            from_supervisor.close()
            ours.close()

    def stop(self, config: GuestConfig, timeout: float | None = None, asked: bool = True) -> None:
        """Stop a running guest and leave nothing behind; asked: by the admin (its end is
        then recorded as a stop, not a failure), else cleaning up after a guest that ended."""
        state = runstate.load(config.name)
        cgroup = Cgroup(config.name)
        if state is None and not half_started(config):
            raise GuestError(f"guest {config.name} is not running")
        timeout = config.stop_timeout if timeout is None else timeout
        if state is not None and runstate.is_running(state):
            self._ask_to_stop(config, state, timeout)
        mountpoint = state.mountpoint if state else str(run_dir() / "roots" / config.name)
        aborted = False
        try:
            cgroup.kill_all(timeout=5)
        except TimeoutError:
            # Waiting for answers its root's FUSE server will never give: cut it off.
            if not abort_connection(mountpoint):
                raise
            log.warning("guest %s: its root's FUSE connection aborted to end it", config.name)
            aborted = True
            cgroup.kill_all()
        if state is not None:
            with contextlib.suppress(ChildProcessError):  # ours if its supervisor died
                os.waitpid(state.init_pid, os.WNOHANG)
            _end_supervisor(state)
            record = runstate.load_exit(config.name)
            if asked and record is not None:
                record["stopped"] = True
                runstate.save_exit(config.name, record)
        if aborted:  # a server that hung: it would not notice the unmount
            for pid in cgroup.fuse_server_pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        unmount_root(mountpoint)
        network.unplug(config)
        cgroup.remove()
        runstate.drop(config.name)

    def _ask_to_stop(self, config: GuestConfig, state: runstate.RunState, timeout: float) -> None:
        """The stop signal to init; wait until init and everything of the guest has ended."""
        try:
            init = _Process(state.init_pid)
        except ProcessLookupError:
            return
        try:
            init.signal(stop_signal_for(config))
            _wait_pidfd(init, timeout)
        finally:
            os.close(init.fd)


def unmount_root(mountpoint: str) -> None:
    """Unmount a guest's root once its processes have ended (if it is mounted): its FUSE
    server ends, or is killed SERVER_END_TIMEOUT seconds later."""
    if os.path.realpath(mountpoint) not in registry.mounted_points():
        return
    for _ in range(100):
        try:
            unmount(mountpoint, timeout=SERVER_END_TIMEOUT, kill_late=True)
            return
        except CowfsError as e:
            if "busy" not in str(e):
                raise
            time.sleep(0.05)  # the guest's mount namespace is being torn down
    unmount(mountpoint, lazy=True, timeout=SERVER_END_TIMEOUT, kill_late=True)


class _Process:
    """A pidfd of a process (not our child as a rule): to signal it and see it end."""

    def __init__(self, pid: int):
        self.pid = pid
        self.fd = os.pidfd_open(pid)

    def signal(self, number: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(self.fd, number)


def _wait_pidfd(process: _Process, timeout: float) -> bool:
    """True if the process ended within timeout seconds (reaped if it is ours to reap)."""
    ended = bool(select.select([process.fd], [], [], timeout)[0])
    if ended:
        with contextlib.suppress(ChildProcessError):
            os.waitid(os.P_PIDFD, process.fd, os.WEXITED | os.WNOHANG)
    return ended


def _refuse_owned_ids(config: GuestConfig) -> None:
    """A GuestError if a user-namespaced guest's host ids are also a host user's or
    group's (hostids: that user could act as the guest's users)."""
    if not config.security.userns:
        return
    base = config.id_base()
    owners = hostids.conflicts(base, ID_RANGE)
    if owners:
        more = f" (and {len(owners) - 1} more)" if len(owners) > 1 else ""
        raise GuestError(
            f"guest {config.name}: its host ids {base}..{base + ID_RANGE - 1} are not its"
            f" own: {owners[0].describe()}{more}, whose processes could act as the guest's"
            " users; give the guest a free security.id_base or take those ids back"
        )


def _end_started(supervisor: _Process, cgroup: Cgroup) -> None:
    """Undo a start's supervisor: the guest's processes killed, the supervisor waited for."""
    cgroup.kill_all()
    _await_supervisor(supervisor)


def _await_supervisor(supervisor: _Process) -> None:
    """Give a supervisor whose guest has ended 5 s to finish, then kill it; its pidfd closed."""
    try:
        if not _wait_pidfd(supervisor, 5):
            supervisor.signal(signal.SIGKILL)
            _wait_pidfd(supervisor, 5)
    finally:
        with contextlib.suppress(OSError):
            os.close(supervisor.fd)


def _end_supervisor(state: runstate.RunState) -> None:
    """Wait for the guest's supervisor to record init's end and finish (it does once init
    has ended); the fork server's child, ours only if the fork server is gone."""
    if (
        not state.supervisor_pid
        or procfs.start_time(state.supervisor_pid) != state.supervisor_start
    ):
        return
    try:
        supervisor = _Process(state.supervisor_pid)
    except ProcessLookupError:
        return
    _await_supervisor(supervisor)


def _answer(line: str) -> dict[str, object]:
    try:
        answer = json.loads(line)
    except ValueError:
        return {"error": "the supervisor ended without an answer"}
    return answer if isinstance(answer, dict) else {"error": repr(answer)}


_SGR = re.compile(r"\x1b\[[0-9;]*m")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def last_lines(record: dict[str, object], count: int = 5) -> list[str]:
    """The console's last non-empty lines from an exit record, as plain text (a guest's
    colours dropped, its other control characters shown as '?': they go into messages
    an admin's terminal prints)."""
    tail = record.get("console_tail")
    lines = [str(line) for line in tail] if isinstance(tail, list) else []
    plain = [_CONTROL.sub("?", _SGR.sub("", line)).strip() for line in lines]
    return [line for line in plain if line][-count:]


def stop_signal_for(config: GuestConfig) -> int:
    """The signal that asks the guest's init to shut the guest down.

    Configured, or by the init it runs: systemd halts on SIGRTMIN+3; sysvinit
    and busybox init run their ctrlaltdel action on SIGINT (a clean shutdown,
    halt or reboot: contextd is stopping the guest either way); a command as
    init gets SIGTERM.
    """
    if config.stop_signal != AUTO_SIGNAL:
        return int(config.stop_signal)
    if list(config.init) != ["/sbin/init"]:
        return int(signal.SIGTERM)
    return int(signal.SIGRTMIN + 3) if init_kind(config.root) == "systemd" else int(signal.SIGINT)


def init_kind(root: str) -> str:
    """ "systemd", "busybox" or "sysvinit": what the guest's /sbin/init is (its link's text,
    read within the guest's tree: nothing of the host is followed)."""
    try:
        root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return "sysvinit"
    try:
        fd = open_in_root(root_fd, b"/sbin/init", os.O_PATH | os.O_NOFOLLOW)
    except OSError:
        return "sysvinit"
    finally:
        os.close(root_fd)
    try:
        target = os.readlink("", dir_fd=fd)
    except OSError:  # not a link: Debian's sysvinit-core installs the program itself
        return "sysvinit"
    finally:
        os.close(fd)
    if "systemd" in target:
        return "systemd"
    return "busybox" if "busybox" in target else "sysvinit"


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
    disk_shared_bytes: int | None  # shared with its template or other guests, not charged
    disk_shared_inodes: int | None
    limit_hits: dict[str, int]
    root: str
    hostname: str
    net_mode: str
    bridge: str | None
    addresses: list[str]
    traffic: dict[str, int] | None
    last_end: str | None  # how the guest last ended, while it is not running
    restarts: int  # automatic restarts (its restart policy) within its restart_interval
    root_server_replacements: int  # FUSE servers of its root that died and were replaced
    last_console: list[str]  # what its console said last then
    # An OCI container's (contextd-oci): the engine that runs it, its id and bundle.
    engine: str | None = None
    container_id: str | None = None
    bundle: str | None = None


def status(config: GuestConfig) -> Status:
    """A guest's state and accounting."""
    state = runstate.load(config.name)
    running = state is not None and runstate.is_running(state)
    cgroup = Cgroup(config.name)
    stats = cgroup.stats() if cgroup.exists() else None
    hits: dict[str, int] = {}
    disk_bytes = disk_inodes = shared_bytes = shared_inodes = None
    db = StateDB()
    try:
        guest = db.guest(config.root, create=False)
        if guest is not None:
            usage = db.usage(guest.id)
            if usage is not None:
                disk_bytes, disk_inodes = usage.bytes, usage.inodes
                shared_bytes, shared_inodes = usage.shared_bytes, usage.shared_inodes
            hits.update({f"disk {k}": v for k, v in db.hits(guest.id).items()})
    finally:
        db.close()
    counters = network.traffic(config) if running else None
    ended = None if running else runstate.load_exit(config.name)
    state_name = "running" if running else "stopped"
    if ended is not None:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(str(ended.get("ended")))))
        last_end = f"{runstate.describe_exit(ended)} at {when}"
        if ended.get("restart_at"):
            state_name = "restarting"
            last_end += "; restarting by its policy"
        elif runstate.is_failure(ended):
            state_name = "failed"
            if ended.get("gave_up"):
                last_end += f"; not restarted: {ended['gave_up']}"
        tail = ended.get("console_tail")
        last_console = [str(line) for line in tail] if isinstance(tail, list) else []
    else:
        last_end, last_console = None, []
    if state is not None and not running:
        state_name = "stopping"  # ended; contextd has yet to clean up and decide
    if stats is not None:
        if stats.pids_limit_hits:
            hits["pids"] = stats.pids_limit_hits
        if stats.memory_limit_hits:
            hits["memory"] = stats.memory_limit_hits
    return Status(
        name=config.name,
        xid=config.xid,
        state=state_name,
        init_pid=state.init_pid if running and state else None,
        processes=stats.processes if stats else 0,
        memory_bytes=stats.memory_bytes if stats else None,
        cpu_user_seconds=stats.cpu_user_seconds if stats else None,
        cpu_system_seconds=stats.cpu_system_seconds if stats else None,
        uptime_seconds=time.time() - state.started if running and state else None,
        disk_bytes=disk_bytes,
        disk_inodes=disk_inodes,
        disk_shared_bytes=shared_bytes,
        disk_shared_inodes=shared_inodes,
        limit_hits=hits,
        root=config.root,
        hostname=config.hostname,
        net_mode=config.net.mode,
        bridge=config.net.bridge if config.net.mode == "isolated" else None,
        addresses=[str(a) for a in config.net.addresses],
        traffic=asdict(counters) if counters else None,
        last_end=last_end,
        last_console=last_console,
        restarts=len(restarts.within_interval(config, state.restarts, time.time())) if state else 0,
        root_server_replacements=int(
            str(runstate.load_root_server_record(config.name).get("replacements", 0))
        ),
    )
