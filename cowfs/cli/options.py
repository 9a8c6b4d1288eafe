"""Options that several commands share, spelt and explained once."""

from __future__ import annotations

import click

from cowfs.host.barrier import OVERRIDE_OPTION

allow_reachable_option = click.option(
    OVERRIDE_OPTION,
    "allow_reachable",
    is_flag=True,
    help="DANGEROUS: work on trees (and mountpoints, stores) that host users other than root"
    " can reach. They can then run the guest's setuid-root files and file capabilities as"
    " root, read and write its users' files, and write shared inodes of every guest."
    " Without it, such a path is refused: keep guests in a directory of mode 0700.",
)
