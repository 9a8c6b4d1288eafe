"""A mount's bookkeeping in the state database: usage in, usage out, limits reloaded.

At mount, the guest's usage comes from the database if the last mount wrote
it exactly, else from a scan of the backing tree (a crash leaves it marked
stale). While mounted, ``sync`` writes the live counters back (still marked
stale: the process may die before the next write), counts limit hits, keeps
quota grace clocks, and reloads limits and quotas so that ``cowfs limit`` and
``cowfs quota`` take effect without a remount. The final ``sync`` at a clean
unmount marks the usage exact.
"""

from __future__ import annotations

import copy
import logging
import time
from collections import Counter
from dataclasses import dataclass

from cowfs.accounting.limits import DiskPolicy
from cowfs.accounting.usage import OwnerKey, Usage, scan
from cowfs.host.statedb import LimitRow, QuotaRow, StateDB, UsageRow

log = logging.getLogger(__name__)


def load_usage(db: StateDB, guest_id: int, backing: str, crashed: bool) -> Usage:
    """The guest's usage: stored if exact, else counted from the backing tree."""
    row = db.usage(guest_id)
    if row is None or row.stale or crashed:
        started = time.monotonic()
        usage = scan(backing)
        log.info(
            "usage of %s recomputed by a scan (%s) in %.2fs: %d bytes, %d inodes private",
            backing,
            "no exact figures stored" if not crashed else "last mount crashed",
            time.monotonic() - started,
            usage.bytes,
            usage.inodes,
        )
        return usage
    usage = Usage(row.bytes, row.inodes, row.shared_bytes, row.shared_inodes)
    usage.own_marked = db.own_marked(guest_id)
    for key, (nbytes, inodes) in db.owner_usage(guest_id).items():
        usage.owners[key] = [nbytes, inodes]
    return usage


@dataclass
class Snapshot:
    """The books at one moment, to be written."""

    usage: UsageRow
    owners: dict[OwnerKey, tuple[int, int]]
    own_marked: set[tuple[int, int]] | None
    hits: Counter[str]
    grace: list[QuotaRow] | None


class GuestLedger:
    """The link between a mounted guest's live usage and the state database."""

    def __init__(self, db: StateDB, backing: str, crashed: bool):
        self.db = db
        guest = db.guest(backing)
        assert guest is not None
        self.guest_id = guest.id
        usage = load_usage(db, guest.id, backing, crashed)
        self.policy = DiskPolicy(usage, db.limits(guest.id), db.quotas(guest.id))
        self._hits_written: Counter[str] = Counter()
        self._own_marked_written: set[tuple[int, int]] | None = None
        self.sync(final=False)

    def close(self) -> None:
        """Close the state database (the mount has ended)."""
        self.db.close()

    def sync(self, final: bool) -> None:
        """Write usage, hits and grace clocks; reload limits and quotas."""
        self.apply(self.store(self.snapshot(final)))

    def snapshot(self, final: bool) -> Snapshot:
        """What sync writes, copied (in the serving thread: the counters move on meanwhile)."""
        policy = self.policy
        usage = policy.usage
        row = UsageRow(
            usage.bytes,
            usage.inodes,
            usage.shared_bytes,
            usage.shared_inodes,
            stale=not final,
            updated=time.time(),
        )
        # The own marked inodes change seldom (a guest drops one): written when they did.
        own_marked = set(usage.own_marked) if usage.own_marked != self._own_marked_written else None
        grace = None
        if policy.grace_changed:
            grace = [copy.copy(q) for q in policy.quotas.values()]
            policy.grace_changed = False
        return Snapshot(row, usage.owner_table(), own_marked, Counter(policy.hits), grace)

    def store(self, snap: Snapshot) -> tuple[LimitRow, list[QuotaRow]]:
        """Write a snapshot; the limits and quotas stored now. Database work only: it may
        run in a worker thread (a locked database then holds up no request)."""
        self.db.write_usage(self.guest_id, snap.usage, snap.owners, snap.own_marked)
        if snap.own_marked is not None:
            self._own_marked_written = snap.own_marked
        new_hits = snap.hits - self._hits_written
        if new_hits:
            self.db.add_hits(self.guest_id, dict(new_hits))
            self._hits_written = snap.hits
        if snap.grace is not None:
            self.db.write_grace(self.guest_id, snap.grace)
        return self.db.limits(self.guest_id), self.db.quotas(self.guest_id)

    def apply(self, stored: tuple[LimitRow, list[QuotaRow]]) -> None:
        """Take up the limits and quotas store() read (in the serving thread)."""
        limits, quotas = stored
        # The database's grace clocks are only written by this process while it runs.
        live = {(q.kind, q.owner): q for q in self.policy.quotas.values()}
        for quota in quotas:
            if (quota.kind, quota.owner) in live:
                old = live[(quota.kind, quota.owner)]
                quota.space_over_since = old.space_over_since
                quota.inodes_over_since = old.inodes_over_since
        self.policy.reload(limits, quotas)
