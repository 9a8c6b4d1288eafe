#!/usr/bin/env python3
"""Write the man pages of cowfs and contextd into DIR (tools/man.py DIR): made from
their click commands by click-man, so that a page and the command's --help never
disagree; in section 8, the administrator's commands (cowfs.8, cowfs-mount.8, ...)."""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

import click
from click_man.core import write_man_pages

from contextd import __version__ as contextd_version
from contextd.cli import main as contextd_main
from contextd.oci.cli import main as contextd_oci_main
from cowfs import __version__ as cowfs_version
from cowfs.cli import main as cowfs_main


def _eager(group: click.Group) -> click.Group:
    """click-man walks group.commands; cowfs's group imports its commands on demand."""
    ctx = click.Context(group)
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        if command is not None:
            group.commands[name] = command
    return group


def main() -> None:
    target = Path(sys.argv[1])
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as pages:
        for name, group, version in (
            ("cowfs", cowfs_main, cowfs_version),
            ("contextd", contextd_main, contextd_version),
            ("contextd-oci", contextd_oci_main, contextd_version),
        ):
            write_man_pages(name, _eager(group), version=version, target_dir=pages)
        for page in sorted(Path(pages).glob("*.1")):
            text = re.sub(r'^(\.TH "[^"]*") "1"', r'\1 "8"', page.read_text(), flags=re.M)
            text = text.replace("(1)\\fP", "(8)\\fP")
            (target / f"{page.stem}.8").write_text(text)


if __name__ == "__main__":
    main()
