"""Host state: where cowfs keeps things, and what it knows of guests and mounts.

- paths: the host layout (COWFS_ROOT: guests/, store/, state.db), all overridable.
- barrier: that layout and every guest tree reachable by root only.
- statedb: the state database (sqlite): guests, usage, limits, quotas, limit hits.
- registry: records of live mounts (which process serves which tree where).
- treelock: one lock per guest tree, for mount, clone, hashify and delete.
- guests: naming guests on the command line, and setting their disk limits.
"""
