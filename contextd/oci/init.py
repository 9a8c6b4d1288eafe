"""The container's first process, from the fork (contextd.spawn) to the exec of process.args.

It runs in the container's new namespaces, still with host root's powers and
the host's tree visible, and builds the container before anything of the
container's runs (as the guest's PID 1 does in contextd.supervisor, with the
same pieces of contextd.namespace):

1. waits for "go" while create puts it in the container's cgroup;
2. makes its cgroup namespace, a session and a session keyring of its own;
3. makes its root: the cowfs mount, the spec's mounts on it (each destination
   resolved inside the root, never through a symlink out of it), contextd's own
   /proc masks with the spec's masked and read-only paths on top, /dev's nodes,
   the console's pty when the spec asks for a terminal (its master sent over the
   engine's console socket); pivots into it and detaches the host's tree;
4. closes every fd but the engine's stdio, loads contextd's seccomp filter,
   drops the bounding set to the spec's, becomes the spec's user, keeps only the
   spec's capabilities, sets rlimits;
5. says it is ready (its error pipe closes), waits for `start` (exec.fifo) and
   execs.

An error before 5 goes to create through the error pipe, which fails.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import resource
import select
import socket
import stat
import termios
from typing import NoReturn

from contextd import namespace, spawn
from contextd.capabilities import drop_bounding_but, limit_held_to
from contextd.oci.spec import PATH, Mount, Process, Spec
from contextd.seccomp import GuestFilter
from native import syscalls as sc

PR_SET_KEEPCAPS = 8
MS_NOATIME = 1 << 10
MS_RELATIME = 1 << 21
MS_SYNCHRONOUS = 16
MOUNT_FLAGS = {
    "ro": sc.MS_RDONLY, "nosuid": sc.MS_NOSUID, "nodev": sc.MS_NODEV, "noexec": sc.MS_NOEXEC,
    "strictatime": sc.MS_STRICTATIME, "relatime": MS_RELATIME, "noatime": MS_NOATIME,
    "sync": MS_SYNCHRONOUS,
}  # fmt: skip
IGNORED_OPTIONS = {
    "rw", "bind", "rbind", "private", "rprivate", "shared", "rshared", "slave", "rslave",
    "suid", "dev", "exec", "atime", "norelatime", "async",
}  # fmt: skip


class Channels:
    """The fds init shares with create: go, its error pipe, the fifo, the console socket."""

    def __init__(self, go_r: int, errors_w: int, fifo: int, console: socket.socket | None):
        self.go_r = go_r
        self.errors_w = errors_w
        self.fifo = fifo
        self.console = console


def become_init(spec: Spec, rootfs: str, channels: Channels, guest_filter: GuestFilter) -> NoReturn:
    """The container's init until it execs (see the module docstring); never returns."""
    try:
        if os.read(channels.go_r, 16) != b"go":
            os._exit(1)
        os.close(channels.go_r)
        sc.unshare(sc.CLONE_NEWCGROUP)  # rooted at the container's cgroup, where we are now
        os.setsid()
        sc.join_new_session_keyring()
        namespace.enter_root_tree(rootfs)
        build_root(spec, rootfs)
        terminal = None
        if spec.process.terminal:
            terminal = _hand_over_console(channels.console)
        namespace.pivot_into_root()
        if terminal is not None:
            take_terminal(terminal)
        namespace.close_fds(keep=(channels.errors_w, channels.fifo))
        argv0 = become_process(spec.process, spec.hostname or None, guest_filter)
    except BaseException as e:  # reported by create, which fails
        spawn.fail(channels.errors_w, e)
    os.close(channels.errors_w)  # ready: create returns
    wait_for_start(channels.fifo)
    exec_process(spec.process, argv0)


