"""Phase 2, the costly part: content hash, extended attributes and COW mark of each candidate.

A file is read through the name the scan found first, opened beneath its
guest's root with nothing followed, and only if it is still the inode the
scan saw (``Inode.unchanged_since_scan``); one that changed meanwhile is left
unhashed, and so alone. A file under 1 MiB is opened, checked, listed for
extended attributes and read in one native call (``FileProbe``).

With a second CPU and enough files, a forked child (cowfs.forked) hashes
about half of them, split by estimated cost, and sends back only what it
found; if it fails in any way, this process hashes its share. Without one,
big files are hashed in threads beside this one's loop over the small ones.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

from cowfs.forked import ForkedCall
from cowfs.tree.marks import COW_MARK, is_reserved_xattr
from cowfs.tree.walk import PATH_CHUNK
from cowfs.unify.hashify.report import HashifyReport, Progress
from cowfs.unify.hashify.scan import Inode, Roots
from cowfs.unify.store import Store
from native import syscalls

# How guest files are opened for reading: a name the scan saw as a file may be
# a FIFO or a device by now; such a file is never waited on or made a terminal.
_READ = os.O_RDONLY | os.O_NOATIME | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY
_HASH_THREADS = max(1, (os.cpu_count() or 2) - 1)  # beside the main thread
_BIG_FILE = 64 << 10  # hashed in worker threads when there is no child process
FORK_MIN = 2000  # files to hash before a child process pays for its fork
# What hashing a file costs beside reading its bytes, as bytes read: ~12 µs of
# system calls and Python, in which blake3 reads ~50 KiB of cached data here.
_FILE_COST = 64 << 10
_PROBE_CAPACITY = 1 << 20  # smaller files are read and checked in one native call
_probes = threading.local()

# What hashing found of an inode, as the child sends it back: (mark, xattrs, hash, error).
_Found = tuple[bool, dict[bytes, bytes] | None, str | None, str | None]


def hash_all(
    inodes: list[Inode],
    roots: Roots,
    store: Store,
    report: HashifyReport,
    progress: Progress | None,
) -> None:
    """Hash inodes, shared with a forked child on another CPU where there is one."""
    errors: list[str] = []

    def hash_one(inode: Inode) -> None:
        error = _hash_or_error(inode, roots, store)
        if error is not None:
            errors.append(error)

    def report_progress() -> None:
        if progress is not None:
            report.files_hashed = sum(1 for i in inodes if i.content_hash)
            progress("hashing", report)

    mine, theirs = _split_by_cost(inodes) if len(inodes) >= FORK_MIN else (inodes, [])
    child = _ChildHasher.start(roots, store, theirs) if theirs else None
    if child is None:
        _hash_with_threads(inodes, hash_one, report_progress)
    else:
        # One thread per process: a thread hashing big files beside this
        # per-file loop cost it a GIL hand-off at nearly every system call.
        for count, inode in enumerate(mine):
            hash_one(inode)
            if count % 4096 == 4095:
                report_progress()
        if not child.collect(errors):
            for inode in theirs:  # the child failed: its share is hashed here
                hash_one(inode)
    report.errors += errors
    hashed = [i for i in inodes if i.content_hash is not None]
    report.files_hashed = len(hashed)
    report.bytes_hashed = sum(i.st.st_size for i in hashed)


def _file_probe() -> syscalls.FileProbe:
    """This thread's FileProbe."""
    probe: syscalls.FileProbe | None = getattr(_probes, "probe", None)
    if probe is None:
        probe = _probes.probe = syscalls.FileProbe(_PROBE_CAPACITY)
    return probe


def _hash_or_error(inode: Inode, roots: Roots, store: Store) -> str | None:
    """Hash an inode; what went wrong, for the report, if it could not be read."""
    try:
        _hash_inode(inode, roots, store)
    except OSError as e:
        return f"{roots.display(inode.refs[0])}: {e.strerror}"
    return None


def _hash_inode(inode: Inode, roots: Roots, store: Store) -> None:
    if inode.st.st_size < _PROBE_CAPACITY - 1 and _hash_small(inode, roots, store):
        return
    fd = roots.open_file(inode.refs[0], _READ)
    try:
        st = os.fstat(fd)
        if not inode.unchanged_since_scan(st):
            return  # changed since the scan: leave it alone
        # A real fd: f*xattr calls, no /proc path lookups.
        names = [os.fsencode(n) for n in os.listxattr(fd)]
        inode.marked = COW_MARK in names
        inode.xattrs = {n: os.getxattr(fd, n) for n in names if not is_reserved_xattr(n)}
        inode.content_hash = store.hash_fd(fd, st.st_size)
    finally:
        os.close(fd)


