"""``cowfs du``: per-guest disk usage, shared and private (vdu, better)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import click

from cowfs.cli.reports import disk_usage
from cowfs.errors import CowfsError
from cowfs.host.guests import all_guests, resolve
from cowfs.host.statedb import StateDB
from cowfs.unify.store import default_store
from cowfs.units import format_bytes


@click.command("du")
@click.argument("guests", nargs=-1)
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@click.option("--by-user", is_flag=True, help="Also break private usage down by user and group.")
@click.option("--recalc", is_flag=True, help="Store the scanned figures as the guests' usage.")
@click.option("--store", type=click.Path(path_type=Path), help="Content store to report on.")
def du_command(
    guests: tuple[str, ...], as_json: bool, by_user: bool, recalc: bool, store: Path | None
) -> None:
    """Disk usage of GUESTS (default: every guest known), counted from their backing trees.

    Private: inodes the guest alone holds (what its limits count). Shared: COW
    files it shares with a template, other guests or the store. Apparent:
    what it would take without sharing (du of its tree). Saved: apparent minus
    private. The host line adds the content store and the overall saving.
    """
    db = StateDB()
    targets = (
        [resolve(g) for g in guests]
        if guests
        else all_guests([(r.name, r.path) for r in db.guests()])
    )
    if not targets:
        raise CowfsError("no guests: give guest names or paths")
    figures, host = disk_usage(db, targets, recalc, store or default_store(), by_user)
    if as_json:
        rows = [dataclasses.asdict(f) for f in figures]
        if not by_user:
            for row in rows:
                row.pop("by_owner")
        click.echo(json.dumps({"guests": rows, "host": dataclasses.asdict(host)}))
        return
    click.echo(
        f"{'guest':16} {'private':>10} {'inodes':>8} {'shared':>10} {'inodes':>8}"
        f" {'apparent':>10} {'saved':>10} {'space%':>7} {'inodes%':>7}"
    )
    for f in figures:
        click.echo(
            f"{f.guest:16} {format_bytes(f.private_bytes):>10} {f.private_inodes:>8}"
            f" {format_bytes(f.shared_bytes):>10} {f.shared_inodes:>8}"
            f" {format_bytes(f.apparent_bytes):>10} {format_bytes(f.saved_bytes):>10}"
            f" {_pct(f.space_use_percent):>7} {_pct(f.inode_use_percent):>7}"
        )
        if by_user:
            for owner in f.by_owner:
                click.echo(
                    f"  {owner['kind']:5} {owner['name']!s:12} {format_bytes(owner['bytes']):>10}"  # type: ignore[arg-type]
                    f" {owner['inodes']:>8}"
                )
    store_text = (
        f", store {host.store_entries} entries {format_bytes(host.store_bytes)}"
        if host.store_bytes is not None
        else ""
    )
    click.echo(
        f"host: {host.guests} guests, apparent {format_bytes(host.apparent_bytes)},"
        f" on disk {format_bytes(host.disk_bytes)}, saved {format_bytes(host.saved_bytes)}"
        + store_text
    )


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}%"
