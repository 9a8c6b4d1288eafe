"""cowfs: copy-on-write unified guest roots over FUSE (Linux-VServer's unification).

The wings (each package's docstring maps its modules):

- cowfs.serve: serving a mount (the FUSE process: operations, inodes, COW breaks).
- cowfs.accounting: policy and accounting (usage, limits and quota, the mount's books).
- cowfs.unify: sharing files between guests (clone, hashify, the content store).
- cowfs.host: host state (layout, barrier, state database, live mounts, tree locks).
- cowfs.tree: backing trees on disk (the COW mark, metadata, safe walks from the host).
- cowfs.cli: the command line, one module per command, and what it prints.

Small shared pieces stay at the top: errors, units, atomicfile, forked.
docs/design.md draws the whole system.
"""

__version__ = "0.1.0"
