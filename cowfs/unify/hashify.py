"""``cowfs hashify``: deduplicate existing guest trees into the content store.

Linux-VServer's vhashify. Three phases:

1. scan every guest (fd-relative, never following symlinks) for regular files
   that the include/exclude rules allow, and the store for what it holds;
2. group files whose inodes could be shared: equal size, mode, owner, mtime
   (unless ignored) and extended attributes, then equal content (the store's hash,
   hashed only where a group has a partner, split by cost between this process
   and a forked child on another CPU);
3. for each group, take the store's entry (or make one of the group's inodes
   the entry: mark it, link it into the store) and replace every other name by
   a link to it: re-checked right before (inode, size, mtime, ctime unchanged
   since hashing), linked under a temporary name, renamed over. The replaced
   inode is held open across the rename and let go in another thread, where
   the filesystem's freeing of it (most of a rename's cost) overlaps the next
   renames.

Every step is atomic, so a kill at any moment leaves each guest name on a
complete file with its old content and metadata; temporaries a killed run
left behind are removed by the next run. Names already linked to the store
cost one stat on a re-run.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import os
import queue
import stat
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from cowfs.errors import CowfsError
from cowfs.forked import ForkedCall
from cowfs.host.barrier import refuse_reachable
from cowfs.host.treelock import refuse_mounted_nearby, tree_lock
from cowfs.tree.marks import COW_MARK, is_reserved_name, is_reserved_xattr, temp_name
from cowfs.tree.metadata import read_xattrs
from cowfs.tree.walk import PATH_CHUNK, open_below, walk
from cowfs.unify.excludes import Rules
from cowfs.unify.store import MetaKey, Store, StoreEntry, meta_key
from native import syscalls

Key = tuple[int, int]  # (st_dev, st_ino)
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
# How guest files are opened for reading: a name the scan saw as a file may be
# a FIFO or a device by now; such a file is never waited on or made a terminal.
_READ = os.O_RDONLY | os.O_NOATIME | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY
_HASH_THREADS = max(1, (os.cpu_count() or 2) - 1)  # beside the main thread
_BIG_FILE = 64 << 10  # hashed in worker threads when there is no child process
_FORK_MIN = 2000  # files to hash before a child process pays for its fork
# What hashing a file costs beside reading its bytes, as bytes read: ~12 µs of
# system calls and Python, in which blake3 reads ~50 KiB of cached data here.
_FILE_COST = 64 << 10
_PROBE_CAPACITY = 1 << 20  # smaller files are read and checked in one native call
_probes = threading.local()


def _file_probe() -> syscalls.FileProbe:
    """This thread's FileProbe."""
    probe: syscalls.FileProbe | None = getattr(_probes, "probe", None)
    if probe is None:
        probe = _probes.probe = syscalls.FileProbe(_PROBE_CAPACITY)
    return probe


@dataclass(slots=True)
class FileRef:
    """One name of a candidate file: which guest, which directory, which name."""

    guest: int
    directory: bytes  # guest-absolute, b"" for the root
    name: bytes

    @property
    def path(self) -> bytes:
        """Guest-absolute path."""
        return self.directory + b"/" + self.name


@dataclass(slots=True)
class Inode:
    """A candidate inode, with every name of it the scan found."""

    st: os.stat_result
    refs: list[FileRef] = field(default_factory=list)
    marked: bool = False
    xattrs: dict[bytes, bytes] | None = None
    content_hash: str | None = None


