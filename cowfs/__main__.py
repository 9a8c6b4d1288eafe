"""``python -m cowfs``: the cowfs command."""

from cowfs.cli import main

main()
