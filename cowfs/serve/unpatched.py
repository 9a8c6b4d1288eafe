"""Serving on a pyfuse3 with or without cowfs's patch (native/pyfuse3/README.md).

The patch gives readdir the directory's node id (``ReaddirToken.ino``), so
opendir can decline with ENOSYS: the kernel then opens directories without
asking, caches their listings and sends no OPENDIR or RELEASEDIR, and every
READDIR and FSYNCDIR comes with file handle 0. An unpatched pyfuse3 tells
readdir nothing but the handle, so opendir must hand out handles that say which
directory the later requests are about. ``DirHandles`` answers either way, so
that the operations need not know which pyfuse3 they run on.

The patch's other additions need nothing here: an unpatched pyfuse3 never
calls ``fallocate``, ignores ``read_fh_directly`` and counts no direct reads.
"""

from __future__ import annotations

import errno

import pyfuse3
from pyfuse3 import FUSEError

PATCHED = hasattr(pyfuse3.ReaddirToken, "ino")


class DirHandles:
    """The directory each handle opendir gave out stands for (none with the patched pyfuse3)."""

    def __init__(self, patched: bool = PATCHED):
        self.patched = patched
        self._nodeids: dict[int, int] = {}
        self._last = 0

    def open(self, nodeid: int) -> int:
        """A handle for directory nodeid; declined (ENOSYS) where readdir can tell the directory."""
        if self.patched:
            # The kernel then keeps listings cached (FOPEN_CACHE_DIR) and drops a
            # listing when it changes the directory. Every change goes through
            # the mount, so the cache is never stale.
            raise FUSEError(errno.ENOSYS)
        self._last += 1
        self._nodeids[self._last] = nodeid
        return self._last

    def listed(self, fh: int, token: pyfuse3.ReaddirToken) -> int:
        """The node id of the directory a READDIR with handle fh is about."""
        return token.ino if fh == 0 else self._nodeids[fh]

    def synced(self, fh: int) -> int | None:
        """The node id of the directory an FSYNCDIR with handle fh is about; None if not said."""
        return None if fh == 0 else self._nodeids[fh]

    def release(self, fh: int) -> int | None:
        """Forget handle fh; the node id it stood for, if it was one of ours."""
        return self._nodeids.pop(fh, None)


def direct_reads() -> int:
    """Reads the patched pyfuse3 answered from the page cache without calling ``read``."""
    count: int = getattr(pyfuse3, "direct_reads", lambda: 0)()
    return count
