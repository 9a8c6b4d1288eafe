"""One guest tree served at its mount point: everything a mount has of its own.

A FUSE server process serves one of these (mount.serve) or several (host.py);
what they share is the process's: the worker threads and io_uring that disk I/O
goes to, the trio loop, signals. Life of a mount: ``MountedTree(...)`` recovers
the backing tree if its last mount crashed and builds the mount's collaborators;
``open`` mounts it (or takes over a dead server's session: resume.py) and
publishes its registry record; ``serve`` answers its requests until it is
unmounted or terminated; ``keep_books`` stores its usage now and then; ``close``
withdraws it and, after a clean end, marks the tree clean.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
from collections.abc import Callable
from typing import TYPE_CHECKING

from cowfs.errors import CowfsError
from cowfs.host import registry
from cowfs.serve import journal, recovery, resume, stats

if TYPE_CHECKING:
    import pyfuse3

    from cowfs.serve.mount import MountOptions
    from cowfs.serve.uring import Ring
    from cowfs.serve.workers import WorkerPool

log = logging.getLogger(__name__)


class MountFailed(Exception):
    """The mount cannot be served; why, in one line."""


class MountedTree:
    """A guest tree's mount: its inode table, open files, accounting and FUSE session."""

    def __init__(
        self,
        backing: str,
        mountpoint: str,
        options: MountOptions,
        log_file: str,
        *,
        workers: WorkerPool,
        ring: Ring | None,
        node_fds: int,
        ready: Callable[[str | None], None],
        resume_fd: int | None = None,
    ):
        """Recover the tree if need be and build the mount's collaborators (MountFailed).

        ready(None) runs once the kernel has set the mount up (ready(error) is the
        caller's to call when open fails); resume_fd: the FUSE session of a server
        that died, to serve in its stead (resume.py).
        """
        from cowfs.accounting.accountant import Accountant
        from cowfs.accounting.ledger import GuestLedger
        from cowfs.host.statedb import StateDB
        from cowfs.serve import durability, unpatched
        from cowfs.serve.cow import LinkBreaker
        from cowfs.serve.inodes import InodeTable
        from cowfs.serve.listings import Listings
        from cowfs.serve.openfiles import OpenFiles
        from cowfs.serve.operations import CowFS
        from cowfs.serve.passthrough import Passthrough

        self.backing = backing
        self.mountpoint = mountpoint
        self.options = options
        self.log_file = log_file
        self.resume_fd = resume_fd
        self.session: pyfuse3.Session | None = None
        self._ready = ready
        try:
            self.root_fd = os.open(backing, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise MountFailed(f"backing tree {backing}: {e.strerror}") from None
        try:
            crashed = recovery.is_dirty(self.root_fd)
            if crashed:
                swept = recovery.sweep_leftovers(self.root_fd)
                log.warning(
                    "last mount of %s did not end cleanly; removed %d leftovers", backing, swept
                )
            recovery.mark_dirty(self.root_fd)
            self.ledger = GuestLedger(StateDB(), backing, crashed)
        except OSError as e:
            os.close(self.root_fd)
            raise MountFailed(f"backing tree {backing}: {e.strerror}") from None
        except sqlite3.Error as e:
            os.close(self.root_fd)
            raise MountFailed(f"state database: {e}") from None

        self.table = InodeTable(self.root_fd, node_fds)
        acct = Accountant(self.ledger.policy)
        self.passthrough = Passthrough(options.passthrough, self.root_fd)
        open_files = OpenFiles(self.table, acct, self.passthrough)
        if options.resumable:
            journal_at = resume.journal_dir(mountpoint)
            if resume_fd is not None:
                lost_nodes = self.table.resume(journal.read_nodes(journal_at))
                lost_files = open_files.resume(list(journal.read_files(journal_at)))
                log.warning(
                    "resuming the session of a server that died: %d node ids and %d open"
                    " files could not be taken over",
                    lost_nodes,
                    lost_files,
                )
            self.table.journal = open_files.journal = journal.Journal(
                journal_at, fresh=resume_fd is None
            )
        self.breaker = LinkBreaker(
            self.table,
            workers,
            open_files,
            acct,
            durability.for_backing(self.root_fd, options.sync_breaks),
        )
        self.fs = CowFS(
            table=self.table,
            open_files=open_files,
            passthrough=self.passthrough,
            listings=Listings(self.table),
            dir_handles=unpatched.DirHandles(),
            breaker=self.breaker,
            acct=acct,
            workers=workers,
            disk=ring or workers,
            cache_timeout=options.cache_timeout,
            after_init=self._initialized,
            ids=options.id_map,
        )

    def _initialized(self) -> None:
        from cowfs.serve.mount import raise_read_ahead

        # The kernel sets the connection's read-ahead from the INIT reply: raised
        # after it, and only then is the mount ready for its users.
        raise_read_ahead(self.mountpoint)
        if self.options.resumable and self.resume_fd is None and self.session is not None:
            resume.keep_init_request(self.mountpoint, self.session)
        try:
            self._ready(None)
        except OSError as e:  # the mount command is gone: the mount serves all the same
            log.warning("could not tell the mount command the mount is ready: %s", e)

    def open(self, server_pid: int, shared: bool = False) -> None:
        """Mount (or take over the dead server's session) and publish the mount's record;
        MountFailed if it cannot. server_pid: the process serving it; shared: that
        process serves other mounts too (host.py)."""
        import pyfuse3

        fuse_options = set(pyfuse3.default_options)
        fuse_options |= {"allow_other", "suid", f"fsname={self.backing}", "subtype=cowfs"}
        fuse_options.add("dev" if self.options.allow_devices else "nodev")
        try:
            if self.resume_fd is None:
                self.session = pyfuse3.Session.open(self.fs, self.mountpoint, fuse_options)
            else:
                self.session = resume.init_session(
                    self.fs, self.resume_fd, self.mountpoint, fuse_options
                )
        except RuntimeError as e:
            if self.resume_fd is None:
                recovery.mark_clean(self.root_fd)
            self._release()
            raise MountFailed(f"mount of {self.mountpoint} failed: {e}") from None
        self.fs.session = self.passthrough.session = self.session
        try:
            registry.write_record(
                registry.MountRecord(
                    self.mountpoint,
                    self.backing,
                    server_pid,
                    self.log_file,
                    self.options.xid,
                    self.session.fd,
                    shared,
                )
            )
        except (OSError, CowfsError) as e:  # no mount without its record: nothing could stop it
            with contextlib.suppress(Exception):
                self.session.close(unmount=self.resume_fd is None)
            self._release()
            raise MountFailed(f"mount of {self.mountpoint} failed: its record: {e}") from None
        if self.resume_fd is not None:
            resume.resend_pending(self.session)

    async def serve(self, linger_ns: int = 0) -> None:
        """Answer the mount's requests until it is unmounted or terminate() is called.

        linger_ns: wait that long for the guest's next request outside the event loop
        (pyfuse3's Session.serve); only for a process serving this mount alone.
        """
        import trio

        assert self.session is not None
        if self.resume_fd is not None:  # its INIT was replayed before the loop (resume.py)
            trio.lowlevel.current_trio_token().run_sync_soon(self._initialized)
        await self.session.serve(min_tasks=2, max_tasks=64, linger_ns=linger_ns)

    def terminate(self) -> None:
        """Have serve() return (the mount stays until close)."""
        if self.session is not None:
            self.session.terminate()

    def publish_stats(self) -> None:
        """The mount's counters, for monitoring (stats.py)."""
        try:
            stats.write(
                self.mountpoint,
                os.getpid(),
                self.fs.counts,
                link_breaks=self.breaker.breaks,
                page_cache_reads=self.direct_reads(),
                handler_reads=self.fs.handler_reads,
                passthrough_opens=self.passthrough.opens,
                nodes=len(self.table),
            )
        except OSError as e:
            log.warning("could not publish the mount's counts: %s", e)

    def direct_reads(self) -> int:
        return self.session.direct_reads() if self.session is not None else 0

    async def keep_books(self) -> None:
        """Store the guest's usage (the database work in a thread: a database locked by
        another process holds up the books, never the guest)."""
        import trio

        self.publish_stats()
        snapshot = self.ledger.snapshot(final=False)
        try:
            stored = await trio.to_thread.run_sync(self.ledger.store, snapshot)
        except sqlite3.Error as e:
            log.error("state database: %s", e)
            self.ledger.policy.grace_changed |= snapshot.grace is not None
            return
        self.ledger.apply(stored)

    def close(self, clean: bool) -> None:
        """Withdraw the mount after serve() ended. clean: it ended by its unmount (or a
        signal), not a failure: the tree is then marked clean; otherwise the mount stays
        for a successor to resume (resume.py) if it is resumable."""
        if self.session is not None:
            with contextlib.suppress(Exception):
                self.session.close(unmount=clean or not self.options.resumable)
        registry.remove_record(self.mountpoint)
        if clean:
            stats.forget(self.mountpoint)
            if self.table.journal is not None:
                self.table.journal.close()
                resume.forget_journal(self.mountpoint)
            try:
                self.ledger.sync(final=True)
            except sqlite3.Error as e:
                log.error("state database: %s; usage will be recomputed", e)
            recovery.mark_clean(self.root_fd)
        log.info(
            "stopped serving %s (%d link breaks, %d node reopens; reads: %d from the"
            " page cache by pyfuse3, %d by cowfs)",
            self.mountpoint,
            self.breaker.breaks,
            self.table.reopens,
            self.direct_reads(),
            self.fs.handler_reads,
        )
        self._release()

    def _release(self) -> None:
        """Close what the mount holds in this process (a server of several mounts goes on)."""
        with contextlib.suppress(Exception):
            self.passthrough.close()
        self.table.close()
        self.ledger.close()
        with contextlib.suppress(OSError):
            os.close(self.root_fd)
