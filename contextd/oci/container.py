"""The OCI runtime's verbs, as runc does them for conmon and containerd-shim.

The process tree is the contract (docs/research/oci-runtime.md): the engine
(conmon, the shim) is a child subreaper and learns the container's end only
as its parent. So `create` forks the container's init through a throwaway
child (contextd.spawn) and exits: init passes to the engine. The cowfs root's
FUSE server stays with the contextd daemon (contextd.oci.roots), which
`create` asks for the root and `delete` asks to release it. `start`,
`state`, `kill` and `ps` need only the state directory (contextd.oci.state).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
from pathlib import Path
from typing import Any, NoReturn

import msgspec

from contextd import client, namespace, procfs, spawn
from contextd.cgroups import Cgroup, join
from contextd.oci import init, spec
from contextd.oci.state import ContainerError, ContainerState, StateStore, guest_name
from contextd.seccomp import GuestFilter
from cowfs.atomicfile import write_atomically
from native import syscalls as sc

# The namespaces of the container's init that an exec'd process joins.
JOINED = (
    sc.CLONE_NEWNS | sc.CLONE_NEWUTS | sc.CLONE_NEWIPC | sc.CLONE_NEWNET | sc.CLONE_NEWPID
    | sc.CLONE_NEWCGROUP
)  # fmt: skip


def _daemon(verb: str, **fields: Any) -> dict[str, Any]:
    try:
        return client.request(verb, **fields)
    except client.ContextdError as e:
        raise ContainerError(str(e)) from None


def create(
    store: StateStore,
    container_id: str,
    bundle: Path,
    pid_file: Path | None,
    console_socket: str | None,
) -> None:
    """Set the container up, its process waiting for start (see the module docstring)."""
    bundle = bundle.resolve()
    container = spec.load(bundle)
    if container.process.terminal and not console_socket:
        raise ContainerError("process.terminal is set: --console-socket is needed")
    root_path = container.root.path
    if not os.path.isabs(root_path):
        root_path = str(bundle / root_path)
    name = guest_name(container_id)
    state = ContainerState(
        id=container_id,
        bundle=str(bundle),
        rootfs="",
        name=name,
        annotations=container.annotations,
    )
    directory = store.make(state)
    pid = 0
    try:
        resources = msgspec.to_builtins(container.linux.resources or spec.Resources())
        answer = _daemon(
            "oci_prepare",
            name=name,
            id=container_id,
            bundle=str(bundle),
            root_path=root_path,
            annotations=container.annotations,
            resources=resources,
        )
        state.rootfs = str(answer["root"])
        store.save(state)
        pid = _fork_init(container, state, directory, console_socket)
        store.save(state)
        if pid_file is not None:
            write_atomically(pid_file, str(pid))
    except BaseException:
        if pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ContainerError):
            _daemon("oci_release", name=name)
        with contextlib.suppress(OSError):
            store.remove(container_id)
        raise


def _fork_init(
    container: spec.Spec, state: ContainerState, directory: Path, console_socket: str | None
) -> int:
    """The container's init, forked and set up (contextd.oci.init), waiting for start; its
    pid. Its parent is the engine by the time this returns."""
    fifo_path = directory / "exec.fifo"
    os.mkfifo(fifo_path, 0o600)
    fifo = os.open(fifo_path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    console = _connect_console(console_socket)
    network = container.namespace_path("network")
    join_fds = (os.open(network, os.O_RDONLY | os.O_CLOEXEC),) if network else ()
    flags = sc.CLONE_NEWPID | sc.CLONE_NEWNS | sc.CLONE_NEWUTS | sc.CLONE_NEWIPC
    if not network:
        flags |= sc.CLONE_NEWNET
    guest_filter = GuestFilter()  # libseccomp is loaded here, while the host's root is ours
    go_r, go_w = os.pipe()
    errors_r, errors_w = os.pipe2(os.O_CLOEXEC)
    channels = init.Channels(go_r, errors_w, fifo, console)

    def become() -> NoReturn:
        init.become_init(container, state.rootfs, channels, guest_filter)

    try:
        try:
            pid = spawn.fork_into_namespaces(
                flags, become, close_in_child=(go_w, errors_r), join=join_fds
            )
        except spawn.SpawnError as e:
            raise ContainerError(f"the container's {e}") from None
        finally:
            for fd in (go_r, errors_w, fifo, *join_fds):
                os.close(fd)
            if console is not None:
                console.close()
        try:
            state.pid, state.pid_start = pid, procfs.start_time(pid) or 0
            Cgroup(state.name).add(pid)
            _daemon("oci_started", name=state.name, pid=pid, pid_start=state.pid_start)
            os.write(go_w, b"go")
        except BaseException:
            os.kill(pid, signal.SIGKILL)
            raise
        error = b""
        while chunk := os.read(errors_r, 4096):
            error += chunk
        if error:
            os.kill(pid, signal.SIGKILL)
            raise ContainerError(error.decode(errors="replace"))
        return pid
    finally:
        os.close(go_w)
        os.close(errors_r)


def _connect_console(path: str | None) -> socket.socket | None:
    """The engine's console socket, connected; a host path, so connected here, before
    anything joins or makes the container's mount namespace (the pty's master is sent
    over it from inside)."""
    if not path:
        return None
    console = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        console.connect(path)
    except OSError as e:
        console.close()
        raise ContainerError(f"console socket {path}: {e.strerror}") from None
    return console


def start(store: StateStore, container_id: str) -> None:
    """Let the created container's process exec."""
    state = store.load(container_id)
    directory = store.directory(container_id)
    status = state.status(directory)
    if status != "created":
        raise ContainerError(f"cannot start a container that is {status}")
    try:
        fd = os.open(directory / "exec.fifo", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:  # ENXIO: no reader, init has ended
        raise ContainerError(f"container {container_id} is not running") from None
    try:
        os.write(fd, b"0")
    finally:
        os.close(fd)
    (directory / "exec.fifo").unlink(missing_ok=True)


def oci_state(store: StateStore, container_id: str) -> dict[str, object]:
    """The specification's state of the container."""
    return store.load(container_id).as_oci(store.directory(container_id))


def parse_signal(text: str) -> int:
    """A signal by number (as the engines send them), or name (TERM, SIGTERM)."""
    if text.isdigit():
        number = int(text)
    else:
        name = text.upper()
        name = name if name.startswith("SIG") else "SIG" + name
        try:
            number = int(signal.Signals[name])
        except KeyError:
            raise ContainerError(f"unknown signal {text!r}") from None
    if not 0 < number < signal.NSIG:
        raise ContainerError(f"unknown signal {text!r}")
    return number


def kill(store: StateStore, container_id: str, signum: int, every_process: bool) -> None:
    """Send the signal to the container's init, or (every_process) to all of its processes."""
    state = store.load(container_id)
    if state.status(store.directory(container_id)) == "stopped":
        raise ContainerError("container not running")
    if every_process:
        for pid in Cgroup(state.name).pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)
        return
    try:
        pidfd = os.pidfd_open(state.pid)
    except ProcessLookupError:
        raise ContainerError("container not running") from None
    try:
        if procfs.start_time(state.pid) != state.pid_start:
            raise ContainerError("container not running")
        signal.pidfd_send_signal(pidfd, signum)
    except ProcessLookupError:
        raise ContainerError("container not running") from None
    finally:
        os.close(pidfd)