def _hash_small(inode: Inode, roots: Roots, store: Store) -> bool:
    """_hash_inode in one native call; False where it must be done the long way.

    The long way: extended attributes whose values are needed (the call
    lists only names), or a file that grew past the buffer.
    """
    ref = inode.refs[0]
    if len(ref.path) > PATH_CHUNK:
        return False  # a path openat2 cannot take at once
    probe = _file_probe()
    found = probe.probe(roots.fds[ref.guest], ref.path.lstrip(b"/"), _READ)
    if not inode.unchanged_since_scan(found):
        return True  # changed since the scan: leave it alone
    if found.content_len != found.st_size or found.names_len < 0:
        return False
    names = probe.names()
    if any(not is_reserved_xattr(n) for n in names):
        return False
    inode.marked = COW_MARK in names
    inode.xattrs = {}
    inode.content_hash = store.hash_bytes(probe.content[: found.content_len])
    return True


class _ChildHasher:
    """Hashes a share of the small files in a forked child process (cowfs.forked).

    The child hashes its share with the parent's own code and sends back only
    what hashing found. A child that fails in any way sends nothing usable, and
    the parent hashes its share.
    """

    def __init__(self, call: ForkedCall, inodes: list[Inode]):
        self.call = call
        self.inodes = inodes

    @classmethod
    def start(cls, roots: Roots, store: Store, inodes: list[Inode]) -> _ChildHasher | None:
        """Fork a child hashing inodes; None where this process has one CPU."""
        call = ForkedCall.start(_hash_share, roots, store, inodes)
        return cls(call, inodes) if call is not None else None

    def collect(self, errors: list[str]) -> bool:
        """Wait for the child and take over its results and errors; False if it failed."""
        ok, results = self.call.result()
        if not ok or not isinstance(results, list) or len(results) != len(self.inodes):
            return False
        for inode, (marked, xattrs, content_hash, error) in zip(self.inodes, results, strict=True):
            inode.marked, inode.xattrs, inode.content_hash = marked, xattrs, content_hash
            if error is not None:
                errors.append(error)
        return True


def _hash_share(roots: Roots, store: Store, inodes: list[Inode]) -> list[_Found]:
    """In the child: what hashing each inode found."""
    results = []
    for inode in inodes:
        error = _hash_or_error(inode, roots, store)
        results.append((inode.marked, inode.xattrs, inode.content_hash, error))
    return results


def _split_by_cost(inodes: list[Inode]) -> tuple[list[Inode], list[Inode]]:
    """Two shares of about equal hashing cost: a file costs its size plus _FILE_COST bytes."""
    shares: tuple[list[Inode], list[Inode]] = ([], [])
    loads = [0, 0]
    # Largest first, each to the lighter share: the last, smallest files even it out.
    for inode in sorted(inodes, key=lambda i: i.st.st_size, reverse=True):
        lighter = 0 if loads[0] <= loads[1] else 1
        shares[lighter].append(inode)
        loads[lighter] += inode.st.st_size + _FILE_COST
    return shares


def _hash_with_threads(
    inodes: list[Inode], hash_one: Callable[[Inode], None], report_progress: Callable[[], None]
) -> None:
    """Big files in worker threads, small ones in this thread (no second CPU or few files).

    Reading and hashing a big file releases the GIL for nearly all of its
    time, so its disk reads overlap this thread's per-file work.
    """
    big = iter([i for i in inodes if i.st.st_size >= _BIG_FILE])
    lock = threading.Lock()

    def hash_big() -> None:
        while True:
            with lock:
                inode = next(big, None)
            if inode is None:
                return
            hash_one(inode)

    threads = [threading.Thread(target=hash_big, daemon=True) for _ in range(_HASH_THREADS)]
    for thread in threads:
        thread.start()
    small = (i for i in inodes if i.st.st_size < _BIG_FILE)
    for count, inode in enumerate(small):
        hash_one(inode)
        if count % 4096 == 4095:
            report_progress()
    hash_big()  # then help with the big ones
    for thread in threads:
        while thread.is_alive():
            thread.join(0.2)
            report_progress()
