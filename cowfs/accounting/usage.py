"""What a guest's backing tree costs: private and shared blocks and inodes (vdu).

A guest is charged for the inodes it alone holds: every directory, symlink,
device node, and every regular file except the shared ones. A file is shared
when it carries the COW mark and someone besides this guest and the content
store links it: the template or another guest. The store's link is nobody's
(the mark's value says whether it has one), and the guest's own links are
counted by the scan, so a file that only this guest links, however many
times, is charged to it, whether hashify put it in the store or the other
guests that shared it have dropped their links. Shared files are reported,
not charged. Bytes are allocated bytes (``st_blocks * 512``), as ``du``
counts them, and an inode with several names in the guest counts once.

The marked inodes a scan charges are listed (``Usage.own_marked``): a mount
takes a marked inode's charge off when the guest drops it only if it is
listed, so an inode whose other holders left after the scan (and that was
never charged) gives no credit.
"""

from __future__ import annotations

import errno
import os
import stat
from collections import defaultdict
from dataclasses import dataclass, field

from cowfs.forked import ForkedCall
from cowfs.tree.marks import COW_MARK, is_reserved_name, store_links
from cowfs.tree.walk import DIR_FLAGS, walk
from native.syscalls import xattr_at

OwnerKey = tuple[str, int]  # ("user", uid) or ("group", gid)
Key = tuple[int, int]  # (st_dev, st_ino)


@dataclass
class Usage:
    """A guest's usage, in total and per owner (private files only)."""

    bytes: int = 0
    inodes: int = 0
    shared_bytes: int = 0
    shared_inodes: int = 0
    owners: dict[OwnerKey, list[int]] = field(default_factory=lambda: defaultdict(lambda: [0, 0]))
    # Marked inodes charged to the guest (nobody but it and the store linked them).
    own_marked: set[Key] = field(default_factory=set)

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


Shared = dict[Key, int]  # (st_dev, st_ino) -> bytes of a shared inode
# Links outside the guest of an inode another guest's scan found shared: it
# stays shared however many names this guest has for it.
_SHARED_ELSEWHERE = 1 << 62


def _descend(path: bytes, name: bytes) -> bool:
    return not is_reserved_name(name)


def _skip_vanished(path: bytes, error: OSError) -> None:
    """A directory removed or moved while the scan ran is not counted; anything else is an error."""
    if error.errno not in (errno.ENOENT, errno.ESTALE):
        raise error


def scan(root: str, shared: Shared | None = None) -> Usage:
    """The usage of the backing tree at root, counted from scratch (fd-relative, no symlinks).

    If shared is given, every shared inode's (dev, ino) is added to it with its
    bytes; inodes it holds already (found shared by scans of other guests just
    before) are shared for this guest too, their marks not read again.
    """
    usage = Usage()
    known_shared = shared if shared is not None else {}
    # Marked inodes found shared so far: links neither this guest's nor the
    # store's, less the guest's names still to be found (each takes one off).
    outside: dict[Key, int] = {}
    counted: set[Key] = set()  # inodes with several links charged to the guest already
    # Private usage by (uid, gid), handed to usage.charge at the end: one dict
    # update per file instead of a call updating two owners.
    private: dict[tuple[int, int], list[int]] = defaultdict(lambda: [0, 0])
    is_dir, is_reg = stat.S_ISDIR, stat.S_ISREG
    root_fd = os.open(root, DIR_FLAGS)
    try:
        st = os.fstat(root_fd)
        usage.charge(st.st_uid, st.st_gid, st.st_blocks * 512, 1)
        for listing in walk(root_fd, _descend, on_error=_skip_vanished):
            dir_fd = listing.fd
            for entry in listing.entries:
                name = os.fsencode(entry.name)
                if is_reserved_name(name):
                    continue
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                mode = st.st_mode
                nbytes = st.st_blocks * 512
                if st.st_nlink > 1 and not is_dir(mode):
                    key = (st.st_dev, st.st_ino)
                    if key in counted:
                        continue
                    others = outside.get(key)
                    if others is None:  # the first name of it found
                        if key in known_shared:  # an earlier guest's scan found it shared
                            others = _SHARED_ELSEWHERE
                        elif is_reg(mode):
                            mark = xattr_at(dir_fd, name, COW_MARK)
                            if mark is not None:
                                others = st.st_nlink - store_links(mark)
                        if others is not None:
                            usage.shared_bytes += nbytes
                            usage.shared_inodes += 1
                            known_shared[key] = nbytes
                    if others is not None:
                        others -= 1  # this name is the guest's
                        if others > 0:
                            outside[key] = others
                            continue
                        # no link left but the guest's and the store's: the guest's
                        outside.pop(key, None)
                        usage.shared_bytes -= nbytes
                        usage.shared_inodes -= 1
                        del known_shared[key]
                        usage.own_marked.add(key)
                    counted.add(key)
                owner = private[(st.st_uid, st.st_gid)]
                owner[0] += nbytes
                owner[1] += 1
    finally:
        os.close(root_fd)
    for (uid, gid), (nbytes, inodes) in private.items():
        usage.charge(uid, gid, nbytes, inodes)
    return usage


_Portable = tuple[int, int, int, int, dict[OwnerKey, tuple[int, int]], set[Key]]


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
        portable.append((*totals, usage.owner_table(), usage.own_marked))
    return portable, shared


def _from_portable(data: _Portable) -> Usage:
    nbytes, inodes, shared_bytes, shared_inodes, owners, own_marked = data
    usage = Usage(nbytes, inodes, shared_bytes, shared_inodes, own_marked=own_marked)
    for key, (owner_bytes, owner_inodes) in owners.items():
        usage.owners[key] = [owner_bytes, owner_inodes]
    return usage
