"""The ``cowfs`` command: one module per subcommand; each parses, calls the library, prints."""

from __future__ import annotations

import importlib
import os
import sys
from typing import NoReturn

import click

from cowfs import __version__
from cowfs.errors import CowfsError

# name -> (module under cowfs.cli, attribute): a command's module (and the
# library behind it) is imported only when that command runs, so that each
# command starts in the time its own imports take.
_COMMANDS = {
    "mount": ("mount", "mount_command"),
    "umount": ("mount", "umount_command"),
    "clone": ("clone", "clone_command"),
    "hashify": ("hashify", "hashify_command"),
    "store": ("hashify", "store_group"),
    "limit": ("limits", "limit_group"),
    "quota": ("limits", "quota_group"),
    "du": ("du", "du_command"),
}


def exit_at_once(status: int = 0) -> NoReturn:
    """End the process now, its output flushed, without the interpreter's teardown.

    For a command that ends holding a large object graph: hashify's scan of
    three Debian guests is some 300,000 objects, which the interpreter's exit
    would free one by one (~12 ms of a 0.37 s dry run); the kernel frees the
    process at once. No atexit handler runs: only for a command's last line,
    with nothing left open that needs closing.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


class _Group(click.Group):
    """Loads subcommands on demand; prints a CowfsError as one line on stderr and exits 1."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(_COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in _COMMANDS:
            return None
        module, attribute = _COMMANDS[cmd_name]
        command: click.Command = getattr(importlib.import_module(f"cowfs.cli.{module}"), attribute)
        return command

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except CowfsError as e:
            # As a host user, a path cowfs cannot reach looks missing: say why.
            click.echo(f"cowfs: error: {e}{_not_root_hint(str(e))}", err=True)
            sys.exit(1)
        except OSError as e:  # one line, never a traceback
            where = f"{e.filename}: " if e.filename else ""
            said = f"{where}{e.strerror or e}"
            click.echo(f"cowfs: error: {said}{_not_root_hint(said)}", err=True)
            sys.exit(1)


def _not_root_hint(said: str) -> str:
    if os.geteuid() == 0 or "root" in said:
        return ""
    return " (cowfs is root's: run it as root)"


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cowfs")
def main() -> None:
    """cowfs: guest roots whose shared files are copy-on-write hard links.

    Linux-VServer's unification on an unpatched kernel: many guests share one
    copy of identical files; a guest's first write to a shared file silently
    gives it a private copy, so no guest ever sees another's writes.
    """
