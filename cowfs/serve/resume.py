"""A new FUSE server for the session of one that died: the guest sees a pause, not a loss.

The kernel keeps a FUSE connection, and the mount with it, while any process
holds its /dev/fuse fd. contextd's supervisor of a guest keeps a copy of its
root's session fd (taken from the server with pidfd_getfd: the fd's number is
in the mount's registry record). When the server dies, the supervisor forks a
successor with that fd (``successor``), which

1. puts placeholders at the fd numbers that were the dead server's file
   handles, before it opens anything, so that each can be reopened at its
   number (a file handle is its backing fd: journal.py);
2. takes the tree lock, sweeps what the dead server left half done (a link
   break's temporary) and recounts the guest's usage (recovery.py, ledger.py);
3. takes over the node ids and open files from the journal (inodes.py,
   openfiles.py);
4. starts a libfuse session on the fd and lets it see the INIT the kernel sent
   the first server (``init_session``: libfuse answers nothing before INIT);
5. asks the kernel to resend the requests the dead server had read but not
   answered (FUSE_NOTIFY_RESEND, Linux 6.9+): they are done again, which is
   harmless for reads, writes and lookups; a create, mkdir, link or rename
   done just before the death may then fail with EEXIST or ENOENT.

What cannot be taken over: inodes a file handle no longer reaches (a file
removed while open): requests for them fail with ESTALE or EBADF.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from cowfs.atomicfile import write_atomically
from cowfs.host import registry
from cowfs.host.paths import run_dir
from cowfs.serve import journal

if TYPE_CHECKING:
    import pyfuse3

log = logging.getLogger(__name__)


def resend_pending(session: pyfuse3.Session) -> None:
    """Ask the kernel to send again every request a dead server had read but not answered."""
    try:
        session.resend_requests()
    except OSError as e:  # a kernel before 6.9: those requests stay unanswered
        log.warning("FUSE_NOTIFY_RESEND refused (%s): requests in flight stay unanswered", e)


def keep_init_request(mountpoint: str, session: pyfuse3.Session) -> None:
    """Keep the FUSE_INIT request this server received, for a successor to replay."""
    request = session.init_request()
    if request is not None:
        write_atomically(journal_dir(mountpoint) / "init", request)


def init_session(
    operations: pyfuse3.Operations, fd: int, mountpoint: str, fuse_options: set[str]
) -> pyfuse3.Session:
    """A session on a connection the kernel has initialised already, replaying the
    FUSE_INIT the first server kept (see the module docstring); RuntimeError if it
    cannot."""
    import pyfuse3

    try:
        request = (journal_dir(mountpoint) / "init").read_bytes()
    except FileNotFoundError:
        raise RuntimeError("the first server kept no FUSE_INIT request to replay") from None
    try:
        return pyfuse3.Session.resume(operations, fd, request, fuse_options)
    except ValueError as e:
        raise RuntimeError(str(e)) from None


def reserve_handles(mountpoint: str, keep: list[int]) -> list[int]:
    """Hold the fd numbers of the dead server's open files with placeholders (fds of an
    O_PATH open of /dev/null, on which read and write fail) before anything else is
    opened. keep: fds of ours that must survive: moved above those numbers if in the
    way; their numbers now."""
    handles = {r.fd for r in journal.read_files(journal_dir(mountpoint))}
    if not handles:
        return keep
    above = max(handles) + 1
    kept = []
    for fd in keep:
        if fd in handles:
            moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, above)
            os.set_inheritable(moved, os.get_inheritable(fd))
            os.close(fd)
            fd = moved
        kept.append(fd)
    placeholder = os.open("/dev/null", os.O_PATH | os.O_CLOEXEC)
    for fh in handles:
        if fh > 2 and fh != placeholder:
            os.dup2(placeholder, fh, inheritable=False)
    if placeholder not in handles:
        os.close(placeholder)
    return kept


def journal_dir(mountpoint: str) -> Path:
    """The journal of the mount at mountpoint (journal.py)."""
    return journal.journal_dir(run_dir(), registry.mount_key(mountpoint))


def forget_journal(mountpoint: str) -> None:
    """Remove the journal of a mount that has ended for good."""
    shutil.rmtree(journal_dir(mountpoint), ignore_errors=True)
