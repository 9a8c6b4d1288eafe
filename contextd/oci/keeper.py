"""An OCI container's root keeper: what a guest's supervisor does for its root, for a
container whose init is its engine's child, not ours.

A job of contextd's fork server for the container's life (started when create
has forked the init). It holds a copy of the FUSE session of the container's
cowfs root (contextd.rootserver) and watches its server: when the server dies,
a successor takes over the session and the container sees a pause; when none
can, the container's init is killed (its engine reports it, e.g. exit 137).
Watching the init through a pidfd (it is not ours to wait for): once it has
ended, a dying server is not replaced. The keeper ends when the root is
unmounted (contextd-oci delete), reaping the last server it started.

Once set up, the keeper execs contextd-supervise (native/supervise.c, keep=), which
does the same without a Python process's memory; the loop here is used where that
program is missing.

Protocol: the job's arguments are {"fuse_server": as for contextd.supervisor,
"init_pid", "init_start"}; nothing is said back.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
from typing import Any

from contextd import procfs
from contextd.rootserver import STEADY, RootServer, RootServerError, exec_steady
from cowfs.host import registry


def _become_steady(server: RootServer, init: int, init_pid: int, mountpoint: str) -> None:
    """Exec contextd-supervise as the keeper (native/supervise.c, keep=): the loop below,
    without a Python process's memory. Returns only if the exec failed."""
    argv, passed = server.steady_arguments()
    exec_steady(
        [f"keep={mountpoint}", f"init={init_pid},{init}", *argv],
        passed + ([init] if init >= 0 else []),
    )


def keep(args: dict[str, Any]) -> int:
    """The job (see the module docstring): 0 once the root is unmounted, 1 if it was lost."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        server = RootServer(args["fuse_server"])
    except (OSError, RootServerError):
        return 1
    mountpoint = os.path.realpath(args["fuse_server"]["mount"]["mountpoint"])
    init = procfs.pidfd_of(int(args["init_pid"]), int(args["init_start"]))
    init = -1 if init is None else init
    if STEADY.exists():
        _become_steady(server, init, int(args["init_pid"]), mountpoint)
    while True:
        watched = [server.pidfd] + ([init] if init >= 0 else [])
        try:
            ready, _, _ = select.select(watched, [], [])
        except InterruptedError:
            continue
        if init in ready:
            os.close(init)
            init = -1
            continue
        if mountpoint not in registry.mounted_points() or init < 0:
            with contextlib.suppress(ChildProcessError):  # a successor of ours
                os.waitid(os.P_PIDFD, server.pidfd, os.WEXITED)
            server.close()
            return 0
        try:
            server.ended()
        except RootServerError:
            server.close()
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(init, signal.SIGKILL)
            return 1
