"""A hashify run: its arguments checked, its guests locked, its phases in order, its report.

``hashify`` wires the phases, each given what it works on: the guests' roots
(``Roots``: real paths and locked root fds), the store and the report.
"""

from __future__ import annotations

import contextlib
import gc
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from cowfs.errors import CowfsError, require_directory
from cowfs.host.barrier import refuse_reachable
from cowfs.host.treelock import refuse_mounted_nearby, tree_lock
from cowfs.unify.hashify.grouping import group, with_partners
from cowfs.unify.hashify.hashing import hash_all
from cowfs.unify.hashify.linking import link_groups, remove_leftovers
from cowfs.unify.hashify.report import HashifyOptions, HashifyReport, Progress
from cowfs.unify.hashify.scan import Roots, Scan, scan
from cowfs.unify.store import Store, StoreEntry


class HashifyRun(NamedTuple):
    """What hashify returns: its report, and what its scan found.

    found is some 300,000 objects for three Debian guests: freeing them is
    the caller's choice (the command line exits without freeing them one by one).
    """

    report: HashifyReport
    found: Scan


def check_hashify_args(
    guests: list[str], store_root: Path, allow_reachable: bool = False
) -> list[str]:
    """Validate guest directories and the store location; real paths of the guests.

    Guests and the store must be out of host users' reach (barrier.py) unless
    allow_reachable: a store entry is an inode of every guest that links it.
    No guest may be mounted, nor have a mounted tree inside or around it (the
    registry of live mounts, treelock.py).
    """
    if not guests:
        raise CowfsError("no guest directory given")
    real = []
    for guest in guests:
        require_directory("guest", guest)
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


def hashify(
    guests: list[str], options: HashifyOptions, progress: Progress | None = None
) -> HashifyRun:
    """Deduplicate the guests' files into the store (see cowfs.unify.hashify)."""
    paths = check_hashify_args(guests, options.store, options.allow_reachable)
    started = time.monotonic()
    report = HashifyReport(guests=len(guests), dry_run=options.dry_run)
    with_mtime = not options.ignore_mtime
    store = Store(options.store)  # opened below, once the guests are locked
    entries: list[StoreEntry] = []
    new_entries: list[StoreEntry] = []
    with _cyclic_gc_paused(), contextlib.ExitStack() as locks:
        # Each guest locked (treelock.py) for the run: no mount may open a
        # file for writing that this run then shares. A dry run shares nothing.
        fds = [
            locks.enter_context(tree_lock(path, exclusive=not options.dry_run, role="guest")).fd
            for path in paths
        ]
        roots = Roots(paths, fds)
        if not (options.dry_run and not options.store.exists()):
            # (a dry run with no store has nothing to read and creates none)
            store = Store.open(options.store, create=not options.dry_run)
        try:
            if not options.dry_run:
                store.give_entries_store_marks()
            entries = list(store.entries()) if options.store.exists() else []
            store_inodes = {(e.st.st_dev, e.st.st_ino) for e in entries}
            found = scan(roots, options.rules, options.min_size, store_inodes, report, progress)
            if not options.dry_run:
                remove_leftovers(found.leftovers, roots)
                store.sweep_temporaries()
            candidates = with_partners(found.inodes.values(), entries, with_mtime)
            report.candidates = sum(len(i.refs) for i in candidates.inodes)
            hash_all(candidates.inodes, roots, store, report, progress)
            groups = group(candidates, store, with_mtime)
            new_entries = link_groups(groups, roots, store, report, options.dry_run, progress)
        finally:
            store.close()
    if not options.dry_run and report.unified_files:
        # The state database's note that these guests' stored usage is no
        # longer exact (their next mount counts it again). Imported here: a
        # dry run, or one that linked nothing, never loads sqlite.
        from cowfs.host.statedb import usage_changed

        usage_changed(paths)
    # The store as this run found it plus what it added: no second walk of
    # it (36 ms for 5,229 entries), and the same figures unless another
    # run changed the store meanwhile.
    known = entries + new_entries
    report.store_entries = len(known)
    report.store_bytes = sum(e.st.st_blocks * 512 for e in known)
    report.seconds = round(time.monotonic() - started, 3)
    return HashifyRun(report, found)


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
