"""``cowfs limit set|show|clear`` (vdlimit) and ``cowfs quota set|clear|report``."""

from __future__ import annotations

import json

import click

from cowfs.accounting.limits import parse_duration
from cowfs.cli.reports import quota_report
from cowfs.errors import CowfsError
from cowfs.host.guests import (
    KEEP,
    Guest,
    OwnerNames,
    fresh_usage,
    notify_mounts,
    resolve,
    resolve_owner,
    set_disk_limits,
)
from cowfs.host.statedb import LimitRow, QuotaRow, StateDB
from cowfs.units import format_bytes, parse_size


def _db() -> StateDB:
    return StateDB()


def _percent(text: str) -> float:
    value = text.strip().rstrip("%")
    try:
        number = float(value)
    except ValueError:
        raise CowfsError(f"--reserved: {text!r} is not a percentage") from None
    if not 0 <= number < 100:
        raise CowfsError(f"--reserved: {text!r} must be from 0 to under 100%")
    return number


def _count(text: str | None, what: str) -> int | None:
    if text is None:
        return None
    if not text.strip().isdigit():
        raise CowfsError(f"{what}: {text!r} is not a whole number of inodes")
    return int(text)


def _size(text: str | None, what: str) -> int | None:
    return None if text is None else parse_size(text, what)


@click.group("limit")
def limit_group() -> None:
    """Per-guest disk limits: space, inodes, and a reserve for root (vdlimit)."""


@limit_group.command("set")
@click.argument("guest")
@click.option("--space", help="Disk space the guest may use (K, M, G, T).")
@click.option("--inodes", help="Inodes the guest may use.")
@click.option("--reserved", help="Part of --space only uid 0 may use, e.g. 5%.")
def limit_set(guest: str, space: str | None, inodes: str | None, reserved: str | None) -> None:
    """Set GUEST's limits; options not given keep their value.

    Only the guest's private files count: shared (COW) files are free until
    the guest writes to them. A running mount applies the new limits at once.
    """
    target = resolve(guest)
    new_space = _size(space, "--space")
    new_inodes = _count(inodes, "--inodes")
    new_reserved = _percent(reserved) if reserved is not None else None
    if new_space is None and new_inodes is None and new_reserved is None:
        raise CowfsError("nothing to set: give --space, --inodes or --reserved")
    limits = set_disk_limits(
        target,
        space=KEEP if new_space is None else new_space,
        inodes=KEEP if new_inodes is None else new_inodes,
        reserved_percent=KEEP if new_reserved is None else new_reserved,
    )
    click.echo(f"{target.name}: {_describe(limits)}")


def _describe(limits: LimitRow) -> str:
    space = format_bytes(limits.space) if limits.space is not None else "unlimited"
    inodes = str(limits.inodes) if limits.inodes is not None else "unlimited"
    return f"space {space}, inodes {inodes}, reserved {limits.reserved_percent:g}%"


@limit_group.command("clear")
@click.argument("guest")
def limit_clear(guest: str) -> None:
    """Remove GUEST's limits."""
    target = resolve(guest)
    db = _db()
    row = db.guest(target.path, create=False)
    if row is None or not db.clear_limits(row.id):
        raise CowfsError(f"guest {target.name} has no limits")
    notify_mounts(target)
    click.echo(f"{target.name}: limits removed")


