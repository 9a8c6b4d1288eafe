"""Host ids that belong to someone: a user-namespaced guest's range must avoid them.

A host user is the ids of its own account, and may become any id that
/etc/subuid and /etc/subgid delegate to it (newuidmap and newgidmap: rootless
podman, `unshare --map-users`). Were one of those ids in a guest's range, that
user's processes would be the guest's root (or another of its users) as the
kernel sees it: they could signal and ptrace the guest's processes and reach
its files through /proc/PID/root. Root's own subordinate ranges are nobody
else's: they are how an admin keeps ranges from useradd (docs/contextd.md,
"Security model").
"""

from __future__ import annotations

import grp
import pwd
from dataclasses import dataclass
from pathlib import Path

SUBUID = Path("/etc/subuid")
SUBGID = Path("/etc/subgid")


@dataclass(frozen=True)
class HostIds:
    """Ids first..first+count-1 that are owner's, as source says."""

    owner: str
    first: int
    count: int
    source: str  # "/etc/subuid", "/etc/subgid", "user" or "group"

    def overlaps(self, first: int, count: int) -> bool:
        return self.first < first + count and first < self.first + self.count

    def describe(self) -> str:
        if self.source in ("user", "group"):
            return f"host {self.source} {self.owner} has id {self.first}"
        last = self.first + self.count - 1
        return f"{self.source} gives {self.first}..{last} to {self.owner}"


def owned_ids() -> list[HostIds]:
    """Every host id range a user or group other than root has."""
    found = [*_subordinate(SUBUID), *_subordinate(SUBGID)]
    found += [HostIds(u.pw_name, u.pw_uid, 1, "user") for u in pwd.getpwall() if u.pw_uid]
    found += [HostIds(g.gr_name, g.gr_gid, 1, "group") for g in grp.getgrall() if g.gr_gid]
    return found


def conflicts(first: int, count: int) -> list[HostIds]:
    """The ranges owned_ids() finds in first..first+count-1."""
    return [ids for ids in owned_ids() if ids.overlaps(first, count)]


LAST_ID = 2**32 - 2  # (uid_t)-1 is no id


def free_base(wanted: int, count: int, taken: list[tuple[int, int]]) -> int | None:
    """The first base from wanted on, a multiple of count, whose count ids meet neither
    taken's (first, count) ranges nor any other owner's ids; None if none is left."""
    ranges = taken + [(ids.first, ids.count) for ids in owned_ids()]
    base = wanted
    while base + count - 1 <= LAST_ID:
        clash = [first + n for first, n in ranges if first < base + count and base < first + n]
        if not clash:
            return base
        base = -(-max(clash) // count) * count  # the next multiple of count past them
    return None


def _subordinate(path: Path) -> list[HostIds]:
    """The entries of a subuid or subgid file ("owner:first:count" lines), root's left out."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return []
    found = []
    for line in text.splitlines():
        fields = line.strip().split(":")
        if len(fields) != 3 or line.lstrip().startswith("#"):
            continue
        owner, first, count = fields
        if owner in ("root", "0") or not (first.isdigit() and count.isdigit()):
            continue
        found.append(HostIds(owner, int(first), int(count), str(path)))
    return found
