"""Running a command inside a running guest: ``contextd exec`` and ``contextd enter``.

Three processes, so that nothing of the host is ever within a guest's reach:

- the admin's process (this one) keeps the admin's terminal, fds, session and
  keyring. It gives the guest a pty of the guest's own devpts (when its stdin
  is a terminal, and always for enter) or pipes, and copies bytes between
  them and its own stdio (contextd.relay).
- the joiner, forked from it, leaves the admin's session, takes a new empty
  session keyring, joins the guest's cgroup, then all of the guest's
  namespaces at once through a pidfd of its init (no pid can be recycled
  under it), takes the pty or pipes as its stdio, closes every other fd,
  loads the guest's seccomp filter, clears its securebits and drops to the
  guest's capabilities. It does all of this in the host's PID namespace,
  where nothing of the guest can see or trace it. Only then it forks:
- the command, the first of these processes in the guest's PID namespace,
  which already holds nothing more than what the guest's own processes hold.
  It starts a session of its own (with the pty as its controlling terminal)
  and execs. The joiner waits for it and passes its exit status on.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import pty
import signal
import stat
import struct
import sys
import termios
import tty
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from contextd import cgroups, namespace, procfs, relay, spawn
from contextd.seccomp import GuestFilter
from cowfs.errors import CowfsError
from native import syscalls

# The guest's namespaces a command joins (init's: a new PID namespace applies to children).
JOINED = (
    syscalls.CLONE_NEWNS
    | syscalls.CLONE_NEWUTS
    | syscalls.CLONE_NEWIPC
    | syscalls.CLONE_NEWNET
    | syscalls.CLONE_NEWPID
    | syscalls.CLONE_NEWCGROUP
)
# Signals to the admin's command that go on to the guest's command (pipes only:
# on a pty, ^C is a byte for the guest's terminal).
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class AttachError(CowfsError):
    """The guest cannot be entered; one line for the admin."""


@dataclass
class Target:
    """What contextd says about a running guest, to enter it."""

    name: str
    init_pid: int
    init_start: int
    capabilities: list[str]
    environment: dict[str, str]
    cgroup_dirs: list[str]
    userns: bool = False


def _open_init(target: Target) -> int:
    """A pidfd of the guest's init, checked to be that process and not a recycled pid."""
    try:
        pidfd = os.pidfd_open(target.init_pid)
    except ProcessLookupError:
        raise AttachError(f"guest {target.name} is not running") from None
    if procfs.start_time(target.init_pid) != target.init_start:
        os.close(pidfd)
        raise AttachError(f"guest {target.name} is not running (its init has ended)")
    return pidfd


def run(target: Target, argv: list[str], use_pty: bool) -> int:
    """Run argv in the guest (see the module docstring); its exit code."""
    pidfd = _open_init(target)
    guest_filter = GuestFilter()  # libseccomp is loaded here, while the host's root is ours
    try:
        with _guest_stdio(target, pidfd, use_pty) as (theirs, to_guest, outputs, end_of_input):
            joiner = os.fork()
            if joiner == 0:
                _join_and_run(target, pidfd, theirs, argv, use_pty, guest_filter)
            for fd in set(theirs):
                os.close(fd)
            joiner_fd = os.pidfd_open(joiner)
            try:
                forwarded = () if use_pty else FORWARDED
                with relay.signals_forwarded_to(joiner_fd, forwarded), _raw_terminal(use_pty):
                    return relay.relay(
                        joiner_fd, to_guest, outputs, not use_pty, end_of_input=end_of_input
                    )
            finally:
                os.close(joiner_fd)
    finally:
        os.close(pidfd)


@contextlib.contextmanager
def _guest_stdio(
    target: Target, pidfd: int, use_pty: bool
) -> Iterator[tuple[tuple[int, int, int], int | None, list[tuple[int, int]], bytes]]:
    """The guest command's stdio and our ends of it: (its 0, 1, 2), where our stdin goes,
    (guest fd, our fd) pairs for its output, and what to send at the end of our input."""
    ours: list[int] = []
    theirs: list[int] = []
    try:
        if use_pty:
            master, slave = _guest_pty(target)
            ours.append(master)
            theirs.append(slave)
            _copy_window_size(master)
            if not os.isatty(1):  # output to a file or pipe: bytes as the guest wrote them
                attrs = termios.tcgetattr(slave)
                attrs[1] &= ~termios.OPOST
                termios.tcsetattr(slave, termios.TCSANOW, attrs)
            yield (slave, slave, slave), master, [(master, 1)], b"\x04"
        else:
            pipes = [os.pipe2(os.O_CLOEXEC) for _ in range(3)]
            for read_end, write_end in pipes:
                ours.append(read_end)
                ours.append(write_end)
            (in_r, in_w), (out_r, out_w), (err_r, err_w) = pipes
            theirs += [in_r, out_w, err_w]
            yield (in_r, out_w, err_w), in_w, [(out_r, 1), (err_r, 2)], b""
    finally:
        for fd in ours:
            with contextlib.suppress(OSError):
                os.close(fd)
        for fd in set(theirs):  # closed already by run() once the joiner has them
            with contextlib.suppress(OSError):
                os.close(fd)


