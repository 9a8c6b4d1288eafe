"""``cowfs hashify``: deduplicate existing guest trees into the content store.

Linux-VServer's vhashify, in phases, each a module given what it works on
(the guests' ``Roots``, the ``Store``, the ``HashifyReport``):

- command: the run (``hashify``): checks the arguments, locks the guests,
  opens the store, runs the phases below in order, fills in the report and
  notes in the state database that the guests' usage changed.
- scan: every regular file of the guests that the include/exclude rules
  allow (fd-relative, nothing followed), as candidate inodes; and the one
  check, before anything is done to a file, that it is still as scanned.
- grouping: which inodes may become one (equal content, size, mode, owner,
  extended attributes and, unless ignored, mtime), first by the part the
  scan's stat gives, so that only inodes with a partner are hashed.
- hashing: content hashes, split by cost between this process and a forked
  child on another CPU.
- linking: a store entry for each group, then every other name replaced by
  a link to it, re-checked right before (cowfs.tree.replace).
- report: the options and the report.

Every step is atomic, so a kill at any moment leaves each guest name on a
complete file with its old content and metadata; temporaries a killed run
left behind are removed by the next run. Names already linked to the store
cost one stat on a re-run.
"""

from cowfs.unify.hashify.command import HashifyRun, check_hashify_args, hashify
from cowfs.unify.hashify.report import HashifyOptions, HashifyReport, Progress

__all__ = [
    "HashifyOptions",
    "HashifyReport",
    "HashifyRun",
    "Progress",
    "check_hashify_args",
    "hashify",
]