@limit_group.command("show")
@click.argument("guest", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def limit_show(guest: str | None, as_json: bool) -> None:
    """Show limits and usage of GUEST, or of every guest with limits."""
    db = _db()
    if guest:
        target = resolve(guest)
        row = db.guest(target.path, target.name)
        assert row is not None
        rows = [row]
    else:
        rows = [r for r in db.guests() if db.limits(r.id) != LimitRow()]
    result = []
    for row in rows:
        fresh_usage(db, row.id, Guest(row.name, row.path))
        limits = db.limits(row.id)
        usage = db.usage(row.id)
        used_bytes = usage.bytes if usage else None
        used_inodes = usage.inodes if usage else None
        result.append(
            {
                "guest": row.name,
                "path": row.path,
                "space": limits.space,
                "inodes": limits.inodes,
                "reserved_percent": limits.reserved_percent,
                "used_bytes": used_bytes,
                "used_inodes": used_inodes,
                "hits": db.hits(row.id),
            }
        )
    if as_json:
        click.echo(json.dumps(result))
        return
    for item in result:
        limits = LimitRow(item["space"], item["inodes"], item["reserved_percent"])  # type: ignore[arg-type]
        used = (
            f"; used {format_bytes(item['used_bytes'])}, {item['used_inodes']} inodes"  # type: ignore[arg-type]
            if item["used_bytes"] is not None
            else ""
        )
        click.echo(f"{item['guest']}: {_describe(limits)}{used}")


@click.group("quota")
def quota_group() -> None:
    """Per-user and per-group quota inside a guest (soft and hard limits, grace)."""


def _owner(target: Guest, user: str | None, group: str | None) -> tuple[str, int]:
    if (user is None) == (group is None):
        raise CowfsError("give exactly one of --user and --group")
    kind = "user" if user is not None else "group"
    spec = user if user is not None else group
    assert spec is not None
    return kind, resolve_owner(target, kind, spec)


@quota_group.command("set")
@click.argument("guest")
@click.option("--user", help="User name (in the guest's /etc/passwd) or uid.")
@click.option("--group", help="Group name (in the guest's /etc/group) or gid.")
@click.option("--space-soft", help="Space over which the grace period starts.")
@click.option("--space-hard", help="Space never exceeded.")
@click.option("--inodes-soft", help="Inodes over which the grace period starts.")
@click.option("--inodes-hard", help="Inodes never exceeded.")
@click.option("--grace", default="7d", show_default=True, help="Grace period (s, m, h, d, w).")
def quota_set(
    guest: str,
    user: str | None,
    group: str | None,
    space_soft: str | None,
    space_hard: str | None,
    inodes_soft: str | None,
    inodes_hard: str | None,
    grace: str,
) -> None:
    """Set a user's or group's quota in GUEST (EDQUOT when exceeded)."""
    target = resolve(guest)
    kind, owner = _owner(target, user, group)
    quota = QuotaRow(
        kind,
        owner,
        _size(space_soft, "--space-soft"),
        _size(space_hard, "--space-hard"),
        _count(inodes_soft, "--inodes-soft"),
        _count(inodes_hard, "--inodes-hard"),
        0,
    )
    try:
        quota.grace = parse_duration(grace, "--grace")
    except ValueError as e:
        raise CowfsError(str(e)) from None
    for soft, hard, what in (
        (quota.space_soft, quota.space_hard, "space"),
        (quota.inodes_soft, quota.inodes_hard, "inodes"),
    ):
        if soft is not None and hard is not None and soft > hard:
            raise CowfsError(f"--{what}-soft is above --{what}-hard")
    if all(
        v is None
        for v in (quota.space_soft, quota.space_hard, quota.inodes_soft, quota.inodes_hard)
    ):
        raise CowfsError("nothing to set: give a soft or hard limit for space or inodes")
    db = _db()
    row = db.guest(target.path, target.name)
    assert row is not None
    db.set_quota(row.id, quota)
    notify_mounts(target)
    name = OwnerNames.read(target).name(kind, owner)
    click.echo(f"{target.name}: quota set for {kind} {name} ({owner})")


@quota_group.command("clear")
@click.argument("guest")
@click.option("--user", help="User name or uid.")
@click.option("--group", help="Group name or gid.")
def quota_clear(guest: str, user: str | None, group: str | None) -> None:
    """Remove a user's or group's quota in GUEST."""
    target = resolve(guest)
    kind, owner = _owner(target, user, group)
    db = _db()
    row = db.guest(target.path, create=False)
    if row is None or not db.clear_quota(row.id, kind, owner):
        raise CowfsError(f"{kind} {owner} has no quota in {target.name}")
    notify_mounts(target)
    click.echo(f"{target.name}: quota of {kind} {owner} removed")


@quota_group.command("report")
@click.argument("guest")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def quota_report_command(guest: str, as_json: bool) -> None:
    """Usage against quotas in GUEST, repquota-style: used, soft, hard, grace left."""
    target = resolve(guest)
    db = _db()
    row = db.guest(target.path, target.name)
    assert row is not None
    fresh_usage(db, row.id, target)
    report = quota_report(db, row.id, target)
    if as_json:
        click.echo(json.dumps(report))
        return
    click.echo(
        f"{'':6} {'name':12} {'used':>10} {'soft':>10} {'hard':>10} {'grace':>8}"
        f" {'inodes':>8} {'soft':>8} {'hard':>8} {'grace':>8}"
    )
    for e in report:

        def fmt(v: object) -> str:
            return format_bytes(v) if isinstance(v, int) else "-"

        def num(v: object) -> str:
            return str(v) if isinstance(v, int) else "-"

        click.echo(
            f"{e['kind']:6} {e['name']!s:12} {fmt(e['used_bytes']):>10}"
            f" {fmt(e.get('space_soft')):>10} {fmt(e.get('space_hard')):>10}"
            f" {_grace_text(e.get('space_grace_left')):>8}"
            f" {num(e['used_inodes']):>8} {num(e.get('inodes_soft')):>8}"
            f" {num(e.get('inodes_hard')):>8} {_grace_text(e.get('inodes_grace_left')):>8}"
        )


def _grace_text(left: object) -> str:
    if not isinstance(left, float):
        return "-"
    if left <= 0:
        return "none"
    for unit, seconds in (("d", 86400), ("h", 3600), ("m", 60)):
        if left >= seconds:
            return f"{left / seconds:.0f}{unit}"
    return f"{left:.0f}s"
