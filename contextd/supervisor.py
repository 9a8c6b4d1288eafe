"""A guest's supervisor: makes its context, is its init's parent, keeps its console and its end.

One small process per running guest (a job of contextd's fork server, in a
session of its own), as conmon or containerd-shim is for a container. It
outlives contextd: a daemon that dies or is restarted leaves its guests
running, each with a parent that reaps its init and keeps its exit status.

Making the context, so that a user namespace (when the guest has one) owns
every other namespace of the guest, while the supervisor itself stays in the
host's:

1. a throwaway child makes the namespaces (user first, the supervisor writing
   its uid and gid maps; then PID, mount, UTS, IPC and, for an isolated
   network, network), forks the guest's PID 1 into them and ends, so that
   PID 1 passes to the supervisor, a child subreaper;
2. PID 1 waits while contextd moves it into the guest's cgroup and plugs its
   network, and says "go";
3. PID 1 makes a cgroup namespace (rooted at its cgroup now), its root (/proc,
   /sys, /dev, the console: a pty whose other side it hands to the
   supervisor), leaves everything of the host behind (contextd.namespace) and
   execs init.

Then the supervisor execs contextd-supervise (native/supervise.c: the same
process, still init's parent, ~0.2 MiB instead of a Python process's ~4 MiB
of private memory; _supervise below is the same loop in Python, used where the
program is missing), which copies the console to the log file and waits for init.
When init ends, it writes what happened (exit status or signal, and what that
means: halt, reboot, crash) to the guest's exit record, and ends; contextd,
watching it through a pidfd, cleans up and restarts the guest if init asked
for a reboot.

Protocol with contextd, JSON lines over the socket that is the job's stdin and
stdout: <- the request; -> {"pid": N} (PID 1, as the host sees it); <- "go";
-> {"ok": true} once init is exec'd, or {"error": "..."} (nothing is left).
The request describes the FUSE server of the guest's root ({"pid", "start",
"mount": how it was mounted, "record": where to note its replacements}), which
the supervisor watches as it watches init, and replaces if it dies.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import select
import signal
import socket
import sys
import termios
import time
from pathlib import Path
from typing import Any, NoReturn

from contextd import namespace, spawn
from contextd.rootserver import STEADY, RootServer, RootServerError, exec_steady
from contextd.seccomp import GuestFilter
from cowfs.atomicfile import write_atomically
from native import syscalls as sc

TIOCGPTPEER = 0x5441
MAX_LOG = 8 << 20  # the console log is kept under this size: its older half dropped
TAIL_LINES = 20  # of the console, kept in the exit record


class StartError(Exception):
    """The guest's context could not be made; reported to contextd."""


def main() -> None:
    """The fork server's ``supervisor`` job: its stdin and stdout are contextd's socket."""
    control = socket.socket(fileno=os.dup(0))
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1):
        os.dup2(null, fd)
    os.close(null)
    reader = control.makefile("r")
    request = json.loads(reader.readline())

    def tell(message: dict[str, object]) -> None:
        with contextlib.suppress(OSError):  # contextd may be gone; the guest goes on
            control.sendall(json.dumps(message).encode() + b"\n")

    try:
        log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        fuse_server = RootServer(request["fuse_server"]) if request.get("fuse_server") else None
        init = _fork_init(request)
    except (OSError, StartError, RootServerError) as e:
        tell({"error": str(e)})
        os._exit(1)
    tell({"pid": init.pid})
    go = reader.readline().strip() == "go"
    error = init.start() if go else "contextd did not say go"
    if error:
        with contextlib.suppress(ProcessLookupError):
            os.kill(init.pid, signal.SIGKILL)
        _wait(init.pid)
        tell({"error": error})
        os._exit(1)
    tell({"ok": True})
    reader.close()
    control.close()
    if STEADY.exists():
        _become_steady(init, log, request["exit_record"], fuse_server)
    _supervise(init, log, request["exit_record"], fuse_server)


# -- the namespaces and PID 1 -------------------------------------------------------

