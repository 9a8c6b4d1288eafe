"""Serving a mount: the FUSE process that presents one guest's backing tree as its root.

- mount: starting and stopping that process (`cowfs mount`, `cowfs umount`); it
  builds the collaborators below and hands them to the operations.
- operations: the FUSE operations, each a thin translation into ``*at`` calls.
- inodes: FUSE node ids to O_PATH handles on backing inodes (bounded fds).
- openfiles: the guest's open files (each handle a backing fd), and inodes
  unlinked while open, charged until their last close.
- listings: directory listings read by the backing directory's own offsets.
- unpatched: what differs on a pyfuse3 without cowfs's patch (directory handles).
- cow: breaking a COW link at a guest's first modification; durability: how a
  private copy reaches the disk before it replaces the shared file.
- workers, uring: blocking I/O off the trio loop (threads, io_uring).
- recovery: the dirty mark and the sweep of a crashed mount's leftovers.
- journal, resume: what a server leaves for a successor on the same FUSE session,
  and the successor's start (contextd replaces a guest's server that died).

Policy (what a write may allocate, what it costs) is cowfs.accounting's.
"""