def build_root(spec: Spec, rootfs: str) -> None:
    """The spec's mounts, masks and read-only paths on the root (our cwd); /dev's nodes."""
    root = os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for mount in spec.mounts:
            _mount(root, rootfs, mount, spec.linux.sysctl)
        for path in spec.linux.masked_paths:
            target = _existing(root, rootfs, path)
            if target is None:
                continue
            if os.path.isdir(target):
                sc.mount("tmpfs", target, "tmpfs", sc.MS_RDONLY | sc.MS_NOSUID | sc.MS_NODEV,
                         "size=0")  # fmt: skip
            else:
                sc.mount("/dev/null", target, None, sc.MS_BIND)
        for path in spec.linux.readonly_paths:
            target = _existing(root, rootfs, path)
            if target is not None:
                namespace.bind_readonly(target)
        if spec.root.readonly:
            sc.mount(None, ".", None, sc.MS_REMOUNT | sc.MS_BIND | sc.MS_RDONLY)
    finally:
        os.close(root)


def _mount(root: int, rootfs: str, mount: Mount, sysctls: dict[str, str]) -> None:
    flags, data = _options(mount.options)
    bind = "bind" in mount.options or "rbind" in mount.options or mount.type == "bind"
    source_is_dir = True
    if bind:
        source_is_dir = os.path.isdir(mount.source)
    target = _target(root, rootfs, mount.destination, directory=source_is_dir)
    if bind:
        recursive = sc.MS_REC if "rbind" in mount.options else 0
        sc.mount(mount.source, target, None, sc.MS_BIND | recursive)
        if flags:
            sc.mount(None, target, None, sc.MS_REMOUNT | sc.MS_BIND | flags)
    elif mount.type == "proc":
        namespace.mount_proc(target, sysctls)
    elif mount.type == "sysfs":
        namespace.mount_sys(target)
    elif mount.type == "cgroup":
        namespace.mount_cgroup(target)
    else:  # tmpfs, devpts, mqueue
        sc.mount(mount.source or mount.type, target, mount.type, flags, data or None)
        if mount.destination.rstrip("/") == "/dev":
            namespace.make_device_nodes(target, bind_devices=False)
            namespace.make_dev_links(target)
            os.symlink("pts/ptmx", f"{target}/ptmx")


def _options(options: list[str]) -> tuple[int, str]:
    """Mount flags and the data string (mode=, size=, newinstance, ...) of the options."""
    flags = 0
    data = []
    for option in options:
        if option in MOUNT_FLAGS:
            flags |= MOUNT_FLAGS[option]
        elif option not in IGNORED_OPTIONS:
            data.append(option)
    return flags, ",".join(data)


def _resolved(fd: int, rootfs: str, path: str) -> str:
    """Where fd (opened inside the root) is, as a path of ours; checked to be in the root."""
    real = os.readlink(f"/proc/self/fd/{fd}")
    if real != rootfs and not real.startswith(rootfs.rstrip("/") + "/"):
        raise RuntimeError(f"{path} resolves outside the container's root")
    return real