def delete(store: StateStore, container_id: str, force: bool) -> None:
    """Remove a stopped (or created) container; force: a running one too, killed first.
    An unknown container is no error with force (the engines delete twice)."""
    try:
        state = store.load(container_id)
    except ContainerError:
        if force:
            return
        raise
    status = state.status(store.directory(container_id))
    if status == "running" and not force:
        raise ContainerError(f"cannot delete container {container_id} that is not stopped: running")
    cgroup = Cgroup(state.name)
    if cgroup.exists():
        cgroup.kill_all()
    _daemon("oci_release", name=state.name)
    store.remove(container_id)


def ps(store: StateStore, container_id: str) -> list[int]:
    """The container's processes (host pids)."""
    state = store.load(container_id)
    return sorted(Cgroup(state.name).pids())


def exec_process(
    store: StateStore,
    container_id: str,
    process: spec.Process,
    pid_file: Path | None,
    detach: bool,
    console_socket: str | None,
) -> int:
    """Run the process in the container; detach: once it runs, leave it to our parent
    (the engine, a subreaper) and return 0; else wait and return its exit code."""
    state = store.load(container_id)
    if state.status(store.directory(container_id)) == "stopped":
        raise ContainerError("cannot exec in a stopped container")
    if process.terminal and not console_socket:
        raise ContainerError("process.terminal is set: --console-socket is needed")
    if not detach:
        sc.prctl(36, 1)  # PR_SET_CHILD_SUBREAPER: the process passes to us to be waited for
    pidfd = os.pidfd_open(state.pid)
    try:
        if procfs.start_time(state.pid) != state.pid_start:
            raise ContainerError("cannot exec in a stopped container")
        pid = _fork_joined(state, pidfd, process, console_socket)
    finally:
        os.close(pidfd)
    if pid_file is not None:
        write_atomically(pid_file, str(pid))
    return 0 if detach else spawn.wait_exit_code(pid)


