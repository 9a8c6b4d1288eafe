"""Backing trees on disk, as every other wing reads and changes them.

- marks: the COW mark (``trusted.cowfs.cow``) and the names cowfs reserves.
- metadata: copying an inode's data and metadata between fds.
- walk: reading a guest's tree from the host: bounded fds, regular files only,
  nothing followed, nothing that blocks.
"""