PR_SET_CHILD_SUBREAPER = 36


class Init:
    """The guest's PID 1 from the supervisor's side: forked, waiting for "go"."""

    def __init__(self, pid: int, go_w: int, console: socket.socket, errors_r: int):
        self.pid = pid
        self._go_w = go_w
        self._console = console
        self._errors_r = errors_r
        self.console_master = -1

    def start(self) -> str | None:
        """Let PID 1 go on to exec init; None once it has, else what went wrong."""
        try:
            os.write(self._go_w, b"go")
            os.close(self._go_w)
            _message, fds, _flags, _addr = socket.recv_fds(self._console, 16, 1)
            if fds:
                self.console_master = fds[0]
            error = b""
            while chunk := os.read(self._errors_r, 4096):
                error += chunk
            if error:
                return error.decode(errors="replace").replace("\n", " ")
            if self.console_master < 0:
                return "init did not hand over its console"
            return None
        finally:
            self._console.close()
            os.close(self._errors_r)


def _fork_init(request: dict[str, Any]) -> Init:
    """PID 1 of the guest's new namespaces (contextd.spawn), passed to us, the subreaper."""
    sc.prctl(PR_SET_CHILD_SUBREAPER, 1)
    guest_filter = GuestFilter()  # libseccomp is loaded here, while the host's root is ours
    flags = sc.CLONE_NEWPID | sc.CLONE_NEWNS | sc.CLONE_NEWUTS | sc.CLONE_NEWIPC
    if request.get("net") == "isolated":
        flags |= sc.CLONE_NEWNET
    go_r, go_w = os.pipe()
    errors_r, errors_w = os.pipe2(os.O_CLOEXEC)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)

    def become() -> NoReturn:
        ours.close()
        _become_init(request, go_r, errors_w, theirs, guest_filter)

    try:
        pid = spawn.fork_into_namespaces(
            flags, become, close_in_child=(go_w, errors_r), idmap=request.get("idmap")
        )
    except spawn.SpawnError as e:
        os.close(go_w)
        os.close(errors_r)
        ours.close()
        raise StartError(str(e)) from None
    finally:
        os.close(go_r)
        os.close(errors_w)
        theirs.close()
    return Init(pid, go_w, ours, errors_r)


def _become_init(
    request: dict[str, Any],
    go_r: int,
    errors_w: int,
    console: socket.socket,
    guest_filter: GuestFilter,
) -> NoReturn:
    """PID 1 until it execs init; never returns."""
    try:
        if os.read(go_r, 16) != b"go":  # contextd moves us into the cgroup meanwhile
            os._exit(1)
        os.close(go_r)
        sc.unshare(sc.CLONE_NEWCGROUP)  # rooted at the guest's cgroup, where we are now
        os.setsid()
        sc.join_new_session_keyring()
        master, slave = namespace.setup_root(str(request["root"]), request.get("idmap"))
        socket.send_fds(console, [b"console"], [master])
        os.close(master)
        console.close()
        for fd in (0, 1, 2):
            os.dup2(slave, fd)
        os.close(slave)
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)
        namespace.close_fds(keep=(errors_w,))
        namespace.become_guest(
            str(request["hostname"]), list(request["capabilities"]), guest_filter
        )
        namespace.reset_signals()
        env = {
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "container": "contextd",
            "TERM": "linux",
        }
        env.update(dict(request["environment"]))
        argv = list(request["init"])
        os.execve(argv[0], argv, env)
    except BaseException as e:  # reported to contextd; the guest does not start
        spawn.fail(errors_w, e)


# -- supervising ------------------------------------------------------------------


def _wait(pid: int) -> int:
    while True:
        try:
            return os.waitpid(pid, 0)[1]
        except InterruptedError:
            continue
        except ChildProcessError:
            return 0


