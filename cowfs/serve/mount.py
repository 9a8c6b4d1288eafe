"""Starting and stopping the FUSE process that serves one guest root.

``mount`` checks its arguments, forks a daemon and returns once the mount is
ready (or with the daemon's one-line error); ``serve`` is the daemon's life:
recover the backing tree if the last mount crashed, mount, serve until
unmounted or signalled, then mark the tree clean. ``unmount`` detaches a
mount and waits for its process to finish.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import resource
import select
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cowfs.errors import CowfsError
from cowfs.host import registry
from cowfs.host.barrier import refuse_reachable
from cowfs.host.paths import log_dir, run_dir
from cowfs.host.treelock import tree_lock
from cowfs.serve import resume, stats
from cowfs.serve.idmap import SAME_IDS, IdMap
from native import syscalls

log = logging.getLogger(__name__)

SYNC_INTERVAL = 5.0  # seconds between writes of the usage counters to the state database
# Node fds kept open unless --max-node-fds says otherwise. Each pins its backing
# inode and dentry in the kernel (~1.5 KiB, charged to this process), so the
# cache holds a guest's working set of hot files, not every inode the kernel
# knows: beyond it a node costs one open_by_handle_at on its next use.
DEFAULT_NODE_FDS = 16384
# How long a server of one mount waits for the guest's next request before its event
# loop runs again. A busy guest's next request mostly comes within tens of
# microseconds of the answer to its last; one taken so costs no pass of the loop
# (epoll_ctl, epoll_wait, a task switch). It waits in ppoll(2), asleep, never spinning.
REQUEST_LINGER_NS = 50_000


@dataclass
class MountOptions:
    """How a guest root is served."""

    xid: int | None = None
    cache_timeout: float = 60.0
    allow_devices: bool = False
    debug: bool = False
    max_node_fds: int | None = None
    sync_breaks: bool = True
    io_uring: bool = True
    allow_reachable: bool = False  # serve a tree host users can reach (barrier.py): dangerous
    id_map: IdMap = SAME_IDS  # a user-namespaced guest's ids on the host (idmap.py)
    resumable: bool = False  # keep a journal for a successor server (journal.py, resume.py)
    passthrough: bool = True  # shared files' reads served by the kernel (passthrough.py)


def default_log_file(mountpoint: str) -> Path:
    """The log file of the daemon serving mountpoint."""
    slug = mountpoint.strip("/").replace("/", "_") or "root"
    return log_dir() / f"mount-{slug}.log"


def check_mount_args(
    backing: str, mountpoint: str, allow_reachable: bool = False
) -> tuple[str, str]:
    """Validate BACKING and MOUNTPOINT; their real paths, or a CowfsError saying what is wrong.

    Both must be out of host users' reach (barrier.py) unless allow_reachable.
    """
    if not os.path.lexists(backing):
        raise CowfsError(f"backing tree {backing}: no such directory")
    if not os.path.isdir(backing):
        raise CowfsError(f"backing tree {backing}: not a directory")
    if not os.path.lexists(mountpoint):
        raise CowfsError(f"mountpoint {mountpoint}: no such directory")
    if not os.path.isdir(mountpoint):
        raise CowfsError(f"mountpoint {mountpoint}: not a directory")
    backing_real = os.path.realpath(backing)
    mp_real = os.path.realpath(mountpoint)
    mounted = registry.mounted_points()
    if mp_real in mounted:
        raise CowfsError(f"mountpoint {mountpoint}: already in use ({mounted[mp_real]} mounted)")
    if mounted.get(backing_real) == registry.FSTYPE:
        raise CowfsError(f"backing tree {backing}: is itself a cowfs mount")
    if registry.mounts_serving(backing_real):
        raise CowfsError(f"backing tree {backing}: already served by another cowfs mount")
    if mp_real == backing_real or mp_real.startswith(backing_real.rstrip("/") + "/"):
        raise CowfsError(f"mountpoint {mountpoint}: lies inside the backing tree")
    if os.geteuid() != 0:
        raise CowfsError("cowfs mount must run as root (it serves every uid of the guest)")
    refuse_reachable("backing tree", backing, allow_reachable)
    refuse_reachable("mountpoint", mountpoint, allow_reachable)
    run_dir()  # made root's alone now, or refused here in one line, not in the daemon
    log_dir()
    return backing_real, mp_real


def node_fd_budget(requested: int | None) -> int:
    """Raise RLIMIT_NOFILE as far as allowed; how many node fds to keep open.

    An O_PATH fd per inode the kernel caches makes most requests one syscall;
    beyond the budget, fds are closed and reopened from file handles. The
    budget is DEFAULT_NODE_FDS or the one requested, and never more than three
    quarters of the limit: the rest stays free for guests' open files.
    """
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        with open("/proc/sys/fs/nr_open") as f:
            ceiling = int(f.read())
        resource.setrlimit(resource.RLIMIT_NOFILE, (ceiling, ceiling))
    except (OSError, ValueError):  # no CAP_SYS_RESOURCE: the hard limit is the ceiling
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    budget = max(64, (limit - 256) * 3 // 4)
    return min(budget, requested or DEFAULT_NODE_FDS)


def raise_read_ahead(mountpoint: str) -> None:
    # The FUSE connection's bdi defaults to 128 KiB; with 1 MiB a 512 MiB file whose
    # backing is in the page cache read through the mount in 0.13-0.14 s instead of 0.19 s.
    # Not os.stat(mountpoint): that would wait for this very process to answer.
    try:
        path = f"/sys/class/bdi/{registry.device_of(mountpoint)}/read_ahead_kb"
        with open(path, "w") as f:
            f.write("1024")
    except OSError as e:
        log.info("could not raise read_ahead_kb: %s", e)


def serve(
    backing: str,
    mountpoint: str,
    options: MountOptions,
    log_file: str,
    ready: Callable[[str | None], None],
    resume_fd: int | None = None,
) -> None:
    """Serve backing at mountpoint until unmounted; ready(None) once mounted, else ready(error).

    resume_fd: the FUSE session of a server that died, to serve in its stead
    (resume.py); the mount is there already.
    """
    import trio

    from cowfs.serve.mounted import MountedTree, MountFailed
    from cowfs.serve.uring import Ring
    from cowfs.serve.workers import WorkerPool

    os.umask(0)  # the kernel applied the caller's umask already
    workers = WorkerPool()
    # Disk reads, and writes that may wait, go to the kernel through io_uring
    # where it allows, else to the workers.
    ring = Ring.open() if options.io_uring else None
    try:
        tree = MountedTree(
            backing,
            mountpoint,
            options,
            log_file,
            workers=workers,
            ring=ring,
            node_fds=node_fd_budget(options.max_node_fds),
            ready=ready,
            resume_fd=resume_fd,
        )
        tree.open(os.getpid())
    except MountFailed as e:
        ready(str(e))
        return
    log.info(
        "serving %s at %s (pid %d; disk reads by %s; private copies' data %s;"
        " passthrough of shared files %s)",
        backing,
        mountpoint,
        os.getpid(),
        "io_uring" if ring is not None else "worker threads",
        tree.breaker.durability.value,
        "asked for" if tree.passthrough.wanted else "off",
    )

    async def run() -> None:
        async with trio.open_nursery() as nursery:

            async def stop_on_signal() -> None:
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async for signum in signals:
                        log.info("signal %d: unmounting", signum)
                        tree.terminate()
                        return

            async def keep_books() -> None:
                # Every few seconds, and at once on SIGHUP (cowfs limit/quota send it).
                with trio.open_signal_receiver(signal.SIGHUP) as hangups:
                    while True:
                        with trio.move_on_after(SYNC_INTERVAL):
                            await hangups.__anext__()
                        await tree.keep_books()

            nursery.start_soon(stop_on_signal)
            nursery.start_soon(keep_books)
            nursery.start_soon(workers.serve)
            if ring is not None:
                nursery.start_soon(ring.serve)
            await tree.serve(linger_ns=REQUEST_LINGER_NS)
            nursery.cancel_scope.cancel()

    clean = False
    try:
        trio.run(run)
        clean = True
    finally:
        # A server that failed leaves a resumable mount to its successor (resume.py).
        tree.close(clean)


def _setup_logging(log_file: str | None, debug: bool) -> None:
    handlers: list[logging.Handler]
    if log_file:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handlers = [logging.FileHandler(log_file)]
    else:
        handlers = [logging.StreamHandler(sys.stderr)]
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO,
        format="%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s",
        handlers=handlers,
        force=True,
    )


def mount(
    backing: str,
    mountpoint: str,
    options: MountOptions,
    foreground: bool = False,
    log_file: str | None = None,
) -> int | None:
    """Mount backing at mountpoint; returns the daemon's pid once the mount is ready.

    With foreground=True, serves in this process until unmounted and returns None.
    The backing tree's lock (treelock.py) is held by the serving process for
    the mount's whole life: no clone, hashify or delete of it meanwhile.
    """
    backing, mountpoint = check_mount_args(backing, mountpoint, options.allow_reachable)
    with tree_lock(backing, exclusive=True, role="backing tree"):
        # The daemon forked below shares the lock; this process's copy closes on return.
        return _mount_locked(backing, mountpoint, options, foreground, log_file)


def _mount_locked(
    backing: str, mountpoint: str, options: MountOptions, foreground: bool, log_file: str | None
) -> int | None:
    log_path = log_file or str(default_log_file(mountpoint))
    if foreground:
        _setup_logging(log_file, options.debug)
        failure: list[str] = []

        def note(error: str | None) -> None:
            if error:
                failure.append(error)

        serve(backing, mountpoint, options, log_path, note)
        if failure:
            raise CowfsError(failure[0])
        return None

    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the daemon
        os.close(read_end)
        status = 1
        try:
            os.setsid()
            _detach_stdio()
            _setup_logging(log_path, options.debug)

            def tell_parent(error: str | None) -> None:
                os.write(write_end, (error or "ok").encode() + b"\n")
                os.close(write_end)

            serve(backing, mountpoint, options, log_path, tell_parent)
            status = 0
        except BaseException:
            log.exception("cowfs daemon failed")
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        answer = pipe.read().decode().strip()
    if answer != "ok":
        os.waitpid(pid, 0)
        raise CowfsError(answer or f"cowfs daemon exited before mounting; see {log_path}")
    return pid


def serve_successor(
    backing: str,
    mountpoint: str,
    options: MountOptions,
    log_file: str,
    session: int,
    ready: Callable[[str | None], None],
) -> None:
    """Serve the FUSE session of a server that died (resume.py) in this process, a fresh
    child whose fds are only its stdio, session and whatever ready writes to."""
    _setup_logging(log_file, options.debug)
    with tree_lock(backing, exclusive=True, role="backing tree"):
        serve(backing, mountpoint, options, log_file, ready, resume_fd=session)


def _detach_stdio() -> None:
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)


def unmount(
    mountpoint: str, lazy: bool = False, timeout: float = 30.0, kill_late: bool = False
) -> None:
    """Detach the cowfs mount at mountpoint and wait until its process has finished;
    kill_late: kill it if it has not within timeout (a server that hung or was
    stopped never notices the unmount; a killed one loses nothing: journal.py)."""
    # A mount whose server died cannot be stat'ed (ENOTCONN): it is known by its entry.
    point = os.path.realpath(mountpoint)
    fstype = registry.mounted_points().get(point)
    if fstype is None and not os.path.lexists(mountpoint):
        raise CowfsError(f"{mountpoint}: no such directory")
    if fstype is None:
        raise CowfsError(f"{mountpoint}: not mounted")
    if fstype != registry.FSTYPE:
        raise CowfsError(f"{mountpoint}: not a cowfs mount ({fstype})")
    record = registry.read_record(point)
    try:
        syscalls.umount2(point, syscalls.MNT_DETACH if lazy else 0)
    except OSError as e:
        if e.errno == errno.EBUSY:
            raise CowfsError(
                f"{mountpoint}: busy (in use by a process); --lazy detaches it"
            ) from None
        raise CowfsError(f"{mountpoint}: {e.strerror}") from None
    if record is None or record.pid <= 0:
        return
    if record.shared:
        _wait_withdrawn(record, timeout)
        return
    deadline = time.monotonic() + timeout
    if not _wait_ended(record.pid, timeout, kill_late):
        raise CowfsError(f"{mountpoint}: unmounted, but pid {record.pid} still runs")
    _reap_if_ours(record.pid, deadline)
    if registry.read_record(point) == record:  # its process died without withdrawing it
        registry.remove_record(point)
        resume.forget_journal(point)
        stats.forget(point)


def _wait_withdrawn(record: registry.MountRecord, timeout: float) -> None:
    """A mount of a server that serves others too (host.py) has ended when its record is
    withdrawn; that server goes on and is never killed for one mount (CowfsError if it
    has not let the mount go within timeout: a server that hung)."""
    deadline = time.monotonic() + timeout
    delay = 0.001
    while registry.read_record(record.mountpoint) == record:
        if not procfs_alive(record.pid):
            registry.remove_record(record.mountpoint)
            break
        if time.monotonic() > deadline:
            raise CowfsError(
                f"{record.mountpoint}: unmounted, but its server (pid {record.pid}, shared)"
                " has not let it go"
            )
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def procfs_alive(pid: int) -> bool:
    """Whether process pid exists (a zombie counts as ended)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


