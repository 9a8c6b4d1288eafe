"""``cowfs hashify`` and ``cowfs store gc|verify``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from cowfs.cli import exit_at_once
from cowfs.cli.display import display_path
from cowfs.cli.options import allow_reachable_option
from cowfs.cli.progress import ProgressLine
from cowfs.unify.excludes import DEFAULT_EXCLUDES, Rules
from cowfs.unify.hashify import HashifyOptions, HashifyReport, hashify
from cowfs.unify.store import Store, default_store
from cowfs.units import format_bytes, parse_size


def _collect_rules(
    ctx: click.Context, param: click.Parameter, value: tuple[str, ...]
) -> tuple[str, ...]:
    # Keep --include and --exclude in command-line order: first match wins.
    order = ctx.meta.setdefault("cowfs_rules", [])
    order.extend((param.name == "include", v) for v in value)
    return value


@click.command("hashify")
@click.argument("guests", nargs=-1, required=True, type=click.Path())
@click.option(
    "--store",
    type=click.Path(path_type=Path),
    help="Content store (default: /var/lib/cowfs/store).",
)
@click.option(
    "-n",
    "--dry-run",
    is_flag=True,
    help="Show what would be unified and the saving; change nothing.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option(
    "--ignore-mtime",
    is_flag=True,
    help="Unify files whose mtimes differ (guests then see the shared mtime).",
)
@click.option(
    "--min-size",
    default="16",
    show_default=True,
    help="Skip files smaller than this (K/M/G suffixes).",
)
@click.option(
    "--exclude",
    multiple=True,
    callback=_collect_rules,
    expose_value=True,
    help="Glob of guest paths to leave alone (repeatable).",
)
@click.option(
    "--include",
    multiple=True,
    callback=_collect_rules,
    expose_value=True,
    help="Glob of guest paths to unify even if excluded later (repeatable).",
)
@click.option(
    "--exclude-from",
    multiple=True,
    type=click.Path(path_type=Path),
    help="File of patterns, one a line: '- PAT' excludes, '+ PAT' includes.",
)
@click.option("--no-default-excludes", is_flag=True, help="Do not append the default exclude list.")
@click.option("-v", "--verbose", is_flag=True, help="List every file unified.")
@allow_reachable_option
@click.pass_context
def hashify_command(
    ctx: click.Context,
    guests: tuple[str, ...],
    store: Path | None,
    dry_run: bool,
    as_json: bool,
    ignore_mtime: bool,
    min_size: str,
    exclude: tuple[str, ...],
    include: tuple[str, ...],
    exclude_from: tuple[Path, ...],
    no_default_excludes: bool,
    verbose: bool,
    allow_reachable: bool,
) -> None:
    """Deduplicate existing GUEST trees into the content store.

    Files that are equal in content, size, mode, owner, extended attributes
    (file capabilities, ACLs, labels) and mtime become COW-marked hard links
    to one inode in the store: each guest reads exactly what it read before,
    and a cowfs mount gives a guest a private copy the moment it writes.
    Regular files only; files under --min-size are skipped.

    Refused if host users other than root could reach a GUEST or the store
    (keep them inside a directory of mode 0700), or if a GUEST is in use
    (mounted, cloned or deleted meanwhile).

    \b
    Default excludes (after your own rules; first match wins):
    """
    rules = Rules.build(
        ctx.meta.get("cowfs_rules", []), list(exclude_from), not no_default_excludes
    )
    options = HashifyOptions(
        store=store or default_store(),
        dry_run=dry_run,
        ignore_mtime=ignore_mtime,
        min_size=parse_size(min_size, "--min-size"),
        rules=rules,
        allow_reachable=allow_reachable,
    )
    line = ProgressLine()

    def progress(phase: str, report: HashifyReport) -> None:
        line.show(
            f"{phase}: {report.files_scanned} files scanned, {report.files_hashed} hashed,"
            f" {report.unified_files} unified"
        )

    run = hashify(list(guests), options, progress)
    line.done()
    _print_report(run.report, as_json, verbose, dry_run)
    exit_at_once()  # with run's scan still in memory: see exit_at_once


def _print_report(report: HashifyReport, as_json: bool, verbose: bool, dry_run: bool) -> None:
    if as_json:
        data = report.as_dict()
        if not verbose and not dry_run:
            data.pop("actions")
        click.echo(json.dumps(data))
        return
    if verbose or dry_run:
        verb = "would link" if dry_run else "linked"
        lines = [f"{verb} {display_path(path)} -> {entry}\n" for path, entry in report.actions]
        sys.stdout.write("".join(lines))
    for error in report.errors:
        click.echo(f"cowfs: warning: {display_path(error)}", err=True)
    prefix = "dry run: would unify" if dry_run else "unified"
    click.echo(
        f"{prefix} {report.unified_files} files ({report.new_store_entries} new store entries),"
        f" saving {format_bytes(report.bytes_saved)}; scanned {report.files_scanned} files"
        f" ({format_bytes(report.bytes_scanned)}) in {report.guests} guests,"
        f" {report.already_unified} already in the store, {report.candidates} candidates,"
        f" {report.files_hashed} hashed ({format_bytes(report.bytes_hashed)})"
        + (
            f", {report.skipped_changed} skipped (changed meanwhile)"
            if report.skipped_changed
            else ""
        )
        + f"; store: {report.store_entries} entries, {format_bytes(report.store_bytes)};"
        f" {report.seconds:.2f}s"
    )


hashify_command.help = (hashify_command.help or "") + "\n".join(f"  {p}" for p in DEFAULT_EXCLUDES)


@click.group("store")
def store_group() -> None:
    """Maintain the content store."""


@store_group.command("gc")
@click.option(
    "--store",
    type=click.Path(path_type=Path),
    help="Content store (default: /var/lib/cowfs/store).",
)
@click.option("-n", "--dry-run", is_flag=True, help="Only report what would be removed.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def gc_command(store: Path | None, dry_run: bool, as_json: bool) -> None:
    """Remove store entries that no guest links any more."""
    removed, freed = Store.open(store or default_store(), create=False).gc(dry_run)
    if as_json:
        click.echo(json.dumps({"entries": removed, "bytes": freed, "dry_run": dry_run}))
    else:
        verb = "would remove" if dry_run else "removed"
        click.echo(f"{verb} {removed} unused entries ({format_bytes(freed)})")


@store_group.command("verify")
@click.option(
    "--store",
    type=click.Path(path_type=Path),
    help="Content store (default: /var/lib/cowfs/store).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def verify_command(store: Path | None, as_json: bool) -> None:
    """Re-hash every store entry; report (and exit 1 on) any that no longer match."""
    the_store = Store.open(store or default_store(), create=False)
    bad = [(entry.rel, reason) for entry, reason in the_store.verify()]
    count, _size = the_store.size()
    if as_json:
        click.echo(
            json.dumps({"entries": count, "bad": [{"entry": e, "reason": r} for e, r in bad]})
        )
    else:
        for entry, reason in bad:
            click.echo(f"BAD {entry}: {reason}")
        click.echo(f"verified {count} entries: {len(bad)} bad")
    if bad:
        raise SystemExit(1)
