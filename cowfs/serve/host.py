"""One FUSE server process serving several guests' mounts (contextd's ``fuse_server = "shared"``).

A guest's own server is a Python process of its own: ~8 MiB of private memory
while idle, the larger part of what an idle guest costs. Here mounts share one
process, its trio loop, worker threads and io_uring; each keeps what is its own
(MountedTree: inode table, open files, accounting, FUSE session, registry
record, journal, log file).

What sharing gives up, and what stays: the server's CPU and memory are no longer
charged to each guest's cgroup, and one guest's heavy requests delay the others'
(one event loop). A mount still ends alone: its unmount ends its session. If the
process dies, every mount's supervisor starts a server of the guest's own on the
same session (resume.py), as for any server that dies.

Protocol: the host listens on a Unix socket (its owner's: contextd's run
directory, root's alone). A client sends one JSON line, the mount's arguments
(backing, mountpoint, log, and what ``mount_options`` reads), and gets one line
back once the kernel has set the mount up: ``{"pid": N}`` or ``{"error": "..."}``.
The process ends when its last mount has ended; a client that finds no host, or
one that is ending, starts another (contextd.forkserver's ``host`` job).
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import signal
import socket
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cowfs.errors import CowfsError

if TYPE_CHECKING:
    from cowfs.serve.mount import MountOptions
    from cowfs.serve.mounted import MountedTree

log = logging.getLogger(__name__)

# Node fds kept open per mount at most: the process's fd limit is shared out among
# its mounts (beyond its share a node costs one open_by_handle_at on its next use).
SHARED_NODE_FDS = 1024
_MAX_REQUEST = 65536

_mount_log: contextvars.ContextVar[logging.Handler | None] = contextvars.ContextVar(
    "cowfs_mount_log", default=None
)


class _MountLogs(logging.Handler):
    """Each mount's log lines to its own file: the one of the task that logged (a context
    variable trio copies into every task a mount's serving starts); others to the host's."""

    def __init__(self, fallback: logging.Handler):
        super().__init__()
        self.fallback = fallback

    def emit(self, record: logging.LogRecord) -> None:
        (_mount_log.get() or self.fallback).handle(record)


def _file_handler(path: str) -> logging.Handler:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s")
    )
    return handler


class Host:
    """The mounts this process serves, and the listening socket new ones come through."""

    def __init__(self, listener: socket.socket, options_of: Callable[[dict[str, Any]], Any]):
        from cowfs.serve.uring import Ring
        from cowfs.serve.workers import WorkerPool

        self.listener = listener
        self.options_of = options_of  # a request's arguments -> MountOptions
        self.workers = WorkerPool()
        self.ring = Ring.open()
        self.trees: dict[str, MountedTree] = {}
        # Three quarters of the fd limit for node fds, shared out among the mounts; the
        # rest for open files (node_fd_budget).
        from cowfs.serve.mount import node_fd_budget

        self.node_fds = node_fd_budget(None)
        self.pending = 0  # requests being answered: the host ends when none and no mounts
        self.ending = False

    async def run(self) -> None:
        import trio

        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            nursery.start_soon(self.workers.serve)
            if self.ring is not None:
                nursery.start_soon(self.ring.serve)
            nursery.start_soon(self._signals)
            nursery.start_soon(self._keep_books)
            listener = trio.socket.from_stdlib_socket(self.listener)
            while not self.ending:
                client, _ = await listener.accept()
                nursery.start_soon(self._answer, client)

    def _node_fd_share(self, mounts: int) -> int:
        return max(64, min(SHARED_NODE_FDS, self.node_fds // max(1, mounts)))

    def _share_node_fds(self) -> None:
        """Each mount's share of the node fds, as mounts come and go."""
        share = self._node_fd_share(len(self.trees))
        for tree in self.trees.values():
            tree.table.resize(share)

    def _end_if_idle(self) -> None:
        """No mounts and no requests: stop taking requests; the process ends."""
        if self.trees or self.pending or self.ending:
            return
        self.ending = True
        with contextlib.suppress(OSError):
            os.unlink(self.listener.getsockname())
        self.nursery.cancel_scope.cancel()

    async def _signals(self) -> None:
        import trio

        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                if signum == signal.SIGHUP:  # cowfs limit/quota: books now
                    for tree in list(self.trees.values()):
                        await tree.keep_books()
                    continue
                log.info("signal %d: unmounting every mount", signum)
                for tree in list(self.trees.values()):
                    tree.terminate()
                self._end_if_idle()

    async def _keep_books(self) -> None:
        import trio

        from cowfs.serve.mount import SYNC_INTERVAL

        while True:
            await trio.sleep(SYNC_INTERVAL)
            for tree in list(self.trees.values()):
                await tree.keep_books()

    async def _answer(self, client: Any) -> None:
        """One client's request: mount, answer when ready, then serve the mount to its end."""
        import trio

        with client:
            try:
                request = await _read_line(client)
                args = json.loads(request)
                backing, mountpoint = str(args["backing"]), str(args["mountpoint"])
                log_file = str(args["log"])
            except (OSError, ValueError, KeyError, TypeError) as e:
                with contextlib.suppress(OSError):
                    await client.send(json.dumps({"error": f"bad request: {e}"}).encode() + b"\n")
                return
            answered = trio.Event()
            answer: dict[str, Any] = {}

            def ready(error: str | None) -> None:
                if not answered.is_set():
                    answer.update({"error": error} if error else {"pid": os.getpid()})
                    answered.set()

            self.pending += 1
            try:
                self.nursery.start_soon(
                    self._serve_mount, backing, mountpoint, self.options_of(args), log_file, ready
                )
                await answered.wait()
                with contextlib.suppress(OSError):
                    await client.send(json.dumps(answer).encode() + b"\n")
            finally:
                self.pending -= 1
                self._end_if_idle()

    async def _serve_mount(
        self,
        backing: str,
        mountpoint: str,
        options: MountOptions,
        log_file: str,
        ready: Callable[[str | None], None],
    ) -> None:
        from cowfs.host.treelock import tree_lock
        from cowfs.serve.mount import check_mount_args
        from cowfs.serve.mounted import MountedTree, MountFailed

        handler = _file_handler(log_file)
        _mount_log.set(handler)  # this task's, and every task it starts
        try:
            with contextlib.ExitStack() as held:
                try:
                    backing, mountpoint = check_mount_args(backing, mountpoint)
                    if mountpoint in self.trees:
                        raise CowfsError(f"mountpoint {mountpoint}: already served here")
                    held.enter_context(tree_lock(backing, exclusive=True, role="backing tree"))
                    tree = MountedTree(
                        backing,
                        mountpoint,
                        options,
                        log_file,
                        workers=self.workers,
                        ring=self.ring,
                        node_fds=self._node_fd_share(len(self.trees) + 1),
                        ready=ready,
                    )
                    tree.open(os.getpid(), shared=True)
                except (CowfsError, MountFailed) as e:
                    ready(str(e))
                    return
                self.trees[mountpoint] = tree
                self._share_node_fds()
                log.info(
                    "serving %s at %s (pid %d, shared with %d other mounts; passthrough of"
                    " shared files %s)",
                    backing,
                    mountpoint,
                    os.getpid(),
                    len(self.trees) - 1,
                    "asked for" if tree.passthrough.wanted else "off",
                )
                clean = False
                try:
                    await tree.serve()  # no linger: the other mounts' requests would wait
                    clean = True
                finally:
                    del self.trees[mountpoint]
                    tree.close(clean)
                    self._share_node_fds()
                    ready(f"mount of {mountpoint} ended before it was ready")
        finally:
            handler.close()
            self._end_if_idle()


