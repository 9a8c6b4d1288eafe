"""Ids between a user-namespaced guest and its backing tree, as fuse-overlayfs's uidmapping.

A guest with a user namespace has ids 0..count-1 that are host ids
base..base+count-1; the kernel tells a FUSE server the host ones (in requests'
credentials, chown, file capabilities and ACLs) and takes the host ones back
(in attributes). The backing tree keeps the guest's own ids (0 is root), so
that clone, hashify, du, quota and guests without a user namespace see it as
ever. This map is applied at the FUSE boundary only: everything inside cowfs
speaks tree ids.

Host ids outside the guest's range (host root working on the mount from the
host) are taken as they are, and tree ids outside it are shown as they are: the
guest sees them as the overflow id (nobody), as any id its namespace lacks.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

CAPABILITY_XATTR = b"security.capability"
ACL_XATTRS = (b"system.posix_acl_access", b"system.posix_acl_default")

_CAP_REVISION_MASK = 0xFF000000
_CAP_REVISION_2 = 0x02000000
_CAP_REVISION_3 = 0x03000000
_CAP_V2_SIZE = 20  # magic_etc, then permitted and inheritable for two 32-bit words
_CAP_V3_SIZE = 24  # and the root id the capabilities belong to

_ACL_VERSION = 2
_ACL_USER = 0x02
_ACL_GROUP = 0x08
_ACL_ENTRY = struct.Struct("<HHI")
_ID_LIMIT = 2**32 - 1  # (uid_t)-1 means "no id" to the kernel


@dataclass(frozen=True)
class IdMap:
    """A guest's ids 0..count-1 are host ids base..base+count-1 (users and groups alike)."""

    base: int
    count: int

    def __post_init__(self) -> None:
        if self.count < 0 or self.base < 0 or self.base + self.count > _ID_LIMIT:
            raise ValueError(f"id map {self.base}:{self.count}: outside 0..{_ID_LIMIT - 1}")

    def to_tree(self, host_id: int) -> int:
        """The backing tree's id for a host id the kernel gave (-1, "unchanged", stays)."""
        if self.base <= host_id < self.base + self.count:
            return host_id - self.base
        return host_id

    def to_host(self, tree_id: int) -> int:
        """The host id the kernel is told for a backing tree's id."""
        if 0 <= tree_id < self.count:
            return self.base + tree_id
        return tree_id

    def xattr_to_tree(self, name: bytes, value: bytes) -> bytes:
        """An extended attribute as the kernel gave it, as the tree keeps it."""
        if not self.count:
            return value
        if name == CAPABILITY_XATTR:
            return self._capability(value, to_tree=True)
        if name in ACL_XATTRS:
            return self._acl(value, self.to_tree)
        return value

    def xattr_to_host(self, name: bytes, value: bytes) -> bytes:
        """An extended attribute as the tree keeps it, as the kernel is to get it."""
        if not self.count:
            return value
        if name == CAPABILITY_XATTR:
            return self._capability(value, to_tree=False)
        if name in ACL_XATTRS:
            return self._acl(value, self.to_host)
        return value

    def _capability(self, value: bytes, to_tree: bool) -> bytes:
        """File capabilities belong to a root id (revision 3); revision 2 means root 0.

        The tree keeps revision 2 for the guest's root, as a file installed on a
        host would have it (other guests, a privileged one among them, and
        hashify see the same bytes); the kernel gets revision 3 with the guest's
        root as the host sees it, so that they belong to the guest alone: a
        process outside its namespace running the file through the mount gains
        nothing (revision 2 means the host's root, whose files' capabilities
        apply in every namespace).
        """
        if len(value) < _CAP_V2_SIZE:
            return value
        (magic,) = struct.unpack_from("<I", value)
        revision = magic & _CAP_REVISION_MASK
        flags = magic & ~_CAP_REVISION_MASK
        body = value[4:_CAP_V2_SIZE]
        if revision == _CAP_REVISION_3 and len(value) >= _CAP_V3_SIZE:
            (rootid,) = struct.unpack_from("<I", value, _CAP_V2_SIZE)
        elif revision == _CAP_REVISION_2:
            rootid = 0
        else:
            return value
        if to_tree:
            rootid = self.to_tree(rootid)
            if rootid == 0:
                return struct.pack("<I", _CAP_REVISION_2 | flags) + body
        else:
            rootid = self.to_host(rootid)
        return struct.pack("<I", _CAP_REVISION_3 | flags) + body + struct.pack("<I", rootid)

    @staticmethod
    def _acl(value: bytes, convert: Callable[[int], int]) -> bytes:
        """A POSIX ACL (version 2: tag, permissions, id per entry) with named ids converted."""
        if len(value) < 4 or (len(value) - 4) % _ACL_ENTRY.size:
            return value
        (version,) = struct.unpack_from("<I", value)
        if version != _ACL_VERSION:
            return value
        out = bytearray(value[:4])
        for tag, perm, entry_id in _ACL_ENTRY.iter_unpack(value[4:]):
            if tag in (_ACL_USER, _ACL_GROUP):
                entry_id = convert(entry_id)
            out += _ACL_ENTRY.pack(tag, perm, entry_id)
        return bytes(out)


# A guest without a user namespace: its ids are the host's and the tree's.
SAME_IDS = IdMap(base=0, count=0)


def parse_id_map(text: str) -> IdMap:
    """BASE:COUNT (as `cowfs mount --id-map` takes it), or ValueError saying what is wrong."""
    base, sep, count = text.partition(":")
    if not sep or not base.isdigit() or not count.isdigit():
        raise ValueError(f"id map {text!r}: expected HOST_BASE:COUNT, e.g. 1114112:65536")
    id_map = IdMap(int(base), int(count))
    if id_map.base == 0 or id_map.count == 0:
        raise ValueError(f"id map {text!r}: the base and the count must be above 0")
    return id_map
