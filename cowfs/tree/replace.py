"""Putting a link to an inode over a name in a backing tree, atomically.

The new link is made under a hidden temporary name (``marks.temp_name``) in
the target's own directory, then renamed over the target: the name reaches
the old file or the new one at every moment, never nothing. If the rename
fails, the temporary is removed; a kill between the two steps leaves it
behind, hidden from guests: a link break's is swept at the next mount
(serve/recovery.py), hashify's by its next run.

Nothing here is synced: whoever puts an inode in place makes its data
durable first, as much as it needs (serve/durability.py for a link break;
a store entry is a complete inode already), and the rename is ordered by the
filesystem's journal.

Used by a link break (serve/cow.py: the private copy over the guest's name)
and hashify (unify/hashify/linking.py: a store entry over a guest's name).
"""

from __future__ import annotations

import contextlib
import os

from cowfs.tree.marks import fd_path, temp_name
from native import syscalls


def link_over(
    dir_fd: int,
    name: bytes,
    source: str | bytes,
    source_dir_fd: int | None = None,
    follow_symlinks: bool = False,
) -> None:
    """Atomically make dir_fd/name a link to the inode at source, replacing what it reached.

    source is a path relative to source_dir_fd (or absolute), taken as
    linkat(2) takes it: a symlink is followed only with follow_symlinks.
    """
    tmp = temp_name()
    os.link(
        source, tmp, src_dir_fd=source_dir_fd, dst_dir_fd=dir_fd, follow_symlinks=follow_symlinks
    )
    try:
        syscalls.renameat2(dir_fd, tmp, dir_fd, name)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise


def link_inode_over(fd: int, dir_fd: int, name: bytes) -> None:
    """Atomically make dir_fd/name a link to the inode behind fd (an unnamed O_TMPFILE one too)."""
    link_over(dir_fd, name, fd_path(fd), follow_symlinks=True)