def _join_and_run(
    target: Target,
    pidfd: int,
    stdio: tuple[int, int, int],
    argv: list[str],
    use_pty: bool,
    guest_filter: GuestFilter,
) -> None:
    """The joiner (see the module docstring); never returns."""
    try:
        os.setsid()  # out of the admin's session and process group
        syscalls.prctl(syscalls.PR_SET_DUMPABLE, 0)
        syscalls.join_new_session_keyring()
        cgroups.join([Path(d) for d in target.cgroup_dirs])
        # All at once (root and cwd become the guest's root), its user namespace first.
        syscalls.setns(pidfd, JOINED | (syscalls.CLONE_NEWUSER if target.userns else 0))
        if target.userns:  # host root is no id in there: be the guest's root
            os.setgroups([])
            os.setresgid(0, 0, 0)
            os.setresuid(0, 0, 0)
        os.chdir("/")
        for number, fd in enumerate(stdio):
            os.dup2(fd, number)
        namespace.close_fds()
        namespace.become_guest(None, target.capabilities, guest_filter)
        command = os.fork()
        if command == 0:
            _exec_command(argv, target.environment, use_pty)
        for fd in (0, 1, 2):  # the guest's side ends when its processes close it
            os.close(fd)
        for signum in FORWARDED:
            signal.signal(signum, lambda s, _f: _signal_group(command, s))
        os._exit(spawn.wait_exit_code(command))
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.write(2, f"contextd: cannot enter guest {target.name}: {e}\n".encode())
        os._exit(125)


def _signal_group(leader: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(leader, signum)


def _exec_command(argv: list[str], environment: dict[str, str], use_pty: bool) -> None:
    """The command, in the guest; never returns."""
    try:
        os.setsid()
        if use_pty:
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)
        namespace.reset_signals()
        env = {
            "PATH": PATH,
            "TERM": os.environ.get("TERM", "linux"),
            "HOME": "/root",
            "container": "contextd",
        }
        env.update(environment)
        os.execvpe(argv[0], argv, env)
    except OSError as e:
        os.write(2, f"contextd: {argv[0]}: {e.strerror}\n".encode())
        os._exit(127)
    except BaseException:
        os._exit(127)


@contextlib.contextmanager
def _raw_terminal(use_pty: bool) -> Iterator[None]:
    """Our terminal in raw mode while a pty relays to it (restored after)."""
    if not use_pty or not os.isatty(0):
        yield
        return
    old = termios.tcgetattr(0)
    tty.setraw(0)
    try:
        yield
    finally:
        termios.tcsetattr(0, termios.TCSAFLUSH, old)


def _copy_window_size(master: int) -> None:
    for fd in (0, 1):
        if os.isatty(fd):
            size = fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8)
            fcntl.ioctl(master, termios.TIOCSWINSZ, size)
            return


TIOCGPTPEER = 0x5441
TIOCSPTLCK = 0x40045431
PTMX = os.makedev(5, 2)


def _guest_pty(target: Target) -> tuple[int, int]:
    """A pty pair from the guest's own devpts (so that tty(1) inside names it).

    The guest controls its /dev: resolve inside its root only, and accept only
    the ptmx device.
    """
    try:
        root = os.open(f"/proc/{target.init_pid}/root", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise AttachError(
            f"guest {target.name}: its root cannot be reached ({e.strerror}): see contextd status"
        ) from None
    try:
        master = syscalls.open_in_root(root, b"/dev/pts/ptmx", os.O_RDWR | os.O_NOCTTY)
    except OSError:
        return pty.openpty()
    finally:
        os.close(root)
    st = os.fstat(master)
    if not stat.S_ISCHR(st.st_mode) or st.st_rdev != PTMX:
        os.close(master)
        raise OSError(errno.EPERM, "the guest's /dev/pts/ptmx is not the pty multiplexer")
    fcntl.ioctl(master, TIOCSPTLCK, struct.pack("i", 0))  # unlockpt
    slave = fcntl.ioctl(master, TIOCGPTPEER, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    os.set_inheritable(master, False)
    return master, slave


def stdin_is_terminal() -> bool:
    """True if exec should give the guest a pty (our stdin is a terminal)."""
    return sys.stdin is not None and os.isatty(0)