def _become_steady(init: Init, log: int, exit_record: str, fuse_server: RootServer | None) -> None:
    """Exec contextd-supervise (native/supervise.c), which goes on as _supervise does: the
    same process, still init's parent, without the private memory of a Python process.
    Returns only if the exec failed (then _supervise goes on)."""
    pidfd = os.pidfd_open(init.pid)
    keep_open = fcntl.ioctl(init.console_master, TIOCGPTPEER, os.O_RDWR | os.O_NOCTTY)
    passed = [pidfd, init.console_master, keep_open, log]
    argv = [
        f"init={init.pid},{pidfd}",
        f"console={init.console_master}",
        f"peer={keep_open}",
        f"log={log}",
        f"exit-record={exit_record}",
    ]
    if fuse_server is not None:
        server_argv, server_fds = fuse_server.steady_arguments()
        argv += server_argv
        passed += server_fds
    exec_steady(argv, passed)
    os.close(pidfd)
    os.close(keep_open)


def _supervise(init: Init, log: int, exit_record: str, fuse_server: RootServer | None) -> None:
    """Copy the console to the log until init ends; record how it ended; never returns.

    The guest cannot go on without the FUSE server of its root (every access to
    its files would fail with ENOTCONN): when that server dies, a successor takes
    over its session (contextd.rootserver); when none can, the guest is ended
    too, and its record says why.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    pidfd = os.pidfd_open(init.pid)
    master = init.console_master
    # A console side of our own: with none of the guest's open for a moment (sysvinit
    # closes and reopens /dev/console), the pty would hang up and the log stop.
    keep_open = fcntl.ioctl(master, TIOCGPTPEER, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    tail = bytearray()
    console_open = True
    failure = None
    while True:
        watched = [pidfd] + ([master] if console_open else [])
        if fuse_server is not None:
            watched.append(fuse_server.pidfd)
        try:
            ready, _, _ = select.select(watched, [], [])
        except InterruptedError:
            continue
        if master in ready:
            console_open = _copy_console(master, log, tail)
        if pidfd in ready:
            break
        if fuse_server is not None and fuse_server.pidfd in ready:
            try:
                fuse_server.ended()
            except RootServerError as e:
                failure = str(e)
                fuse_server.close()
                fuse_server = None
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    status = _wait(init.pid)
    if fuse_server is not None:
        fuse_server.close()
    os.close(keep_open)
    os.set_blocking(master, False)
    while console_open and _copy_console(master, log, tail):
        pass
    record = describe_end(status)
    if failure:
        record["failure"] = failure
    record["ended"] = time.time()
    record["console_tail"] = bytes(tail).decode(errors="replace").splitlines()[-TAIL_LINES:]
    with contextlib.suppress(OSError):
        write_atomically(Path(exit_record), json.dumps(record))
    os._exit(0)


def _copy_console(master: int, log: int, tail: bytearray) -> bool:
    """Copy what the console has to the log; False once nothing of the guest holds it."""
    try:
        chunk = os.read(master, 65536)
    except BlockingIOError:
        return False
    except OSError as e:
        if e.errno == errno.EIO:  # the last holder of the console's other side closed it
            return False
        raise
    if not chunk:
        return False
    os.write(log, chunk)
    tail += chunk
    del tail[: max(0, len(tail) - 16384)]
    if os.fstat(log).st_size > MAX_LOG:
        _halve(log)
    return True


def _halve(log: int) -> None:
    size = os.fstat(log).st_size
    keep = os.pread(log, MAX_LOG // 2, size - MAX_LOG // 2)
    os.ftruncate(log, 0)
    os.write(log, keep)


def describe_end(status: int) -> dict[str, Any]:
    """What a PID 1's wait status says: how it ended, and what the guest asked for.

    In a PID namespace, reboot(2) ends its init: killed by SIGHUP for a restart,
    by SIGINT for a halt or power-off (pid_namespaces(7)).
    """
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        asked = {signal.SIGHUP: "reboot", signal.SIGINT: "halt"}.get(signal.Signals(sig))
        return {"signal": sig, "exit_status": None, "asked": asked}
    code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
    return {"signal": None, "exit_status": code, "asked": None}


if __name__ == "__main__":
    main()
    sys.exit(0)
