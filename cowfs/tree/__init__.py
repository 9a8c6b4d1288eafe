"""Backing trees on disk, as every other wing reads and changes them.

- marks: the COW mark (``trusted.cowfs.cow``) and the names cowfs reserves.
- metadata: copying an inode's data and metadata between fds.
- replace: a link to an inode put over a name atomically (a temporary name,
  renamed over): a link break's private copy, hashify's store entries.
- walk: reading a guest's tree from the host: bounded fds, regular files only,
  nothing followed, nothing that blocks.
"""
