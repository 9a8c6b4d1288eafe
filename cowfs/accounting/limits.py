"""Disk limits and quotas of one guest, checked against its live usage (vdlimit + quota).

The FUSE process asks ``check`` before every operation that grows the guest's
private usage and calls ``charge`` with what the operation really changed.

* Guest limits (vdlimit): space and inodes; a reserve (percent of the space
  limit) only uid 0 may use. Exceeding them fails with ENOSPC: to the guest its
  filesystem is full, and ``df`` (``statfs``) shows the limit as its size.
* Quotas inside the guest, per uid and per gid, as Linux quota has them: a
  hard limit is never exceeded; past a soft limit a grace period starts, and
  when it has run out the soft limit acts as a hard one, until usage drops
  below it again. Exceeding them fails with EDQUOT.
"""

from __future__ import annotations

import errno
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from cowfs.accounting.usage import Usage
from cowfs.host.statedb import LimitRow, QuotaRow


@dataclass
class StatfsFigures:
    """What statfs reports through the mount, in f_frsize units and inodes."""

    blocks: int
    bfree: int
    bavail: int
    files: int
    ffree: int
    favail: int


class DiskPolicy:
    """A guest's limits and quotas against its usage."""

    def __init__(
        self,
        usage: Usage,
        limits: LimitRow,
        quotas: list[QuotaRow],
        clock: Callable[[], float] = time.time,
    ):
        self.usage = usage
        self.clock = clock
        self.hits: Counter[str] = Counter()
        self.grace_changed = False
        self.reload(limits, quotas)

    def reload(self, limits: LimitRow, quotas: list[QuotaRow]) -> None:
        """Take new limits and quotas (a running mount picks them up without a remount)."""
        self.limits = limits
        self.quotas = {(q.kind, q.owner): q for q in quotas}

    @property
    def active(self) -> bool:
        """True if any limit or quota applies."""
        return bool(self.quotas) or self.limits.space is not None or self.limits.inodes is not None

    def _space_ceiling(self, caller_uid: int) -> int | None:
        space = self.limits.space
        if space is None:
            return None
        if caller_uid != 0 and self.limits.reserved_percent:
            return int(space * (1 - self.limits.reserved_percent / 100))
        return space

    def check(self, caller_uid: int, uid: int, gid: int, nbytes: int, inodes: int) -> None:
        """Raise OSError (ENOSPC: guest limit, EDQUOT: quota) if uid:gid may not grow so."""
        refusal = self._refusal(caller_uid, uid, gid, nbytes, inodes)
        if refusal is not None:
            self._refuse(*refusal)

    def allows(self, caller_uid: int, uid: int, gid: int, nbytes: int, inodes: int) -> bool:
        """True if check would let uid:gid grow so (a refusal here is not counted as a hit)."""
        return self._refusal(caller_uid, uid, gid, nbytes, inodes) is None

    def check_quota(self, uid: int, gid: int, nbytes: int, inodes: int) -> None:
        """Raise OSError(EDQUOT) if uid's or gid's quota cannot take nbytes/inodes more."""
        refusal = self._quota_refusal(uid, gid, nbytes, inodes)
        if refusal is not None:
            self._refuse(*refusal)

    def _refusal(
        self, caller_uid: int, uid: int, gid: int, nbytes: int, inodes: int
    ) -> tuple[str, int] | None:
        """(what, errno) of the limit or quota that growing so would exceed, None if none."""
        if nbytes <= 0 and inodes <= 0:
            return None
        usage = self.usage
        ceiling = self._space_ceiling(caller_uid)
        if nbytes > 0 and ceiling is not None and usage.bytes + nbytes > ceiling:
            return "space", errno.ENOSPC
        if (
            inodes > 0
            and self.limits.inodes is not None
            and usage.inodes + inodes > self.limits.inodes
        ):
            return "inodes", errno.ENOSPC
        if self.quotas:
            return self._quota_refusal(uid, gid, nbytes, inodes)
        return None

    def _quota_refusal(
        self, uid: int, gid: int, nbytes: int, inodes: int
    ) -> tuple[str, int] | None:
        now = self.clock()
        for kind, quota, used_bytes, used_inodes in self._quotas_of(uid, gid):
            if nbytes > 0 and not _allowed(
                used_bytes + nbytes,
                quota.space_soft,
                quota.space_hard,
                quota.space_over_since,
                quota.grace,
                now,
            ):
                return f"{kind} space quota", errno.EDQUOT
            if inodes > 0 and not _allowed(
                used_inodes + inodes,
                quota.inodes_soft,
                quota.inodes_hard,
                quota.inodes_over_since,
                quota.grace,
                now,
            ):
                return f"{kind} inode quota", errno.EDQUOT
        return None

    def _quotas_of(self, uid: int, gid: int) -> Iterator[tuple[str, QuotaRow, int, int]]:
        """The quotas a change by uid:gid counts against: kind, quota, bytes and inodes used."""
        for kind, owner in (("user", uid), ("group", gid)):
            quota = self.quotas.get((kind, owner))
            if quota is not None:
                used_bytes, used_inodes = self.usage.owners.get((kind, owner), (0, 0))
                yield kind, quota, used_bytes, used_inodes

    def _refuse(self, what: str, code: int) -> None:
        self.hits[what] += 1
        raise OSError(code, os.strerror(code))

    def charge(self, uid: int, gid: int, nbytes: int, inodes: int) -> None:
        """Record what an operation changed, and start or stop quota grace clocks."""
        if not nbytes and not inodes:
            return
        self.usage.charge(uid, gid, nbytes, inodes)
        if not self.quotas:
            return
        now = self.clock()
        for _kind, quota, used_bytes, used_inodes in self._quotas_of(uid, gid):
            since = _grace_clock(used_bytes, quota.space_soft, quota.space_over_since, now)
            if since != quota.space_over_since:
                quota.space_over_since = since
                self.grace_changed = True
            since = _grace_clock(used_inodes, quota.inodes_soft, quota.inodes_over_since, now)
            if since != quota.inodes_over_since:
                quota.inodes_over_since = since
                self.grace_changed = True

    def statfs(self, real: os.statvfs_result, caller_uid: int) -> StatfsFigures:
        """The guest's own df figures: its limits as the size, its usage as the used part."""
        unit = real.f_frsize or real.f_bsize
        blocks, bfree, bavail = real.f_blocks, real.f_bfree, real.f_bavail
        if self.limits.space is not None:
            limit_blocks = self.limits.space // unit
            used_blocks = -(-self.usage.bytes // unit)
            blocks = min(blocks, limit_blocks)
            bfree = max(0, min(bfree, limit_blocks - used_blocks))
            ceiling = self._space_ceiling(caller_uid)
            assert ceiling is not None
            bavail = max(0, min(bavail, ceiling // unit - used_blocks))
        files, ffree, favail = real.f_files, real.f_ffree, real.f_favail
        if self.limits.inodes is not None:
            files = min(files, self.limits.inodes)
            ffree = max(0, min(ffree, self.limits.inodes - self.usage.inodes))
            favail = max(0, min(favail, self.limits.inodes - self.usage.inodes))
        return StatfsFigures(blocks, bfree, bavail, files, ffree, favail)


def _allowed(
    after: int, soft: int | None, hard: int | None, over_since: float | None, grace: int, now: float
) -> bool:
    if hard is not None and after > hard:
        return False
    if soft is not None and after > soft and over_since is not None:
        return now - over_since <= grace
    return True


def _grace_clock(used: int, soft: int | None, over_since: float | None, now: float) -> float | None:
    if soft is None or used <= soft:
        return None
    return over_since if over_since is not None else now


def parse_duration(text: str, what: str) -> int:
    """Seconds in "7d", "12h", "30m", "45s" or "90"; ValueError with a message otherwise."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    text = text.strip().lower()
    number, unit = (text[:-1], text[-1]) if text and text[-1] in units else (text, "s")
    if not number.isdigit():
        raise ValueError(f"{what}: {text!r} is not a duration (a number with s, m, h, d or w)")
    return int(number) * units[unit]
