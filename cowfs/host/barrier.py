"""The barrier: host users other than root must not reach guest trees, mount points or the store.

Why: a guest's root may plant a setuid-root binary or a file with file
capabilities in its tree; any host user who can reach that file (through
the backing tree or through the mount) can run it and become root on the
host. Guest users' files (uid 1000 in the guest is uid 1000 on the host)
would be readable and writable by the host user with the same uid, and a
shared (COW-marked) inode written through the backing tree changes it for
every guest at once. util-vserver kept all of this behind ``/vservers`` at
mode 000; cowfs does the same with one directory that only root may search.

"Reachable" here means: a host user who is not root could search every
directory above the path, so the path itself is one lookup away. The test
is per directory and conservative: a directory keeps host users out only if
it is owned by root and neither its group nor others may search it (mode
``0700`` or tighter). A group search bit counts even for group root, since
any user can be made a member; a search bit given by a POSIX ACL entry shows
in the mode's group bits (they are the ACL mask), and the reason names the
entry. A directory owned by another user is open to that user whatever its
mode (the owner can chmod it). Paths are resolved first: a symlink is judged
by where it leads. One closed directory anywhere above the path is enough.

Bind mounts are not followed: a directory bind-mounted elsewhere is judged
at the path given.

The module also makes the host layout (``COWFS_ROOT``: ``guests/``,
``store/``, ``state.db``) root-only: created with modes 0700 and 0600, and
repaired (chmod) when found open.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

from cowfs.errors import CowfsError

OVERRIDE_OPTION = "--allow-reachable"
_ACL_XATTR = "system.posix_acl_access"
_ACL_USER, _ACL_GROUP, _ACL_EXECUTE = 0x02, 0x08, 0x01
# Directories other software relies on: an error never advises closing them.
# fmt: off
_SHARED_DIRS = frozenset({
    "/", "/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/lib64", "/media", "/mnt", "/opt",
    "/proc", "/root", "/run", "/sbin", "/srv", "/sys", "/tmp", "/usr", "/usr/local", "/var",
    "/var/cache", "/var/lib", "/var/local", "/var/opt", "/var/tmp",
})
# fmt: on
_STATE_FILES = ("state.db", "state.db-wal", "state.db-shm", "state.db-journal")


def _acl_grants(path: str) -> list[str]:
    """Named users and groups a directory's access ACL lets search it (before the mask)."""
    try:
        raw = os.getxattr(path, _ACL_XATTR, follow_symlinks=False)
    except OSError:
        return []
    grants = []
    for offset in range(4, len(raw) - 7, 8):  # a u32 version, then (u16 tag, u16 perm, u32 id)
        tag, perm = int.from_bytes(raw[offset : offset + 2], "little"), raw[offset + 2]
        ident = int.from_bytes(raw[offset + 4 : offset + 8], "little")
        if perm & _ACL_EXECUTE and tag in (_ACL_USER, _ACL_GROUP):
            grants.append(f"{'user' if tag == _ACL_USER else 'group'} {ident}")
    return grants


def opening(directory: str) -> str | None:
    """Why host users other than root may search directory, or None if only root may."""
    st = os.stat(directory, follow_symlinks=False)
    mode = stat.S_IMODE(st.st_mode)
    if st.st_uid != 0:
        return f"is owned by uid {st.st_uid} (mode {mode:04o})"
    if mode & stat.S_IXOTH:
        return f"is mode {mode:04o}"
    if mode & stat.S_IXGRP:
        grants = _acl_grants(directory)
        if grants:
            return f"is mode {mode:04o} with an ACL letting {', '.join(grants)} search it"
        return f"is mode {mode:04o}: group {st.st_gid} may search it"
    return None


class Exposure:
    """A path host users can reach, and the directory nearest to it that lets them.

    (A plain class: a dataclass would cost every cowfs command ~1 ms to define.)
    """

    __slots__ = ("directory", "path", "why")

    def __init__(self, path: str, directory: str, why: str):
        self.path = path  # the real path
        self.directory = directory  # its parent: every directory above it is open too
        self.why = why  # what opening() said of that directory

    def __str__(self) -> str:
        return f"{self.directory} {self.why}: host users can reach {self.path}"

    @property
    def remedy(self) -> str:
        """What the admin should do, for an error message: never to close a shared directory."""
        if self.directory not in _SHARED_DIRS and os.stat(self.directory).st_uid == 0:
            return f"chmod 0700 {self.directory}"
        example = os.path.join(self.directory if self.directory != self.path else "/", "vservers")
        return f"move it into a directory only root may search (e.g. install -d -m 0700 {example})"


