"""The FUSE server of a guest's root, as its supervisor keeps it: watched, and replaced
when it dies.

The supervisor holds a copy of the server's /dev/fuse session fd (taken with
pidfd_getfd; the fd's number is in the mount's registry record), so that the
kernel keeps the guest's mount when the server dies, and starts a successor
on the same session (cowfs.serve.resume): the guest sees a pause. A server
that keeps dying (MAX_DEATHS within DEATH_WINDOW seconds), or one whose
successor cannot start, ends the guest instead: its record says why.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import sys
import time
from pathlib import Path
from typing import Any

from contextd import cgroups, namespace, procfs
from cowfs.atomicfile import write_atomically
from cowfs.host import registry
from native import syscalls as sc

# A guest's supervisor and an OCI root's keeper, once set up (native/supervise.c,
# built by tools/install.sh): they exec it and it goes on with their loop.
STEADY = Path(sc.__file__).with_name("contextd-supervise")

MAX_DEATHS = 5
DEATH_WINDOW = 60.0
SUCCESSOR_TIMEOUT = 30.0  # seconds a successor may take to serve (it recounts usage)


class RootServerError(Exception):
    """The guest's root cannot be served any more; the reason, one line."""


class RootServer:
    """A running FUSE server of the guest's root: its pidfd, and a copy of its session."""

    def __init__(self, described: dict[str, Any]):
        self.pid = int(described["pid"])
        self.pidfd = os.pidfd_open(self.pid)
        if procfs.start_time(self.pid) != described["start"]:
            os.close(self.pidfd)
            raise RootServerError("the guest root's cowfs server has ended")
        self.mount: dict[str, Any] | None = described.get("mount")
        self.record_path = Path(described["record"]) if described.get("record") else None
        self.session = -1
        self.deaths: list[float] = []
        self.restarts = 0
        if self.mount is not None:
            self.session = self._copy_session()

    def _copy_session(self) -> int:
        """A copy of the server's /dev/fuse fd; -1 if it cannot be had (no replacement
        then: the guest ends with its server)."""
        record = registry.read_record(os.path.realpath(self.mount["mountpoint"]))  # type: ignore[index]
        if record is None or record.pid != self.pid or record.session_fd < 0:
            return -1
        try:
            return sc.pidfd_getfd(self.pidfd, record.session_fd)
        except OSError:
            return -1

    def ended(self) -> None:
        """The server has died: start a successor on its session, or raise RootServerError."""
        # Ours if it was a successor: reaped here, or it would pass to the daemon as
        # a zombie when this supervisor ends. Its pidfd is readable, so the wait is
        # short, but a WNOHANG wait could come before it was reapable.
        with contextlib.suppress(ChildProcessError):
            os.waitid(os.P_PIDFD, self.pidfd, os.WEXITED)
        os.close(self.pidfd)
        self.pidfd = -1
        now = time.monotonic()
        self.deaths = [t for t in self.deaths if now - t < DEATH_WINDOW] + [now]
        if self.session < 0 or self.mount is None:
            raise RootServerError("its cowfs server ended, and with it the guest's root")
        if len(self.deaths) > MAX_DEATHS:
            raise RootServerError(
                f"its cowfs server died {len(self.deaths)} times within {DEATH_WINDOW:g} s"
            )
        started = time.monotonic()
        self.pid, error = _start_successor(self.mount, self.session)
        if error is not None:
            raise RootServerError(f"its cowfs server died and could not be replaced: {error}")
        self.pidfd = os.pidfd_open(self.pid)
        self.restarts += 1
        if self.record_path is not None:
            with contextlib.suppress(OSError):
                write_atomically(
                    self.record_path,
                    json.dumps(
                        {
                            "replacements": self.restarts,
                            "last": time.time(),
                            "took": round(time.monotonic() - started, 3),
                            "pid": self.pid,
                        }
                    ),
                )

    def steady_arguments(self) -> tuple[list[str], list[int]]:
        """What contextd-supervise is told of this server: its arguments, and the fds
        they name (to be passed on)."""
        argv = [
            f"server={self.pid},{self.pidfd}",
            f"session={self.session}",
            f"python={sys.executable}",
        ]
        if self.mount is not None:
            argv.append(f"mount={json.dumps(self.mount)}")
        if self.record_path is not None:
            argv.append(f"server-record={self.record_path}")
        return argv, [fd for fd in (self.pidfd, self.session) if fd >= 0]

    def close(self) -> None:
        for fd in (self.pidfd, self.session):
            if fd >= 0:
                os.close(fd)
        self.pidfd = self.session = -1


def exec_steady(argv: list[str], fds: list[int]) -> None:
    """Exec contextd-supervise with argv, passing fds on; returns only if it failed (the
    fds are then not inherited again)."""
    for fd in fds:
        os.set_inheritable(fd, True)
    try:
        os.execv(STEADY, [str(STEADY), *argv])
    except OSError:
        for fd in fds:
            os.set_inheritable(fd, False)


def _start_successor(mount: dict[str, Any], session: int) -> tuple[int, str | None]:
    """Fork a cowfs server for session (cowfs.serve.resume); (its pid, None) once it
    serves, else (pid, what went wrong)."""
    answer_r, answer_w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            os.close(answer_r)
            os.setsid()
            cgroups.join([Path(d) for d in mount.get("cgroup_dirs", [])])
            _serve_successor(mount, session, answer_w)
            status = 0
        finally:
            os._exit(status)
    os.close(answer_w)
    try:
        ready, _, _ = select.select([answer_r], [], [], SUCCESSOR_TIMEOUT)
        answer = os.read(answer_r, 4096).decode(errors="replace").strip() if ready else ""
    finally:
        os.close(answer_r)
    if answer == "ok":
        return pid, None
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, 9)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)
    return pid, answer or "it did not answer"


def _serve_successor(mount: dict[str, Any], session: int, answer: int) -> None:
    """In the successor: nothing of the supervisor's but the session and the answer pipe."""
    from contextd.forkserver import mount_options
    from cowfs.serve import resume
    from cowfs.serve.mount import serve_successor

    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    namespace.close_fds(keep=(session, answer))
    session, answer = resume.reserve_handles(mount["mountpoint"], [session, answer])

    def tell(error: str | None) -> None:
        with contextlib.suppress(OSError):
            os.write(answer, (error or "ok").encode() + b"\n")
            os.close(answer)

    serve_successor(
        mount["backing"],
        mount["mountpoint"],
        mount_options(mount),
        mount["log"],
        session,
        tell,
    )


def successor_main(argv: list[str]) -> int:
    """``python -m contextd.rootserver successor SESSION_FD ANSWER_FD MOUNT_JSON``: the
    successor contextd-supervise (native/supervise.c) starts when the server dies."""
    session, answer, mount = int(argv[0]), int(argv[1]), json.loads(argv[2])
    cgroups.join([Path(d) for d in mount.get("cgroup_dirs", [])])
    _serve_successor(mount, session, answer)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] != ["successor"] or len(sys.argv) != 5:
        sys.exit("usage: python -m contextd.rootserver successor SESSION_FD ANSWER_FD MOUNT_JSON")
    sys.exit(successor_main(sys.argv[2:]))