class InodeReleaser:
    """Closes fds in threads: the last close of a replaced inode is where it is freed.

    Freeing a file (its blocks, its inode, in the journal) is most of a rename
    that drops a last link; holding the inode open across the rename and
    closing it here lets that work overlap the next renames. The fds go over
    in batches: handing each over alone woke a thread per rename, which cost
    the renaming thread as much as it saved. Three Debian guests, 10,465 names,
    2 vCPUs, a scratch ext4: linking took 0.42-0.43 s closing inline, 0.45 s
    handing each fd to two threads, 0.30 s handing batches of 32.
    """

    def __init__(self, threads: int = 2, batch: int = 32, backlog: int = 128):
        # Bounded: never more than backlog fds queued (plus a batch being
        # filled and one being closed per thread), whatever the fd limit.
        self._batches: queue.Queue[list[int] | None] = queue.Queue(maxsize=backlog // batch)
        self._batch = batch
        self._pending: list[int] = []
        self._threads = [
            threading.Thread(target=self._close_all, name=f"hashify-release-{i}")
            for i in range(threads)
        ]
        for thread in self._threads:
            thread.start()

    def _close_all(self) -> None:
        while (fds := self._batches.get()) is not None:
            for fd in fds:
                os.close(fd)

    def release(self, fd: int) -> None:
        """Close fd soon, in a releasing thread."""
        self._pending.append(fd)
        if len(self._pending) >= self._batch:
            self._batches.put(self._pending)
            self._pending = []

    def finish(self) -> None:
        """Wait until every fd given is closed."""
        if self._pending:
            self._batches.put(self._pending)
            self._pending = []
        for _ in self._threads:
            self._batches.put(None)
        for thread in self._threads:
            thread.join()


@dataclass
class HashifyOptions:
    """What hashify unifies and how."""

    store: Path
    dry_run: bool = False
    ignore_mtime: bool = False
    min_size: int = 16
    rules: Rules = field(default_factory=lambda: Rules.build([], []))
    allow_reachable: bool = False  # guests or a store host users can reach (barrier.py): dangerous


@dataclass
class HashifyReport:
    """What a run found and did (or, dry, would do)."""

    guests: int = 0
    files_scanned: int = 0
    bytes_scanned: int = 0
    already_unified: int = 0
    candidates: int = 0
    files_hashed: int = 0
    bytes_hashed: int = 0
    unified_files: int = 0
    new_store_entries: int = 0
    bytes_saved: int = 0
    skipped_changed: int = 0
    errors: list[str] = field(default_factory=list)
    store_entries: int = 0
    store_bytes: int = 0
    seconds: float = 0.0
    dry_run: bool = False
    actions: list[tuple[str, str]] = field(default_factory=list)  # (guest path, store entry)

    def as_dict(self) -> dict[str, object]:
        """The figures, for --json."""
        data = dict(self.__dict__)
        data["actions"] = [{"path": p, "entry": e} for p, e in self.actions]
        return data


Progress = Callable[[str, HashifyReport], None]


def check_hashify_args(
    guests: list[str], store_root: Path, allow_reachable: bool = False
) -> list[str]:
    """Validate guest directories and the store location; real paths of the guests.

    Guests and the store must be out of host users' reach (barrier.py) unless
    allow_reachable: a store entry is an inode of every guest that links it.
    """
    if not guests:
        raise CowfsError("no guest directory given")
    real = []
    for guest in guests:
        if not os.path.lexists(guest):
            raise CowfsError(f"guest {guest}: no such directory")
        if not os.path.isdir(guest):
            raise CowfsError(f"guest {guest}: not a directory")
        path = os.path.realpath(guest)
        if path in real:
            raise CowfsError(f"guest {guest}: given twice")
        refuse_reachable("guest", guest, allow_reachable)
        refuse_mounted_nearby(guest, "guest")
        real.append(path)
    refuse_reachable("store", store_root, allow_reachable)
    store_parent = store_root if store_root.exists() else store_root.parent
    if not store_parent.exists():
        raise CowfsError(f"store {store_root}: parent directory does not exist")
    store_dev = os.stat(store_parent).st_dev
    for guest, path in zip(guests, real, strict=True):
        if os.stat(path).st_dev != store_dev:
            raise CowfsError(
                f"guest {guest}: on another filesystem than the store {store_root}"
                " (hard links cannot cross filesystems)"
            )
        store_real = os.path.realpath(store_root)
        if store_real == path or store_real.startswith(path.rstrip("/") + "/"):
            raise CowfsError(f"store {store_root}: lies inside guest {guest}")
    return real


class _Scan:
    """Phase 1: every candidate inode of the guests, by (dev, ino)."""

    def __init__(self, roots: list[str], options: HashifyOptions, report: HashifyReport):
        self.roots = roots
        self.options = options
        self.report = report
        self.inodes: dict[Key, Inode] = {}
        self.leftovers: list[tuple[int, bytes, bytes]] = []

    def run(self, store_inodes: set[Key], progress: Progress | None) -> None:
        for index, root in enumerate(self.roots):
            root_fd = os.open(root, _DIR | os.O_CLOEXEC)
            try:
                self._walk(index, root_fd, store_inodes, progress)
            finally:
                os.close(root_fd)

    def _walk(
        self, guest: int, root_fd: int, store_inodes: set[Key], progress: Progress | None
    ) -> None:
        rules = self.options.rules
        min_size = self.options.min_size
        report = self.report

        def descend(path: bytes, name: bytes) -> bool:
            return not is_reserved_name(name) and rules.may_descend(path)

        def unreadable(path: bytes, error: OSError) -> None:
            report.errors.append(f"{self.roots[guest]}{os.fsdecode(path)}: {error.strerror}")

        for listing in walk(root_fd, descend, on_error=unreadable):
            directory = listing.path
            for entry in listing.entries:
                name = os.fsencode(entry.name)
                path = directory + b"/" + name
                if is_reserved_name(name):
                    self.leftovers.append((guest, directory, name))
                elif entry.is_file(follow_symlinks=False) and rules.included(path):
                    st = entry.stat(follow_symlinks=False)
                    report.files_scanned += 1
                    report.bytes_scanned += st.st_size
                    if st.st_size < min_size:
                        continue
                    key = (st.st_dev, st.st_ino)
                    if key in store_inodes:
                        report.already_unified += 1
                        continue
                    inode = self.inodes.get(key)
                    if inode is None:
                        inode = self.inodes[key] = Inode(st)
                    inode.refs.append(FileRef(guest, directory, name))
            if progress is not None:
                progress("scanning", report)


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
    def start(cls, hashify: Hashify, inodes: list[Inode]) -> _ChildHasher | None:
        """Fork a child hashing inodes; None where this process has one CPU."""
        call = ForkedCall.start(_hash_share, hashify, inodes)
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


def _hash_share(
    hashify: Hashify, inodes: list[Inode]
) -> list[tuple[bool, dict[bytes, bytes] | None, str | None, str | None]]:
    """In the child: what hashing each inode found (mark, xattrs, hash, error)."""
    results = []
    for inode in inodes:
        error = hashify._hash_or_error(inode)
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


@contextlib.contextmanager
def _cyclic_gc_paused() -> Iterator[None]:
    """No cyclic garbage collection while the scan's objects pile up.

    hashify makes a few long-lived objects per file and no reference cycles;
    collections that walk them all again and again cost 5-7% of a dry run on
    three Debian guests, and in the hashing child they would write to every
    object's header, copying pages the fork shares.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        # Every object made meanwhile counts as new: the first allocation after
        # enable() would walk them all (15 ms on three Debian guests). Moved to
        # the oldest generation with the count reset instead (freeze resets it,
        # unfreeze gives them back to the collector), they wait for the next
        # full collection like any long-lived object.
        gc.freeze()
        gc.unfreeze()
        if was_enabled:
            gc.enable()


def _as_scanned(inode: Inode, ino: int, size: int, mtime_ns: int, ctime_ns: int) -> bool:
    """True if a file found for hashing is the inode the scan saw, unchanged since."""
    was = inode.st
    return (ino, size, mtime_ns, ctime_ns) == (
        was.st_ino,
        was.st_size,
        was.st_mtime_ns,
        was.st_ctime_ns,
    )


def _cheap_key(st: os.stat_result, with_mtime: bool) -> tuple[int, int, int, int, int | None]:
    return (st.st_size, st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns if with_mtime else None)


class Hashify:
    """One run of hashify over some guests and a store."""

    def __init__(self, guests: list[str], options: HashifyOptions):
        self.roots = check_hashify_args(guests, options.store, options.allow_reachable)
        self.options = options
        self.report = HashifyReport(guests=len(guests), dry_run=options.dry_run)
        self.store = Store(options.store)  # opened by run(), once the guests are locked
        self._root_fds: dict[int, int] = {}
        self._new_entries: list[StoreEntry] = []
        # What the scan found, kept after run(): freeing it is the owner's
        # choice (the command line exits without freeing it object by object).
        self.found: dict[Key, Inode] = {}

    def run(self, progress: Progress | None = None) -> HashifyReport:
        """All three phases; the report."""
        started = time.monotonic()
        report = self.report
        entries: list[StoreEntry] = []
        with _cyclic_gc_paused(), contextlib.ExitStack() as locks:
            # Each guest locked (treelock.py) for the run: no mount may open a
            # file for writing that this run then shares. A dry run shares nothing.
            for i, root in enumerate(self.roots):
                lock = tree_lock(root, exclusive=not self.options.dry_run, role="guest")
                self._root_fds[i] = locks.enter_context(lock).fd
            if not (self.options.dry_run and not self.options.store.exists()):
                # (a dry run with no store has nothing to read and creates none)
                self.store = Store.open(self.options.store, create=not self.options.dry_run)
            try:
                if not self.options.dry_run:
                    self.store.give_entries_store_marks()
                entries = list(self.store.entries()) if self.options.store.exists() else []
                store_inodes = {(e.st.st_dev, e.st.st_ino): e for e in entries}
                scan = _Scan(self.roots, self.options, report)
                scan.run(set(store_inodes), progress)
                self.found = scan.inodes
                if not self.options.dry_run:
                    self._remove_leftovers(scan.leftovers)
                    self.store.sweep_temporaries()
                groups = self._group(scan.inodes, entries, progress)
                self._unify(groups, progress)
            finally:
                self.store.close()
        if not self.options.dry_run and report.unified_files:
            from cowfs.host.statedb import (
                usage_changed,  # a dry run or one linking nothing needs none
            )

            usage_changed(self.roots)
        # The store as this run found it plus what it added: no second walk of
        # it (36 ms for 5,229 entries), and the same figures unless another
        # run changed the store meanwhile.
        known = entries + self._new_entries
        report.store_entries = len(known)
        report.store_bytes = sum(e.st.st_blocks * 512 for e in known)
        report.seconds = round(time.monotonic() - started, 3)
        return report

    # -- phase 2 ----------------------------------------------------------

    def _open_ref(self, ref: FileRef, flags: int) -> int:
        return open_below(self._root_fds[ref.guest], ref.path, flags | os.O_NOFOLLOW)

    def _eligible(self, inode: Inode) -> bool:
        """Unify an inode only if no name of it lies outside what hashify replaces.

        A private inode with a name hashify does not see (an excluded path, a
        guest not given) would be split from that name; a marked inode is
        shared already, each name independent.
        """
        return len(inode.refs) == inode.st.st_nlink or inode.marked

    def _hash_inode(self, inode: Inode) -> None:
        if inode.st.st_size < _PROBE_CAPACITY - 1 and self._hash_small(inode):
            return
        fd = self._open_ref(inode.refs[0], _READ)
        try:
            st = os.fstat(fd)
            if not _as_scanned(inode, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns):
                return  # changed since the scan: leave it alone
            # A real fd: f*xattr calls, no /proc path lookups.
            names = [os.fsencode(n) for n in os.listxattr(fd)]
            inode.marked = COW_MARK in names
            inode.xattrs = {n: os.getxattr(fd, n) for n in names if not is_reserved_xattr(n)}
            inode.content_hash = self.store.hash_fd(fd, st.st_size)
        finally:
            os.close(fd)

    def _hash_small(self, inode: Inode) -> bool:
        """_hash_inode in one native call; False where it must be done the long way.

        The long way: extended attributes whose values are needed (the call
        lists only names), or a file that grew past the buffer.
        """
        ref = inode.refs[0]
        if len(ref.path) > PATH_CHUNK:
            return False  # a path openat2 cannot take at once
        probe = _file_probe()
        found = probe.probe(self._root_fds[ref.guest], ref.path.lstrip(b"/"), _READ)
        if not _as_scanned(inode, found.ino, found.size, found.mtime_ns, found.ctime_ns):
            return True  # changed since the scan: leave it alone
        if found.content_len != found.size or found.names_len < 0:
            return False
        names = probe.names()
        if any(not is_reserved_xattr(n) for n in names):
            return False
        inode.marked = COW_MARK in names
        inode.xattrs = {}
        inode.content_hash = self.store.hash_bytes(probe.content[: found.content_len])
        return True

    def _hash_or_error(self, inode: Inode) -> str | None:
        """Hash an inode; what went wrong, for the report, if it could not be read."""
        try:
            self._hash_inode(inode)
        except OSError as e:
            return f"{self._display(inode.refs[0])}: {e.strerror}"
        return None

    def _group(
        self, inodes: dict[Key, Inode], entries: list[StoreEntry], progress: Progress | None
    ) -> list[tuple[StoreEntry | None, list[Inode]]]:
        """Phase 2: sets of inodes with equal content and metadata, with their store entry."""
        with_mtime = not self.options.ignore_mtime
        by_cheap: dict[tuple[int, int, int, int, int | None], list[Inode]] = defaultdict(list)
        for inode in inodes.values():
            by_cheap[_cheap_key(inode.st, with_mtime)].append(inode)
        store_by_cheap: dict[tuple[int, int, int, int, int | None], list[StoreEntry]] = defaultdict(
            list
        )
        for entry in entries:
            store_by_cheap[_cheap_key(entry.st, with_mtime)].append(entry)
        wanted = [
            cheap
            for cheap, members in by_cheap.items()
            if len(members) > 1 or cheap in store_by_cheap
        ]
        to_hash = [inode for cheap in wanted for inode in by_cheap[cheap]]
        self.report.candidates = sum(len(i.refs) for i in to_hash)
        self._hash_all(to_hash, progress)
        store_index: dict[tuple[MetaKey, str], StoreEntry] = {}
        for cheap in wanted:
            for entry in store_by_cheap.get(cheap, ()):
                xattrs = self._store_xattrs(entry)
                if xattrs is not None:
                    key = meta_key(entry.st, xattrs, with_mtime)
                    store_index.setdefault((key, entry.content_hash), entry)
        groups: dict[tuple[MetaKey, str], list[Inode]] = defaultdict(list)
        for inode in to_hash:
            if inode.content_hash is None or inode.xattrs is None or not self._eligible(inode):
                continue
            key = meta_key(inode.st, inode.xattrs, with_mtime)
            groups[(key, inode.content_hash)].append(inode)
        result: list[tuple[StoreEntry | None, list[Inode]]] = []
        for group_key, members in groups.items():
            match = store_index.get(group_key)
            if match is not None or len(members) > 1:
                result.append((match, members))
        return result

    def _hash_all(self, inodes: list[Inode], progress: Progress | None) -> None:
        """Hash inodes, shared with a forked child on another CPU where there is one."""
        errors: list[str] = []

        def hash_one(inode: Inode) -> None:
            error = self._hash_or_error(inode)
            if error is not None:
                errors.append(error)

        def report_progress() -> None:
            if progress is not None:
                self.report.files_hashed = sum(1 for i in inodes if i.content_hash)
                progress("hashing", self.report)

        mine, theirs = _split_by_cost(inodes) if len(inodes) >= _FORK_MIN else (inodes, [])
        child = _ChildHasher.start(self, theirs) if theirs else None
        if child is None:
            self._hash_with_threads(inodes, hash_one, report_progress)
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
        self.report.errors += errors
        hashed = [i for i in inodes if i.content_hash is not None]
        self.report.files_hashed = len(hashed)
        self.report.bytes_hashed = sum(i.st.st_size for i in hashed)

    @staticmethod
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

    def _store_xattrs(self, entry: StoreEntry) -> dict[bytes, bytes] | None:
        try:
            fd = os.open(self.store.path_of(entry.name), os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            return read_xattrs(fd)
        finally:
            os.close(fd)

    # -- phase 3 ----------------------------------------------------------

    def _unify(
        self, groups: list[tuple[StoreEntry | None, list[Inode]]], progress: Progress | None
    ) -> None:
        """Phase 3: a store entry for every group, then every other name linked to it."""
        report = self.report
        work: list[tuple[FileRef, Inode, StoreEntry | None, str]] = []
        for entry, members in groups:
            if entry is None:
                # The inode with most names becomes the store's: fewest renames.
                members.sort(key=lambda i: len(i.refs), reverse=True)
                canonical, rest = members[0], members[1:]
                assert canonical.content_hash is not None
                if self.options.dry_run:
                    entry_name = f"(new) {canonical.content_hash[:16]}"
                else:
                    try:
                        entry = self._add_to_store(canonical)
                        self._new_entries.append(entry)
                    except OSError as e:
                        report.errors.append(
                            f"{os.fsdecode(canonical.refs[0].path)}: into the store: {e.strerror}"
                        )
                        continue
                    entry_name = entry.name
                report.new_store_entries += 1
                report.unified_files += len(canonical.refs)
                report.actions += [(self._display(r), entry_name) for r in canonical.refs]
            else:
                rest = members
                entry_name = entry.name
            for inode in rest:
                work += [(ref, inode, entry, entry_name) for ref in inode.refs]
        # Directory by directory: one directory fd for all the names in it.
        work.sort(key=lambda item: (item[0].guest, item[0].directory))
        replaced: dict[int, int] = defaultdict(int)  # id(inode) -> names replaced
        if self.options.dry_run:
            for ref, inode, _entry, entry_name in work:
                report.actions.append((self._display(ref), entry_name))
                replaced[id(inode)] += 1
        else:
            # One thread: link and rename in one filesystem serialize in the
            # kernel, and more threads measured slower.
            self._link_chunk(work, replaced, {}, progress)
        inodes = {id(inode): inode for _, inode, _, _ in work}
        for key, names in replaced.items():
            report.unified_files += names
            if names == inodes[key].st.st_nlink:
                report.bytes_saved += inodes[key].st.st_blocks * 512

    def _link_chunk(
        self,
        work: list[tuple[FileRef, Inode, StoreEntry | None, str]],
        replaced: dict[int, int],
        first_touch: dict[int, int],
        progress: Progress | None,
    ) -> None:
        """Link the names in work (sorted by directory) to their store entries."""
        report = self.report
        current: tuple[int, bytes] | None = None
        dir_fd = -1
        releaser = InodeReleaser()
        try:
            for count, (ref, inode, entry, entry_name) in enumerate(work):
                assert entry is not None
                if progress is not None and count % 256 == 0:
                    progress("linking", report)
                if (ref.guest, ref.directory) != current:
                    if dir_fd >= 0:
                        os.close(dir_fd)
                        dir_fd = -1
                    current = (ref.guest, ref.directory)
                    try:
                        dir_fd = self._open_dir(ref.guest, ref.directory)
                    except OSError as e:
                        report.errors.append(f"{self._display(ref)}: {e.strerror}")
                        continue
                if dir_fd < 0:
                    continue
                try:
                    old = self._open_unchanged(dir_fd, ref, inode, first_touch.get(id(inode)))
                    if old is None:
                        report.skipped_changed += 1
                        continue
                    try:
                        first_touch.setdefault(id(inode), time.time_ns())
                        self._link_over(dir_fd, ref.name, entry)
                    finally:
                        releaser.release(old)
                    replaced[id(inode)] += 1
                    report.actions.append((self._display(ref), entry_name))
                except OSError as e:
                    report.errors.append(f"{self._display(ref)}: {e.strerror}")
        finally:
            releaser.finish()
            if dir_fd >= 0:
                os.close(dir_fd)

    def _open_dir(self, guest: int, directory: bytes) -> int:
        if not directory:
            return os.dup(self._root_fds[guest])
        return open_below(self._root_fds[guest], directory, _DIR)

    @staticmethod
    def _open_unchanged(
        dir_fd: int, ref: FileRef, inode: Inode, touched_at: int | None
    ) -> int | None:
        """An O_PATH fd on ref's inode if its name still reaches it as it was hashed, else None."""
        fd = os.open(ref.name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        try:
            unchanged = Hashify._unchanged(os.fstat(fd), inode, touched_at)
        except BaseException:
            os.close(fd)
            raise
        if not unchanged:
            os.close(fd)
            return None
        return fd

    @staticmethod
    def _unchanged(now: os.stat_result, inode: Inode, touched_at: int | None) -> bool:
        """True if now describes the inode as it was hashed.

        Our own renames change the ctime of an inode with several names: once
        we touched it, a later ctime is ours (mode, owner, size, mtime must
        still be as hashed).
        """
        was = inode.st
        if (now.st_ino, now.st_size, now.st_mtime_ns, now.st_mode, now.st_uid, now.st_gid) != (
            was.st_ino,
            was.st_size,
            was.st_mtime_ns,
            was.st_mode,
            was.st_uid,
            was.st_gid,
        ):
            return False
        if touched_at is None:
            return now.st_ctime_ns == was.st_ctime_ns
        return now.st_ctime_ns == was.st_ctime_ns or now.st_ctime_ns >= touched_at - 10_000_000

    def _add_to_store(self, inode: Inode) -> StoreEntry:
        assert inode.content_hash is not None and inode.xattrs is not None
        fd = self._open_ref(inode.refs[0], os.O_PATH)
        try:
            st = os.fstat(fd)
            if (st.st_ino, st.st_mtime_ns, st.st_size) != (
                inode.st.st_ino,
                inode.st.st_mtime_ns,
                inode.st.st_size,
            ):
                raise OSError(errno.ESTALE, "changed since it was hashed")
            return self.store.add(fd, inode.content_hash, inode.xattrs)
        finally:
            os.close(fd)

    def _link_over(self, dir_fd: int, name: bytes, entry: StoreEntry) -> None:
        tmp = temp_name()
        os.link(
            entry.name,
            tmp,
            src_dir_fd=self.store.subdir_fd(entry.name[:2]),
            dst_dir_fd=dir_fd,
            follow_symlinks=False,
        )
        try:
            syscalls.renameat2(dir_fd, tmp, dir_fd, name)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dir_fd)
            raise

    def _remove_leftovers(self, leftovers: Iterable[tuple[int, bytes, bytes]]) -> None:
        for guest, directory, name in leftovers:
            try:
                dir_fd = self._open_dir(guest, directory)
            except OSError:
                continue
            try:
                st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                if not stat.S_ISDIR(st.st_mode):
                    os.unlink(name, dir_fd=dir_fd)
            except OSError:
                pass
            finally:
                os.close(dir_fd)

    def _display(self, ref: FileRef) -> str:
        return self.roots[ref.guest] + os.fsdecode(ref.path)


def hashify(
    guests: list[str], options: HashifyOptions, progress: Progress | None = None
) -> HashifyReport:
    """Deduplicate the guests' files into the store (see the module docstring)."""
    return Hashify(guests, options).run(progress)
