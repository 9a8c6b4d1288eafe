"""What a guest's backing tree costs: private and shared blocks and inodes (vdu).

A guest is charged for the inodes it alone holds: every directory, symlink,
device node, and every regular file except the shared ones. A file is shared
when it carries the COW mark and more than one link: the template, other
guests or the store hold it too. Shared files are reported, not charged.
Bytes are allocated bytes (``st_blocks * 512``), as ``du`` counts them, and an
inode with several names in the guest counts once.
"""

from __future__ import annotations

import os
import stat
from collections import defaultdict
from dataclasses import dataclass, field

from cowfs.forked import ForkedCall
from cowfs.marks import COW_MARK, is_reserved_name
from native.syscalls import has_xattr_at

OwnerKey = tuple[str, int]  # ("user", uid) or ("group", gid)


@dataclass
class Usage:
    """A guest's usage, in total and per owner (private files only)."""

    bytes: int = 0
    inodes: int = 0
    shared_bytes: int = 0
    shared_inodes: int = 0
    owners: dict[OwnerKey, list[int]] = field(default_factory=lambda: defaultdict(lambda: [0, 0]))

    @property
    def apparent_bytes(self) -> int:
        """What the guest would take without sharing (``du`` of its backing tree)."""
        return self.bytes + self.shared_bytes

    def charge(self, uid: int, gid: int, nbytes: int, inodes: int) -> None:
        """Add (or, negative, remove) private usage owned by uid:gid."""
        self.bytes += nbytes
        self.inodes += inodes
        for key in (("user", uid), ("group", gid)):
            entry = self.owners[key]
            entry[0] += nbytes
            entry[1] += inodes
            if not entry[0] and not entry[1]:
                # Owners come and go with chown: only those holding something are kept.
                del self.owners[key]

    def owner_table(self) -> dict[OwnerKey, tuple[int, int]]:
        """{(kind, id): (bytes, inodes)} without empty entries."""
        return {k: (v[0], v[1]) for k, v in self.owners.items() if v[0] or v[1]}


def is_shared(st: os.stat_result, marked: bool) -> bool:
    """The accounting rule: a marked regular file with another link is not the guest's."""
    return marked and st.st_nlink > 1 and stat.S_ISREG(st.st_mode)


def scan(root: str, shared: dict[tuple[int, int], int] | None = None) -> Usage:
    """The usage of the backing tree at root, counted from scratch (fd-relative, no symlinks).

    If shared is given, every shared inode's (dev, ino) is added to it with its bytes.
    """
    usage = Usage()
    known_shared = shared if shared is not None else {}
    seen: set[tuple[int, int]] = set()
    # Private usage by (uid, gid), handed to usage.charge at the end: one dict
    # update per file instead of a call updating two owners.
    private: dict[tuple[int, int], list[int]] = defaultdict(lambda: [0, 0])
    is_dir, is_reg = stat.S_ISDIR, stat.S_ISREG
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    root_fd = os.open(root, flags)
    st = os.fstat(root_fd)
    usage.charge(st.st_uid, st.st_gid, st.st_blocks * 512, 1)
    pending = [root_fd]
    while pending:
        dir_fd = pending.pop()
        try:
            with os.scandir(dir_fd) as listing:
                entries = list(listing)
            for entry in entries:
                name = os.fsencode(entry.name)
                if is_reserved_name(name):
                    continue
                st = entry.stat(follow_symlinks=False)
                nbytes = st.st_blocks * 512
                mode = st.st_mode
                if is_dir(mode):
                    pending.append(os.open(name, flags, dir_fd=dir_fd))
                elif st.st_nlink > 1:  # counted once, and maybe shared
                    key = (st.st_dev, st.st_ino)
                    if key in seen:
                        continue
                    seen.add(key)
                    if is_reg(mode) and (
                        key in known_shared or has_xattr_at(dir_fd, name, COW_MARK)
                    ):
                        usage.shared_bytes += nbytes
                        usage.shared_inodes += 1
                        known_shared[key] = nbytes
                        continue
                owner = private[(st.st_uid, st.st_gid)]
                owner[0] += nbytes
                owner[1] += 1
        finally:
            os.close(dir_fd)
    for (uid, gid), (nbytes, inodes) in private.items():
        usage.charge(uid, gid, nbytes, inodes)
    return usage


Shared = dict[tuple[int, int], int]  # (st_dev, st_ino) -> bytes of a shared inode
_Portable = tuple[int, int, int, int, dict[OwnerKey, tuple[int, int]]]


def scan_many(roots: list[str]) -> tuple[list[Usage], Shared]:
    """scan() of each root, and every shared inode of them all with its bytes.

    A tree's scan keeps one CPU busy (system calls and this loop). With more
    than one root and CPU, the roots are dealt out to this process and forked
    children (cowfs.forked), one per CPU; a child that fails has its roots
    scanned here. Within a share, later scans skip the mark lookups of the
    shared inodes the earlier ones found.
    """
    count = min(len(roots), len(os.sched_getaffinity(0)))
    shares = [list(range(first, len(roots), count)) for first in range(count)]
    children = [(share, ForkedCall.start(_scan_share, roots, share)) for share in shares[1:]]
    results: dict[int, Usage] = {}
    shared: Shared = {}
    for index in shares[0]:
        results[index] = scan(roots[index], shared)
    for share, call in children:
        ok, data = call.result() if call is not None else (False, None)
        if ok and data is not None:
            portable, theirs = data
            for index, usage_data in zip(share, portable, strict=True):
                results[index] = _from_portable(usage_data)
            shared.update(theirs)
        else:
            for index in share:
                results[index] = scan(roots[index], shared)
    return [results[index] for index in range(len(roots))], shared


def _scan_share(roots: list[str], share: list[int]) -> tuple[list[_Portable], Shared]:
    """In a child: the usage of roots[i] for i in share, as plain data, and their shared inodes."""
    shared: Shared = {}
    portable = []
    for index in share:
        usage = scan(roots[index], shared)
        totals = (usage.bytes, usage.inodes, usage.shared_bytes, usage.shared_inodes)
        portable.append((*totals, usage.owner_table()))
    return portable, shared


def _from_portable(data: _Portable) -> Usage:
    nbytes, inodes, shared_bytes, shared_inodes, owners = data
    usage = Usage(nbytes, inodes, shared_bytes, shared_inodes)
    for key, (owner_bytes, owner_inodes) in owners.items():
        usage.owners[key] = [owner_bytes, owner_inodes]
    return usage
