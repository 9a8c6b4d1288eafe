"""The ``cowfs`` command: one module per subcommand; each parses, calls the library, prints."""

from __future__ import annotations

import sys

import click

from cowfs import __version__
from cowfs.errors import CowfsError


class _Group(click.Group):
    """Prints a CowfsError as one line on stderr and exits 1, instead of a traceback."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except CowfsError as e:
            click.echo(f"cowfs: error: {e}", err=True)
            sys.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cowfs")
def main() -> None:
    """cowfs: guest roots whose shared files are copy-on-write hard links.

    Linux-VServer's unification on an unpatched kernel: many guests share one
    copy of identical files; a guest's first write to a shared file silently
    gives it a private copy, so no guest ever sees another's writes.
    """


def _register() -> None:
    from cowfs.cli import clone, du, hashify, limits, mount

    main.add_command(mount.mount_command)
    main.add_command(mount.umount_command)
    main.add_command(clone.clone_command)
    main.add_command(hashify.hashify_command)
    main.add_command(hashify.store_group)
    main.add_command(limits.limit_group)
    main.add_command(limits.quota_group)
    main.add_command(du.du_command)


_register()
