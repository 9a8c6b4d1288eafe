"""Running a command inside a running guest: exec (stdio passed through) and enter (a new pty).

The process joins the guest's cgroup, then its namespaces and root, forks (the
pid namespace applies to children), drops to the guest's capabilities, closes
every fd it does not pass on, and execs. It is non-dumpable until the exec, so
nothing inside can trace it while it still holds host state.
"""

from __future__ import annotations

import errno
import fcntl
import os
import pty
import select
import stat
import struct
import termios
import tty

from contextd import namespace
from contextd.cgroups import Cgroup
from native import syscalls


def _run_inside(
    name: str,
    init_pid: int,
    capabilities: list[str],
    environment: dict[str, str],
    argv: list[str],
    setup_stdio: object = None,
) -> int:
    """Fork a process into the guest that execs argv; wait for it; its exit status."""
    fds = namespace.open_namespaces(init_pid)
    cgroup = Cgroup(name)
    pid = os.fork()
    if pid == 0:
        try:
            for directory in cgroup.dirs.values():
                with open(directory / "cgroup.procs", "w") as f:
                    f.write("0")
            namespace.join(fds)
            inner = os.fork()
            if inner == 0:
                if callable(setup_stdio):
                    setup_stdio()
                namespace.close_fds()
                namespace.become_guest(None, capabilities)
                env = {
                    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                    "TERM": os.environ.get("TERM", "linux"),
                    "HOME": "/root",
                    "container": "contextd",
                }
                env.update(environment)
                try:
                    os.execvpe(argv[0], argv, env)
                except OSError as e:
                    os.write(2, f"contextd: {argv[0]}: {e.strerror}\n".encode())
                    os._exit(127)
            _, status = os.waitpid(inner, 0)
            code = os.waitstatus_to_exitcode(status)
            os._exit(code if code >= 0 else 128 - code)
        except BaseException as e:
            os.write(2, f"contextd: cannot enter guest {name}: {e}\n".encode())
            os._exit(125)
    for fd in fds.values():
        os.close(fd)
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except InterruptedError:
            continue
    code = os.waitstatus_to_exitcode(status)
    return code if code >= 0 else 128 - code


def exec_in(
    name: str, init_pid: int, capabilities: list[str], environment: dict[str, str], argv: list[str]
) -> int:
    """Run argv in the guest with this process's stdin, stdout and stderr; its exit code."""
    return _run_inside(name, init_pid, capabilities, environment, argv)


def enter(
    name: str, init_pid: int, capabilities: list[str], environment: dict[str, str], shell: list[str]
) -> int:
    """An interactive shell in the guest on a fresh pty, in a new session; its exit code."""
    master, slave = _guest_pty(init_pid)
    if os.isatty(0):
        fcntl.ioctl(slave, termios.TIOCSWINSZ, fcntl.ioctl(0, termios.TIOCGWINSZ, b"\0" * 8))

    def use_pty() -> None:
        os.close(master)
        os.setsid()
        fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
        for fd in (0, 1, 2):
            os.dup2(slave, fd)
        os.close(slave)

    old_attrs = termios.tcgetattr(0) if os.isatty(0) else None
    child_status: list[int] = []
    pid = os.fork()
    if pid == 0:
        os._exit(_run_inside(name, init_pid, capabilities, environment, shell, use_pty))
    os.close(slave)
    try:
        if old_attrs is not None:
            tty.setraw(0)
        _relay(master, pid, child_status)
    finally:
        if old_attrs is not None:
            termios.tcsetattr(0, termios.TCSAFLUSH, old_attrs)
        os.close(master)
    return child_status[0] if child_status else 0


TIOCGPTPEER = 0x5441
TIOCSPTLCK = 0x40045431
PTMX = os.makedev(5, 2)


def _guest_pty(init_pid: int) -> tuple[int, int]:
    """A pty pair from the guest's own devpts (so that tty(1) inside names it).

    The guest controls its /dev: resolve inside its root only, and accept only
    the ptmx device.
    """
    root = os.open(f"/proc/{init_pid}/root", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
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
    slave = fcntl.ioctl(master, TIOCGPTPEER, os.O_RDWR | os.O_NOCTTY)
    return master, slave


def _relay(master: int, pid: int, status: list[int]) -> None:
    stdin_open = True
    while True:
        readable = [master] + ([0] if stdin_open else [])
        try:
            ready, _, _ = select.select(readable, [], [], 0.2)
        except InterruptedError:
            continue
        if master in ready:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the guest's side closed
                data = b""
            if not data:
                break
            os.write(1, data)
        if 0 in ready:
            data = os.read(0, 65536)
            if data:
                os.write(master, data)
            else:
                stdin_open = False
                os.write(master, b"\x04")  # end of input, as a terminal says it
        done, st = os.waitpid(pid, os.WNOHANG)
        if done:
            status.append(os.waitstatus_to_exitcode(st))
            while True:  # drain what is left
                try:
                    data = os.read(master, 65536)
                except OSError:
                    break
                if not data:
                    break
                os.write(1, data)
            return
    _, st = os.waitpid(pid, 0)
    status.append(os.waitstatus_to_exitcode(st))