def _existing(root: int, rootfs: str, path: str) -> str | None:
    """The path inside the root (symlinks resolved in it), if it exists."""
    try:
        fd = sc.open_in_root(root, path.lstrip("/").encode(), os.O_PATH | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        return _resolved(fd, rootfs, path)
    finally:
        os.close(fd)


def _target(root: int, rootfs: str, destination: str, directory: bool) -> str:
    """A mount's destination inside the root, made if missing (directories, and an empty
    file for a file's bind). Symlinks on the way are followed as the container would see
    them, inside its root (an absolute one from the root, ".." never above it): what is
    made is made in the root, never on the host (the root is the container's own clone,
    which nothing else changes meanwhile)."""
    pending = [p for p in destination.split("/") if p and p != "."]
    resolved: list[str] = []  # real directories, from the root down
    links = 0
    while pending:
        part = pending.pop(0)
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        parent = _real_dir(root, "/".join(resolved))
        try:
            try:
                st = os.stat(part, dir_fd=parent, follow_symlinks=False)
            except FileNotFoundError:
                if pending or directory:
                    os.mkdir(part, 0o755, dir_fd=parent)
                else:
                    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
                    os.close(os.open(part, flags, 0o644, dir_fd=parent))
                st = os.stat(part, dir_fd=parent, follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                links += 1
                if links > 40:
                    raise OSError(errno.ELOOP, f"mount destination {destination}")
                link = os.readlink(part, dir_fd=parent)
                if link.startswith("/"):
                    resolved = []
                pending = [p for p in link.split("/") if p and p != "."] + pending
                continue
            if pending and not stat.S_ISDIR(st.st_mode):
                raise RuntimeError(f"mount destination {destination}: {part} is not a directory")
            resolved.append(part)
        finally:
            os.close(parent)
    if not resolved:
        raise RuntimeError("a mount on the container's root itself is not supported")
    fd = sc.open_in_root(root, "/".join(resolved).encode(), os.O_PATH)
    try:
        return _resolved(fd, rootfs, destination)
    finally:
        os.close(fd)


def _real_dir(root: int, path: str) -> int:
    """An fd of a directory inside the root, to make entries in."""
    return sc.open_in_root(root, (path or ".").encode(), os.O_RDONLY | os.O_DIRECTORY)


def _hand_over_console(console: socket.socket | None) -> int:
    """A pty of the container's devpts, /dev/console its slave; its master sent to the
    engine's console socket; the slave."""
    if console is None:
        raise RuntimeError("process.terminal needs --console-socket")
    if not os.path.exists("dev/pts/ptmx"):
        raise RuntimeError("process.terminal needs a devpts mount on /dev/pts")
    master, slave = namespace.make_console("dev")
    socket.send_fds(console, [b"/dev/console"], [master])
    os.close(master)
    console.close()
    return slave


def take_terminal(slave: int) -> None:
    """The pty's slave as stdin, stdout, stderr and controlling terminal."""
    for fd in (0, 1, 2):
        os.dup2(slave, fd)
    if slave > 2:
        os.close(slave)
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def become_process(process: Process, hostname: str | None, guest_filter: GuestFilter) -> str:
    """The last steps before exec: hostname, contextd's seccomp filter, the spec's bounding
    set, user, capabilities, rlimits, cwd; the program's path (found in process's PATH)."""
    if hostname is not None:
        sc.sethostname(hostname)
    os.umask(process.user.umask if process.user.umask is not None else 0o022)
    guest_filter.load()
    sc.prctl(sc.PR_SET_SECUREBITS, 0)
    keep = process.capability_names()
    drop_bounding_but(keep)
    user = process.user
    sc.prctl(PR_SET_KEEPCAPS, 1)
    os.setgroups(user.additional_gids)
    os.setresgid(user.gid, user.gid, user.gid)
    os.setresuid(user.uid, user.uid, user.uid)
    sc.prctl(PR_SET_KEEPCAPS, 0)
    limit_held_to(keep if user.uid == 0 else [])
    for limit in process.rlimits:
        number = getattr(resource, limit.type, None)
        if not isinstance(number, int):
            raise RuntimeError(f"unknown rlimit {limit.type}")
        resource.setrlimit(number, (limit.soft, limit.hard))
    if process.oom_score_adj is not None:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write(str(process.oom_score_adj))
    if process.no_new_privileges:
        sc.prctl(sc.PR_SET_NO_NEW_PRIVS, 1)
    namespace.reset_signals()
    os.chdir(process.cwd)
    return find_program(process)


def find_program(process: Process) -> str:
    """process.args[0] as execve needs it: searched in process.env's PATH if bare."""
    name = process.args[0]
    if "/" in name:
        return name
    for directory in process.environment().get("PATH", PATH).split(":"):
        candidate = os.path.join(directory or ".", name)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise RuntimeError(f"exec: {name!r}: executable file not found in $PATH")


def wait_for_start(fifo: int) -> None:
    """Block until `start` writes to exec.fifo (opened by create for reading)."""
    while True:
        try:
            select.select([fifo], [], [])
            if os.read(fifo, 1):
                break
        except InterruptedError:
            continue
    os.close(fifo)


def exec_process(process: Process, argv0: str) -> NoReturn:
    """execve the container's process; an error there goes to its stderr."""
    try:
        os.execve(argv0, process.args, process.environment())
    except OSError as e:
        with contextlib.suppress(OSError):
            os.write(2, f"contextd-oci: exec {process.args[0]}: {e.strerror}\n".encode())
    os._exit(127)