FUSECTL = Path("/sys/fs/fuse/connections")


def abort_connection(mountpoint: str) -> bool:
    """Abort the FUSE connection of the cowfs mount at mountpoint, as a last resort: every
    request waiting on it fails with ENOTCONN (its waiters can then be killed); False if
    there is no such mount."""
    point = os.path.realpath(mountpoint)
    if registry.mounted_points().get(point) != registry.FSTYPE:
        return False
    minor = registry.device_of(point).split(":")[1]
    if not (FUSECTL / minor).exists():
        with contextlib.suppress(OSError):  # mounted already, or no fusectl
            syscalls.mount("fusectl", str(FUSECTL), "fusectl", 0, None)
    try:
        (FUSECTL / minor / "abort").write_text("1")
    except OSError as e:
        log.error("could not abort the FUSE connection of %s: %s", mountpoint, e)
        return False
    return True


def _reap_if_ours(pid: int, deadline: float) -> None:
    """Reap the ended FUSE process where it became our child (contextd is a subreaper).

    Its pid cannot have been reused: a zombie keeps it. Its main thread may show
    as a zombie while its other threads still end, so wait for the whole process.
    """
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(pid, os.WNOHANG) == (0, 0) and time.monotonic() < deadline:
            time.sleep(0.01)


def _wait_ended(pid: int, timeout: float, kill_late: bool = False) -> bool:
    """Wait until process pid and all its threads have ended; False if timeout passed
    first (and, with kill_late, it did not end within 5 s of a SIGKILL either)."""
    # A pidfd is readable from the moment the whole process has exited: no polling.
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        if select.select([pidfd], [], [], timeout)[0]:
            return True
        if not kill_late:
            return False
        log.warning("cowfs server %d did not end within %g s of its unmount: killed", pid, timeout)
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        return bool(select.select([pidfd], [], [], 5)[0])
    finally:
        os.close(pidfd)
