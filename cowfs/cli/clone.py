"""``cowfs clone``."""

from __future__ import annotations

import json
import time

import click

from cowfs.cli.options import allow_reachable_option
from cowfs.cli.progress import ProgressLine
from cowfs.unify.clone import CloneStats, clone


@click.command("clone")
@click.argument("template", type=click.Path())
@click.argument("new", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@allow_reachable_option
def clone_command(template: str, new: str, as_json: bool, allow_reachable: bool) -> None:
    """Make NEW a guest tree whose files are COW hard links to TEMPLATE's.

    Regular files are marked copy-on-write and hard-linked (no data is
    copied); directories, symlinks, fifos, sockets and device nodes are
    recreated with the template's owner, mode, timestamps and xattrs.
    NEW must not exist and must be on TEMPLATE's filesystem; its missing
    parent directories are made with mode 0700. The template's files stay
    shared with every clone: change them only through a cowfs mount, which
    gives the writer a private copy.

    Refused if host users other than root could reach TEMPLATE or NEW (keep
    both inside a directory of mode 0700), or if TEMPLATE is in use (mounted,
    being hashified or deleted).
    """
    line = ProgressLine()
    started = time.monotonic()

    def progress(stats: CloneStats) -> None:
        line.show(f"cloning: {stats.entries} entries, {stats.linked_files} files linked")

    stats = clone(template, new, progress, allow_reachable)
    line.done()
    elapsed = time.monotonic() - started
    if as_json:
        click.echo(json.dumps({**stats.as_dict(), "seconds": round(elapsed, 3)}))
    else:
        click.echo(
            f"cloned {template} to {new}: {stats.linked_files} files linked "
            f"({stats.linked_bytes / 2**20:.1f} MiB shared), {stats.directories} directories, "
            f"{stats.symlinks} symlinks, {stats.special_files} special files"
            + (f", {stats.copied_files} copied (link limit)" if stats.copied_files else "")
            + f" in {elapsed:.2f}s"
        )