def _fork_joined(
    state: ContainerState, pidfd: int, process: spec.Process, console_socket: str | None
) -> int:
    """Fork a joiner that enters the container's cgroup and namespaces and forks the
    process there, which sets itself up as init does and execs; the process's pid."""
    console = _connect_console(console_socket)
    guest_filter = GuestFilter()
    pid_r, pid_w = os.pipe2(os.O_CLOEXEC)
    errors_r, errors_w = os.pipe2(os.O_CLOEXEC)
    joiner = os.fork()
    if joiner == 0:
        os.close(pid_r)
        os.close(errors_r)
        _join(state, pidfd, process, console, guest_filter, pid_w, errors_w)
    os.close(pid_w)
    os.close(errors_w)
    if console is not None:
        console.close()
    try:
        answer = b""
        while chunk := os.read(pid_r, 64):
            answer += chunk
        os.waitpid(joiner, 0)
        error = b""
        while chunk := os.read(errors_r, 4096):
            error += chunk
        if error or not answer:
            raise ContainerError(error.decode(errors="replace") or "exec failed")
        return int(answer)
    finally:
        os.close(pid_r)
        os.close(errors_r)


def _join(
    state: ContainerState,
    pidfd: int,
    process: spec.Process,
    console: socket.socket | None,
    guest_filter: GuestFilter,
    pid_w: int,
    errors_w: int,
) -> NoReturn:
    try:
        os.setsid()
        sc.prctl(sc.PR_SET_DUMPABLE, 0)
        sc.join_new_session_keyring()
        join(Cgroup(state.name).join_dirs(state.pid))
        sc.setns(pidfd, JOINED)
        os.chdir("/")
        ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
        child = os.fork()
        if child == 0:
            os.close(ready_r)
            os.close(pid_w)
            _become_process(process, console, guest_filter, errors_w, ready_w)
        os.close(ready_w)
        os.write(pid_w, str(child).encode())
        os.read(ready_r, 1)  # EOF once the process has exec'd or failed
    except BaseException as e:
        spawn.fail(errors_w, e, status=0)
    os._exit(0)


def _become_process(
    process: spec.Process,
    console: socket.socket | None,
    guest_filter: GuestFilter,
    errors_w: int,
    ready_w: int,
) -> NoReturn:
    try:
        os.setsid()
        if console is not None:
            master, slave = namespace.make_pty("/dev/pts/ptmx")
            socket.send_fds(console, [b"/dev/pts"], [master])
            os.close(master)
            console.close()
            init.take_terminal(slave)
        namespace.close_fds(keep=(errors_w, ready_w))
        argv0 = init.become_process(process, None, guest_filter)
    except BaseException as e:
        spawn.fail(errors_w, e)
    init.exec_process(process, argv0)


def features() -> dict[str, object]:
    """What this runtime supports (runc features' format)."""
    return {
        "ociVersionMin": "1.0.0",
        "ociVersionMax": "1.1.0",
        "hooks": [],
        "mountOptions": sorted(set(init.MOUNT_FLAGS) | init.IGNORED_OPTIONS),
        "linux": {
            "namespaces": list(spec.KNOWN_NAMESPACES),
            "capabilities": [f"CAP_{name}" for name in spec.CAPABILITIES],
            "cgroup": {"v1": True, "v2": True, "systemd": False, "systemdUser": False},
            "seccomp": {"enabled": False},
        },
        "annotations": {"org.contextd.cowfs.disk-space": "per-container disk limit"},
    }
