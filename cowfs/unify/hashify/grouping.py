"""Phase 2: which inodes may become one, by the strict key.

Two files share an inode only if content, size, mode, owner, extended
attributes and (unless ignored) mtime are all equal (``store.meta_key`` and
the content hash): a guest's view never changes. Grouping goes in two steps
around the hashing:

1. ``with_partners``: by the cheap part of the key (the scan's stat: size,
   mode, owner, mtime), the inodes that have a partner, another candidate
   or a store entry; only these are hashed;
2. ``group``: once hashed, by the whole key; each group with its store entry,
   if the store has one.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from cowfs.unify.hashify.scan import Inode
from cowfs.unify.store import MetaKey, Store, StoreEntry, meta_key

CheapKey = tuple[int, int, int, int, int | None]  # size, mode, uid, gid, mtime (or None)
# Inodes to become one, and the store's entry they are to be linked to (None: a new one).
Group = tuple[StoreEntry | None, list[Inode]]


@dataclass
class Candidates:
    """Inodes with a partner by the cheap key (to hash), and the store entries that may match."""

    inodes: list[Inode]
    store_entries: list[StoreEntry]


def cheap_key(st: os.stat_result, with_mtime: bool) -> CheapKey:
    """The part of the key the scan's stat gives."""
    return (st.st_size, st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns if with_mtime else None)


def with_partners(
    inodes: Iterable[Inode], entries: Iterable[StoreEntry], with_mtime: bool
) -> Candidates:
    """The inodes whose cheap key another inode or a store entry shares."""
    by_cheap: dict[CheapKey, list[Inode]] = defaultdict(list)
    for inode in inodes:
        by_cheap[cheap_key(inode.st, with_mtime)].append(inode)
    store_by_cheap: dict[CheapKey, list[StoreEntry]] = defaultdict(list)
    for entry in entries:
        store_by_cheap[cheap_key(entry.st, with_mtime)].append(entry)
    wanted = [
        cheap for cheap, members in by_cheap.items() if len(members) > 1 or cheap in store_by_cheap
    ]
    return Candidates(
        inodes=[inode for cheap in wanted for inode in by_cheap[cheap]],
        store_entries=[entry for cheap in wanted for entry in store_by_cheap.get(cheap, ())],
    )


def group(candidates: Candidates, store: Store, with_mtime: bool) -> list[Group]:
    """Sets of hashed inodes equal by the whole key, with their store entry where there is one.

    A set of one is kept only if the store has its entry.
    """
    store_index: dict[tuple[MetaKey, str], StoreEntry] = {}
    for entry in candidates.store_entries:
        xattrs = store.xattrs_of(entry)
        if xattrs is not None:
            key = meta_key(entry.st, xattrs, with_mtime)
            store_index.setdefault((key, entry.content_hash), entry)
    groups: dict[tuple[MetaKey, str], list[Inode]] = defaultdict(list)
    for inode in candidates.inodes:
        if inode.content_hash is None or inode.xattrs is None or not eligible(inode):
            continue
        key = meta_key(inode.st, inode.xattrs, with_mtime)
        groups[(key, inode.content_hash)].append(inode)
    result: list[Group] = []
    for group_key, members in groups.items():
        match = store_index.get(group_key)
        if match is not None or len(members) > 1:
            result.append((match, members))
    return result


def eligible(inode: Inode) -> bool:
    """Unify an inode only if no name of it lies outside what hashify replaces.

    A private inode with a name hashify does not see (an excluded path, a
    guest not given) would be split from that name; a marked inode is
    shared already, each name independent.
    """
    return len(inode.refs) == inode.st.st_nlink or inode.marked
