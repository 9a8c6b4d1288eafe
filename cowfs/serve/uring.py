"""Reads and writes that may wait for the disk, done by the kernel through io_uring.

A read that misses the page cache must not stall the mount's event loop, nor a
write on a filesystem that cannot promise not to wait (ext4 refuses RWF_NOWAIT
for buffered writes). Handing one to a worker thread (cowfs/serve/workers.py) costs two
thread wake-ups and a GIL hand-off; io_uring lets the kernel do it on its own and
post the result to an eventfd that the loop watches.

Even so, putting a task to sleep and waking it again costs trio ~60 µs on the
development VM, as much as the disk read itself. So when no other read is in
flight, the loop first waits for the kernel a short while (``QUICK_WAIT_NS``):
a read that completes within it is answered at once, and a slower one costs the
mount that much stall at most before it is awaited like any other.

Where io_uring is not available (an old kernel, or disabled by sysctl or
seccomp), ``Ring.open`` logs why and returns None, and the caller keeps using
its worker threads.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import outcome
import trio

from cowfs.serve.workers import wait_eventfd
from native._uring import ffi, lib  # type: ignore[import-not-found]

log = logging.getLogger(__name__)

_REAP_BATCH = 64

# How long the loop may block for a lone read before it lets other requests run:
# a few times a solid-state disk's random-read latency.
QUICK_WAIT_NS = 250_000

# Buffers of requests still in flight when a ring was closed: the kernel may still
# use them, so they are never freed.
_orphaned: list[Any] = []


class Ring:
    """An io_uring whose reads and writes are awaited by trio tasks; run serve() in the nursery."""

    def __init__(self, handle: Any, wakeup: int, quick_wait_ns: int = QUICK_WAIT_NS):
        self._ring = handle
        self._wakeup = wakeup
        self.quick_wait_ns = quick_wait_ns
        self._waiting: dict[int, tuple[trio.lowlevel.Task, Any]] = {}
        self._next_tag = 0
        self._tags = ffi.new("uint64_t[]", _REAP_BATCH)
        self._results = ffi.new("int[]", _REAP_BATCH)

    @classmethod
    def open(cls, entries: int = 64) -> Ring | None:
        """A new ring, or None where the kernel refuses io_uring."""
        wakeup = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        err = ffi.new("int *")
        handle = lib.cowfs_ring_open(entries, wakeup, err)
        if handle == ffi.NULL:
            os.close(wakeup)
            log.info("io_uring unavailable: %s", os.strerror(err[0]))
            return None
        return cls(handle, wakeup)

    async def readinto(self, fd: int, view: memoryview, offset: int) -> int:
        """pread(fd) into view at offset, done by the kernel; the number of bytes read."""
        buffer = ffi.from_buffer("char[]", view, require_writable=True)
        return await self._run(lib.cowfs_ring_read, fd, buffer, len(view), offset)

    async def write(self, fd: int, data: bytes | memoryview, offset: int) -> int:
        """pwrite(fd) of data at offset, done by the kernel; the number of bytes written."""
        buffer = ffi.from_buffer("char[]", data)
        return await self._run(lib.cowfs_ring_write, fd, buffer, len(buffer), offset)

    async def _run(self, submit: Any, fd: int, buffer: Any, length: int, offset: int) -> int:
        tag = self._next_tag
        self._next_tag += 1
        # The buffer stays referenced here until the kernel is done with it.
        self._waiting[tag] = (trio.lowlevel.current_task(), buffer)
        # Alone, wait a little for the kernel, with the eventfd silenced so that
        # a completion reaped here does not wake the loop again for nothing.
        quick = bool(self.quick_wait_ns) and len(self._waiting) == 1
        if quick:
            lib.cowfs_ring_notify(self._ring, 0)
        try:
            rc = submit(self._ring, fd, buffer, length, offset, tag)
            if rc < 0:
                del self._waiting[tag]
                raise OSError(-rc, os.strerror(-rc))
            if quick:
                lib.cowfs_ring_wait(self._ring, self.quick_wait_ns)
        finally:
            if quick:
                lib.cowfs_ring_notify(self._ring, 1)
        # Reaped after notifications are back on: a later completion wakes serve().
        result = self._reap(own=tag) if quick else None
        if result is None:
            # Not cancellable: the kernel owns the buffer until the completion arrives.
            result = await trio.lowlevel.wait_task_rescheduled(lambda _: trio.lowlevel.Abort.FAILED)
        if result < 0:
            raise OSError(-result, os.strerror(-result))
        return result

    async def serve(self) -> None:
        """Wake the tasks whose reads and writes completed, as the eventfd says they have."""
        while True:
            await wait_eventfd(self._wakeup)
            self._reap()

    def _reap(self, own: int = -1) -> int | None:
        """Wake the tasks of every completed request; the result of request own, if it is done."""
        mine = None
        while True:
            count = lib.cowfs_ring_reap(self._ring, self._tags, self._results, _REAP_BATCH)
            for i in range(count):
                tag = self._tags[i]
                task, _ = self._waiting.pop(tag)
                if tag == own:
                    mine = self._results[i]
                else:
                    trio.lowlevel.reschedule(task, outcome.Value(self._results[i]))
            if count < _REAP_BATCH:
                return mine

    def close(self) -> None:
        """Tear the ring down (once the tasks using it are gone)."""
        _orphaned.extend(buffer for _, buffer in self._waiting.values())
        lib.cowfs_ring_close(self._ring)
        os.close(self._wakeup)
