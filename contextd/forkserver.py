"""contextd's helper processes, forked from one process that has their code imported already.

A guest costs two helper processes: its cowfs FUSE server and its supervisor
(contextd.supervisor: makes its context, is its init's parent, keeps its
console), both for the guest's life. Started as new Python processes, each
imported what it runs anew (`cowfs mount` 0.2 s until it served) and kept its
own copy of it: ~20 MiB PSS for a FUSE server, ~5 MiB for a bare Python.

The fork server imports all of it once, moves it out of the cyclic garbage
collector's way (gc.freeze: the collector then never writes to those pages)
and forks each helper from there, so that helpers share those pages with it
and with each other. Measured here, ten FUSE servers forked this way: 8 MiB
PSS each, 9 ms each to mount.

Protocol, over a Unix socket pair (the server's end is its stdin): contextd
sends one JSON request ``{"job": ..., "args": {...}}`` with three fds or more,
which become the job's stdin, stdout, stderr, 3, ...; the server forks a job process and
answers ``{"pid": N}`` at once (a job may need contextd to act before it
goes on: the supervisor waits for "go"). Jobs:

- ``mount``: mounts a cowfs root (cowfs.serve.mount.mount: it forks the FUSE
  server) and writes ``{"pid": N}`` or ``{"error": "..."}`` on its stdout.
  The job then ends, so the FUSE server passes to contextd, the subreaper.
- ``host``: cowfs.serve.host: one FUSE server that guests' mounts are then asked of
  (``fuse_server = "shared"``), until its last mount ends.
- ``supervisor``: contextd.supervisor on its stdin and stdout (a socket), for
  the guest's life.

The server reaps its jobs. It ends when contextd closes its end of the socket;
jobs still running pass to contextd.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from contextd.cgroups import move_to_helpers

if TYPE_CHECKING:
    from cowfs.serve.mount import MountOptions

log = logging.getLogger(__name__)

_MAX_REQUEST = 65536
_MAX_FDS = 8


# -- the server (python -m contextd.forkserver) ------------------------------


def mount_options(args: dict[str, Any]) -> MountOptions:
    """How a guest's root is served, from the mount job's arguments."""
    from cowfs.serve.idmap import SAME_IDS, IdMap
    from cowfs.serve.mount import MountOptions

    idmap = args.get("idmap")
    return MountOptions(
        xid=args.get("xid"),
        id_map=IdMap(idmap["base"], idmap["count"]) if idmap else SAME_IDS,
        resumable=True,  # its supervisor replaces a server that dies (contextd.rootserver)
        passthrough=args.get("passthrough", True),
    )


def _mount_job(args: dict[str, Any]) -> int:
    from cowfs.errors import CowfsError
    from cowfs.serve.mount import mount

    try:
        pid = mount(
            args["backing"], args["mountpoint"], mount_options(args), log_file=args.get("log")
        )
        answer: dict[str, object] = {"pid": pid}
    except CowfsError as e:
        answer = {"error": str(e)}
    sys.stdout.write(json.dumps(answer) + "\n")
    sys.stdout.flush()
    return 0


def _host_job(args: dict[str, Any]) -> int:
    from cowfs.serve.host import serve_host

    os.setsid()  # out of the daemon's session, as any mount's server
    return serve_host(mount_options, args["log"], Path(args["socket"]))


def _supervisor_job(args: dict[str, Any]) -> int:
    from contextd import supervisor

    supervisor.main()
    return 0


def _keeper_job(args: dict[str, Any]) -> int:
    from contextd.oci import keeper

    return keeper.keep(args)


JOBS: dict[str, Callable[[dict[str, Any]], int]] = {
    "mount": _mount_job,
    "host": _host_job,  # one server for the mounts of every guest whose fuse_server is "shared"
    "supervisor": _supervisor_job,
    "keeper": _keeper_job,  # an OCI container's root (contextd.oci.keeper)
}


def _preload() -> None:
    """Import everything a job runs, then keep the collector off those objects."""
    import pyfuse3  # noqa: F401
    import trio  # noqa: F401

    import contextd.oci.keeper
    import contextd.supervisor  # noqa: F401
    import cowfs.accounting.ledger
    import cowfs.host.statedb
    import cowfs.serve.host
    import cowfs.serve.mount
    import cowfs.serve.mounted
    import cowfs.serve.operations  # noqa: F401

    gc.collect()
    gc.freeze()


def _reap_jobs() -> None:
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass


def _run_job(server: socket.socket, job: str, args: dict[str, Any], fds: list[int]) -> None:
    """In the forked job process: fds as its 0, 1, 2, 3, ..., then the job; never returns."""
    status = 1
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        server.close()
        # Out of the way first, so that no dup2 below lands on an fd still to be moved.
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 256) for fd in fds]
        for fd in fds:
            os.close(fd)
        for target, fd in enumerate(high):
            os.dup2(fd, target)  # without O_CLOEXEC: the job's fds for what it execs too
            os.close(fd)
        sys.stdin = open(0, closefd=False)  # noqa: SIM115 (the job's own stdio)
        sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
        status = JOBS[job](args)
    except BaseException as e:
        with contextlib.suppress(Exception):
            sys.stderr.write(f"{job} job failed: {type(e).__name__}: {e}\n")
            sys.stderr.flush()
    finally:
        os._exit(status)


def serve(server: socket.socket) -> None:
    """Answer requests on server until the other end closes it."""
    signal.signal(signal.SIGCHLD, lambda _signum, _frame: _reap_jobs())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # contextd's ^C is contextd's to handle
    while True:
        message, fds, _flags, _address = socket.recv_fds(server, _MAX_REQUEST, _MAX_FDS)
        if not message:
            return
        try:
            request = json.loads(message)
            job, args = request["job"], request["args"]
            if job not in JOBS or len(fds) < 3:
                raise ValueError(f"bad request {request!r}")
            pid = os.fork()
            if pid == 0:
                _run_job(server, job, args, fds)
            answer: dict[str, object] = {"pid": pid}
        except (ValueError, KeyError, TypeError, OSError) as e:
            answer = {"error": str(e)}
        finally:
            for fd in fds:
                os.close(fd)
        server.sendall(json.dumps(answer).encode())


def main() -> None:
    """python -m contextd.forkserver, with a Unix socket as stdin."""
    server = socket.socket(fileno=os.dup(0))
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.close(null)
    _preload()
    serve(server)


# -- contextd's side ----------------------------------------------------------


class ForkServerError(Exception):
    """The fork server could not start a job."""


class ForkServer:
    """contextd's link to its fork server: started on first use, restarted if it died."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._process: subprocess.Popen[bytes] | None = None
        self._socket: socket.socket | None = None

    def start(self) -> None:
        """Start the server now (it takes ~0.3 s to import what the jobs run)."""
        with self._lock:
            self._ensure_running()

    def _ensure_running(self) -> socket.socket:
        if self._socket is not None and self._process is not None and self._process.poll() is None:
            return self._socket
        if self._process is not None:
            log.warning("fork server (pid %d) ended: starting another", self._process.pid)
        self._close()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "contextd.forkserver"],
                stdin=theirs.fileno(),
                stdout=subprocess.DEVNULL,
                close_fds=True,
                start_new_session=True,
            )
        finally:
            theirs.close()
        ours.set_inheritable(False)
        self._socket = ours
        # Before it forks anything (it forks only when asked, through this socket).
        try:
            move_to_helpers(self._process.pid)
        except OSError as e:
            log.warning("fork server (pid %d) left in contextd's cgroup: %s", self._process.pid, e)
        log.info("fork server started (pid %d)", self._process.pid)
        return ours

    def run(self, job: str, args: dict[str, Any], fds: list[int]) -> int:
        """Fork job with fds as its 0 (stdin), 1, 2, 3, ...; its pid (the fork server's child)."""
        message = json.dumps({"job": job, "args": args}).encode()
        with self._lock:
            for _attempt in (1, 2):
                sock = self._ensure_running()
                try:
                    socket.send_fds(sock, [message], fds)
                    answer = sock.recv(_MAX_REQUEST)
                except OSError:
                    answer = b""
                if answer:
                    break
                self._close()  # it died: one more try with a new one
            else:
                raise ForkServerError("the fork server did not answer; see the contextd log")
        reply = json.loads(answer)
        if "error" in reply:
            raise ForkServerError(reply["error"])
        return int(reply["pid"])

    def close(self) -> None:
        """End the server (its running jobs go on)."""
        with self._lock:
            self._close()

    def _close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
        if self._process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._process.wait(timeout=5)
            if self._process.poll() is None:
                self._process.kill()
                self._process.wait()
            self._process = None


if __name__ == "__main__":
    main()