def exposure(path: str | os.PathLike[str]) -> Exposure | None:
    """How host users other than root can reach path, or None if a directory above keeps them out.

    path need not exist: a missing parent directory counts as closed, since
    cowfs creates missing parents with mode 0700 (make_private_dirs).
    """
    real = os.path.realpath(path)
    parents = [str(p) for p in Path(real).parents]
    if not parents:
        return Exposure(real, real, "is the root directory")
    if not os.path.isdir(parents[0]):
        return None
    openings = [opening(directory) for directory in parents]
    if None in openings:
        return None
    return Exposure(real, parents[0], str(openings[0]))


def refuse_reachable(what: str, path: str | os.PathLike[str], allow: bool) -> None:
    """A CowfsError if host users can reach path, unless allow; what names it ("template")."""
    if allow:
        return
    found = exposure(path)
    if found is not None:
        raise CowfsError(
            f"{what} {os.fspath(path)}: {found}; {found.remedy}"
            f" (or {OVERRIDE_OPTION}, which lets host users run its setuid files)"
        )


def make_private_dirs(directory: str | os.PathLike[str]) -> None:
    """Create directory and its missing parents, each with mode 0700 (a no-op if it exists)."""
    path = Path(directory)
    missing = []
    while not path.exists():
        missing.append(path)
        path = path.parent
    for new in reversed(missing):
        # Made meanwhile by another command? Then it is judged like any other.
        with contextlib.suppress(FileExistsError):
            os.mkdir(new, 0o700)


def _owned_by_root(path: Path) -> None:
    """A CowfsError if path (followed if a symlink) exists and belongs to another user.

    chmod would not keep that owner out, and a layout handed to a user is an
    admin's decision to undo, not cowfs's.
    """
    try:
        uid = os.stat(path).st_uid
    except FileNotFoundError:
        return
    if uid != 0:
        raise CowfsError(
            f"host layout {path}: owned by uid {uid}, who can reach every guest;"
            f" chown root:root {os.path.realpath(path)}"
        )


def _repair(path: Path, mode: int) -> str | None:
    """Make path (followed if a symlink) mode `mode` if others may use it; what was done."""
    real = os.path.realpath(path)
    try:
        old = stat.S_IMODE(os.stat(real).st_mode)
    except FileNotFoundError:
        return None
    if old & 0o077 == 0:
        return None
    os.chmod(real, mode)
    return f"{real} was mode {old:04o}, now {mode:04o}"


def secure_private_dir(directory: Path) -> list[str]:
    """Make directory (created if missing) root's alone, mode 0700; the repairs made.

    For cowfs's run and log directories: their records name guests' trees, and a
    mount's successor trusts its session journal (cowfs.serve.journal) there.
    Refused (CowfsError): a directory owned by another user.
    """
    _owned_by_root(directory)
    make_private_dirs(directory)
    repaired = _repair(directory, 0o700)
    return [repaired] if repaired else []


def secure_host_layout(root: Path) -> list[str]:
    """Make the host layout under root reachable by root only; the repairs made.

    root and root/guests are created (0700) if missing; root/store is left
    to the first hashify (an empty directory is not a store), but repaired
    like the state database and its WAL and SHM files when present.
    Symlinks are followed (an admin may keep the layout elsewhere); refused,
    before anything is changed (CowfsError): a part owned by another user.
    """
    parts = [(root / name, 0o700) for name in ("", "guests", "store")]
    parts += [(root / name, 0o600) for name in _STATE_FILES]
    for path, _mode in parts:
        _owned_by_root(path)
    make_private_dirs(root / "guests")
    done = [r for path, mode in parts if (r := _repair(path, mode)) is not None]
    if done:
        import logging  # here: only a repair needs it (~3 ms of every command's start)

        for repair in done:
            logging.getLogger(__name__).warning(
                "host layout: %s (host users could reach guests)", repair
            )
    return done


def create_private_file(path: Path) -> None:
    """Create path empty with mode 0600 if it is missing (sqlite gives its WAL the same mode)."""
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
