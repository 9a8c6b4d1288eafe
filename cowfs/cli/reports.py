"""Figures the report commands print: quota reports (repquota) and guest usage (vdu)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from cowfs.accounting.usage import Usage, scan, scan_many
from cowfs.errors import warn
from cowfs.host import registry
from cowfs.host.guests import Guest, OwnerNames
from cowfs.host.statedb import StateDB, UsageRow
from cowfs.unify.store import META_FILE, Store


def _grace_left(since: float | None, grace: int, now: float) -> float | None:
    if since is None:
        return None
    return max(0.0, since + grace - now)


def quota_report(db: StateDB, guest_id: int, guest: Guest) -> list[dict[str, object]]:
    """Per user and group with a quota or usage: used, soft, hard, grace left (seconds)."""
    owners = (
        db.owner_usage(guest_id)
        if db.usage(guest_id) is not None
        else scan(guest.path).owner_table()
    )
    names = _owner_names(guest)
    now = time.time()
    quotas = {(q.kind, q.owner): q for q in db.quotas(guest_id)}
    keys = sorted(set(quotas) | set(owners), key=lambda k: (k[0] != "user", k[1]))
    report: list[dict[str, object]] = []
    for kind, owner in keys:
        used_bytes, used_inodes = owners.get((kind, owner), (0, 0))
        entry: dict[str, object] = {
            "kind": kind,
            "id": owner,
            "name": names.name(kind, owner),
            "used_bytes": used_bytes,
            "used_inodes": used_inodes,
        }
        quota = quotas.get((kind, owner))
        if quota is not None:
            entry.update(
                space_soft=quota.space_soft,
                space_hard=quota.space_hard,
                inodes_soft=quota.inodes_soft,
                inodes_hard=quota.inodes_hard,
                grace=quota.grace,
                space_grace_left=_grace_left(quota.space_over_since, quota.grace, now),
                inodes_grace_left=_grace_left(quota.inodes_over_since, quota.grace, now),
            )
        report.append(entry)
    return report


@dataclass
class GuestFigures:
    """One guest's line of ``cowfs du``."""

    guest: str
    path: str
    private_bytes: int
    private_inodes: int
    shared_bytes: int
    shared_inodes: int
    apparent_bytes: int
    saved_bytes: int
    space_limit: int | None
    inode_limit: int | None
    space_use_percent: float | None
    inode_use_percent: float | None
    by_owner: list[dict[str, object]]


@dataclass
class HostFigures:
    """The host line of ``cowfs du``: all guests together, and the store."""

    guests: int
    apparent_bytes: int
    disk_bytes: int
    saved_bytes: int
    store_entries: int | None
    store_bytes: int | None


def _owner_names(guest: Guest) -> OwnerNames:
    names = OwnerNames.read(guest)
    for problem in names.problems:
        warn(f"{problem}; its ids are shown as numbers")
    return names


def disk_usage(
    db: StateDB, guests: list[Guest], recalc: bool, store: Path | None, by_owner: bool = True
) -> tuple[list[GuestFigures], HostFigures]:
    """Scan each guest (vdu): private, shared, apparent, saved, use of limits; and the host.

    With recalc, a guest that is not mounted gets the scanned usage stored as
    exact (a mounted guest's own counters are kept by its mount). by_owner:
    break private usage down by user and group, named as the guest names them.
    """
    figures = []
    usages, shared = scan_many([guest.path for guest in guests])
    for guest, usage in zip(guests, usages, strict=True):
        row = db.guest(guest.path, guest.name)
        assert row is not None
        if recalc and not registry.mounts_serving(guest.path):
            db.write_usage(
                row.id,
                UsageRow(
                    usage.bytes,
                    usage.inodes,
                    usage.shared_bytes,
                    usage.shared_inodes,
                    stale=False,
                    updated=time.time(),
                ),
                usage.owner_table(),
                usage.own_marked,
            )
        limits = db.limits(row.id)
        owners = _by_owner(guest, usage) if by_owner else []
        figures.append(
            GuestFigures(
                guest=guest.name,
                path=guest.path,
                private_bytes=usage.bytes,
                private_inodes=usage.inodes,
                shared_bytes=usage.shared_bytes,
                shared_inodes=usage.shared_inodes,
                apparent_bytes=usage.apparent_bytes,
                saved_bytes=usage.shared_bytes,
                space_limit=limits.space,
                inode_limit=limits.inodes,
                space_use_percent=_percent(usage.bytes, limits.space),
                inode_use_percent=_percent(usage.inodes, limits.inodes),
                by_owner=owners,
            )
        )
    apparent = sum(f.apparent_bytes for f in figures)
    disk = sum(f.private_bytes for f in figures) + sum(shared.values())
    store_entries = store_bytes = None
    if store is not None and (store / META_FILE).exists():
        store_entries, store_bytes = Store(store).size()
    host = HostFigures(len(figures), apparent, disk, apparent - disk, store_entries, store_bytes)
    return figures, host


def _by_owner(guest: Guest, usage: Usage) -> list[dict[str, object]]:
    names = _owner_names(guest)
    return [
        {
            "kind": kind,
            "id": owner,
            "name": names.name(kind, owner),
            "bytes": nbytes,
            "inodes": inodes,
        }
        for (kind, owner), (nbytes, inodes) in sorted(
            usage.owner_table().items(), key=lambda kv: (kv[0][0] != "user", kv[0][1])
        )
    ]


def _percent(used: int, limit: int | None) -> float | None:
    if not limit:
        return None
    return round(100.0 * used / limit, 1)
