"""Killing a file's privileges when it is written or truncated, which the kernel leaves to cowfs.

Natively, writing or truncating a file, or opening it with O_TRUNC, clears its
set-user-ID bit, and its set-group-ID bit if it is group-executable or the
caller is not in the file's group (a member keeps a non-executable set-gid
file's bit: it marks mandatory locking), unless the caller has CAP_FSETID
(fs/attr.c, setattr_should_drop_suidgid); it removes the file's capabilities
(``security.capability``) whoever the caller is. Through a FUSE mount the
kernel does it by asking the server for ``security.capability`` before every
write(2): a GETXATTR round trip each time. With FUSE_HANDLE_KILLPRIV_V2,
negotiated at INIT (``CowFS.handle_killpriv_v2``, the patched pyfuse3), it
stops asking and flags each such write, truncate and O_TRUNC open of a caller
without CAP_FSETID instead: the server is to do the kill, here
:func:`kill_suidgid`. The kernel flags direct-I/O writes (O_DIRECT, and a
passthrough file's writer, passthrough.py) in any case: it never kills on that
path itself.

The kernel asks for CAP_FSETID in the initial user namespace: a user-namespaced
guest's root, who natively keeps the bits of its own files, has them cleared
as any user would.

Capabilities need nothing here: cowfs writes, truncates and opens with O_TRUNC
the backing file itself, and the backing filesystem's own privilege kill
removes ``security.capability`` whoever writes; the mode bits it keeps for
cowfs, which holds CAP_FSETID. Nor does a chown (which the kernel flags
whoever the caller is): the backing filesystem's chown clears the bits, as it
would for a caller with CAP_FSETID.

Always on the guest's private copy: a write handle is a private inode (its open
broke the link), and open and setattr break the link first; a shared inode is
never touched.
"""

from __future__ import annotations

import os
import stat

import pyfuse3

from cowfs.serve.idmap import IdMap
from cowfs.tree.marks import fd_path


def kill_suidgid(
    fd: int,
    nodeid: int,
    caller: pyfuse3.RequestContext,
    ids: IdMap,
    session: pyfuse3.Session | None,
) -> None:
    """Clear the set-id bits of node nodeid's file (fd: any kind of fd on it), as the kernel
    does when caller, who lacks CAP_FSETID, writes it; ids map the caller's ids to the tree's."""
    st = os.fstat(fd)
    mode = st.st_mode
    kill = stat.S_ISUID
    if mode & stat.S_ISGID and (mode & stat.S_IXGRP or not _in_group(caller, ids, st.st_gid)):
        kill |= stat.S_ISGID
    if mode & kill:
        os.chmod(fd_path(fd), stat.S_IMODE(mode) & ~kill)
        # The kernel runs a program set-id by the mode it has cached (for --cache-timeout
        # after a write): it must learn of the change now, before the request is answered.
        if session is not None:
            session.invalidate_inode(nodeid, attr_only=True)


def _in_group(caller: pyfuse3.RequestContext, ids: IdMap, gid: int) -> bool:
    """Whether the file group gid (the tree's) is the caller's, or one of its supplementary
    groups (which a request does not carry: the calling thread's, from /proc)."""
    if ids.to_tree(caller.gid) == gid:
        return True
    try:
        with open(f"/proc/{caller.pid}/status", "rb") as status:
            for line in status:
                if line.startswith(b"Groups:"):
                    return gid in {ids.to_tree(int(g)) for g in line.split()[1:]}
    except OSError:
        pass  # gone: treated as a stranger to the group, the bit is cleared
    return False