async def _read_line(client: Any) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = await client.recv(4096)
        if not chunk:
            raise ValueError("no request")
        data += chunk
        if len(data) > _MAX_REQUEST:
            raise ValueError("request too long")
    return data


def serve_host(options_of: Callable[[dict[str, Any]], Any], log_file: str, path: Path) -> int:
    """Be a host listening at path: serve mounts until the last has ended; an exit status.

    A failure of the host leaves every mount it served for a successor of its own
    (resume.py), as the death of any server does.
    """
    import trio

    root_logger = logging.getLogger()
    root_logger.handlers[:] = [_MountLogs(_file_handler(log_file))]
    root_logger.setLevel(logging.INFO)
    os.umask(0)  # the kernel applied the caller's umask already
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    listener.bind(str(path))
    os.chmod(path, 0o600)
    listener.listen(64)
    host = Host(listener, options_of)
    try:
        trio.run(host.run)
    except BaseException:
        log.exception("cowfs host failed; its mounts are left to successors")
        return 1
    finally:
        if not host.ending:
            with contextlib.suppress(OSError):
                path.unlink()
    return 0


def request_mount(path: Path, args: dict[str, Any], timeout: float = 60.0) -> dict[str, Any] | None:
    """Ask the host listening at path to mount (args: see the module docstring); its
    answer, or None if none listens (or it ended before answering: start another)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as conn:
        conn.settimeout(timeout)
        try:
            conn.connect(str(path))
            conn.sendall(json.dumps(args).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = conn.recv(4096)
                if not chunk:
                    return None
                data += chunk
        except (FileNotFoundError, ConnectionRefusedError, ConnectionResetError):
            return None
        except OSError as e:
            return {"error": f"cowfs host: {e.strerror or e}"}
    try:
        answer: dict[str, Any] = json.loads(data)
    except ValueError:
        return {"error": "cowfs host: unreadable answer"}
    return answer
