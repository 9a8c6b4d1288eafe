"""The content store: one COW-marked inode per unique content + metadata, hard-linked by guests.

Layout (docs/design.md, "Host layout")::

    store/.cowfs-store.json        {"format": 1, "hash": "blake3"}
    store/ab/abcdef…-0123456789abcdef
          ^^ content hash (hex)   ^^ hash of the metadata that must match

The content hash is BLAKE3 (256 bits) for new stores: cryptographic, so one
guest cannot make a file that collides with another's, and about 2.5 times as
fast as sha256 here; stores made before it keep sha256, recorded in their
``.cowfs-store.json``.

An entry's name says what its content hashes to (``verify`` re-hashes and
compares) and which metadata it carries: two files share an inode only if
size, mode, owner, extended attributes and (unless hashify is told to
ignore it) mtime are all equal, so a guest's view never changes.

Entries appear atomically (link(2) gives the complete inode its entry's
name in one step, and fails if the name exists) and are marked before they
are linked: a store inode is never unmarked, so no mount ever writes to one
in place. Their mark's value is ``STORE_MARK``: accounting then knows one of
the inode's links is the store's, not another guest's. Entries of stores
made before that value existed are given it by the next ``hashify`` or
``store gc`` (``"store_mark": true`` in ``.cowfs-store.json`` says it is done).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import stat
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import blake3

from cowfs.atomicfile import write_atomically
from cowfs.errors import CowfsError
from cowfs.host.barrier import make_private_dirs
from cowfs.host.paths import state_root
from cowfs.tree.marks import STORE_MARK, fd_path, is_reserved_name, mark_of, set_mark
from cowfs.tree.metadata import read_xattrs

FORMAT = 1
HASH = "blake3"  # what new stores use
HASHES: dict[str, Callable[..., Any]] = {"blake3": blake3.blake3, "sha256": hashlib.sha256}
META_FILE = ".cowfs-store.json"
_READ_CHUNK = 1 << 20

MetaKey = tuple[int, int, int, int, int | None, tuple[tuple[bytes, bytes], ...]]


def default_store() -> Path:
    """The host layout's content store."""
    return state_root() / "store"


def meta_key(st: os.stat_result, xattrs: dict[bytes, bytes], with_mtime: bool) -> MetaKey:
    """What two files must agree on, besides content, to share one inode."""
    return (
        st.st_size,
        st.st_mode,
        st.st_uid,
        st.st_gid,
        st.st_mtime_ns if with_mtime else None,
        tuple(sorted(xattrs.items())),
    )


def meta_digest(key: MetaKey) -> str:
    """The metadata part of an entry's name."""
    return hashlib.sha256(repr(key).encode()).hexdigest()[:16]


_buffers = threading.local()


def hash_fd(fd: int, size_hint: int = _READ_CHUNK, algorithm: str = HASH) -> str:
    """The content hash of an open file (read from its start) with a store's algorithm."""
    digest = HASHES[algorithm]()
    view = getattr(_buffers, "view", None)
    if view is None:
        # One buffer per thread, even for small files: a new bytes object per
        # read cost more than the read (pread 5 us, preadv into this 2 us).
        view = _buffers.view = memoryview(bytearray(_READ_CHUNK))
    offset = 0
    while True:
        got = os.preadv(fd, [view], offset)
        if not got:
            return digest.hexdigest()
        digest.update(view[:got])
        offset += got
        if got < _READ_CHUNK and offset <= size_hint < _READ_CHUNK:
            return digest.hexdigest()  # a file as short as expected: the short read was its end


@dataclass
class StoreEntry:
    """An inode in the store."""

    name: str
    st: os.stat_result
    content_hash: str

    @property
    def rel(self) -> str:
        """Path relative to the store root."""
        return f"{self.name[:2]}/{self.name}"


class Store:
    """A content store directory."""

    def __init__(self, root: Path, algorithm: str = HASH, store_marks: bool = True):
        self.root = root
        self.algorithm = algorithm
        self.store_marks = store_marks  # every entry's mark is STORE_MARK
        self._subdir_fds: dict[str, int] = {}

    @classmethod
    def open(cls, root: Path, create: bool) -> Store:
        """Open (or, with create, make) the store at root; a CowfsError if it is not one."""
        meta = root / META_FILE
        if not root.exists():
            if not create:
                raise CowfsError(f"store {root}: does not exist")
            make_private_dirs(root)
        if not root.is_dir():
            raise CowfsError(f"store {root}: not a directory")
        if meta.exists():
            try:
                info = json.loads(meta.read_text())
            except (OSError, ValueError) as e:
                raise CowfsError(f"store {root}: unreadable {META_FILE}: {e}") from None
            algorithm = info.get("hash") if isinstance(info, dict) else None
            if algorithm not in HASHES or info.get("format") != FORMAT:
                raise CowfsError(
                    f"store {root}: format {info} is not {FORMAT} with one of {sorted(HASHES)}"
                )
            return cls(root, algorithm, info.get("store_mark") is True)
        if create:
            if any(not n.startswith(".") for n in os.listdir(root)):
                raise CowfsError(f"store {root}: not empty and not a cowfs store")
            cls(root)._write_meta()
        else:
            raise CowfsError(f"store {root}: not a cowfs store (no {META_FILE})")
        return cls(root)

    def _write_meta(self) -> None:
        info = {"format": FORMAT, "hash": self.algorithm, "store_mark": self.store_marks}
        write_atomically(self.root / META_FILE, json.dumps(info) + "\n", durable=True)

    def give_entries_store_marks(self) -> int:
        """Give every entry the store's mark value, once per store; how many needed it.

        A store made before the value existed marked its entries as clone does:
        a guest's scan would count the store's link as another guest's.
        """
        if self.store_marks:
            return 0
        changed = 0
        for entry in self.entries():
            fd = self._open_entry(entry)
            try:
                if mark_of(fd) != STORE_MARK:
                    set_mark(fd, STORE_MARK)
                    changed += 1
            finally:
                os.close(fd)
        self.store_marks = True
        self._write_meta()
        return changed

    def entries(self) -> Iterator[StoreEntry]:
        """Every entry, with its stat (leftover temporaries are skipped)."""
        for sub in sorted(os.listdir(self.root)):
            subdir = self.root / sub
            if len(sub) != 2 or not subdir.is_dir():
                continue
            for name in os.listdir(subdir):
                if is_reserved_name(os.fsencode(name)):
                    continue
                with contextlib.suppress(FileNotFoundError):
                    st = os.lstat(subdir / name)
                    if stat.S_ISREG(st.st_mode):
                        yield StoreEntry(name, st, name.partition("-")[0])

    def sweep_temporaries(self) -> int:
        """Remove temporaries a killed run left in the store."""
        removed = 0
        for sub in os.listdir(self.root):
            subdir = self.root / sub
            if len(sub) == 2 and subdir.is_dir():
                for name in os.listdir(subdir):
                    if is_reserved_name(os.fsencode(name)):
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(subdir / name)
                            removed += 1
        return removed

    def hash_fd(self, fd: int, size_hint: int = _READ_CHUNK) -> str:
        """The content hash of an open file, as this store names entries."""
        return hash_fd(fd, size_hint, self.algorithm)

    def hash_bytes(self, content: bytes | memoryview) -> str:
        """The content hash of a file's whole content, as this store names entries."""
        return str(HASHES[self.algorithm](content).hexdigest())

    def path_of(self, entry_name: str) -> Path:
        """Host path of an entry."""
        return self.root / entry_name[:2] / entry_name

    def _open_entry(self, entry: StoreEntry) -> int:
        return os.open(self.path_of(entry.name), os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)

    def xattrs_of(self, entry: StoreEntry) -> dict[bytes, bytes] | None:
        """An entry's extended attributes (without cowfs's own); None if it is gone."""
        try:
            fd = self._open_entry(entry)
        except FileNotFoundError:
            return None
        try:
            return read_xattrs(fd)
        finally:
            os.close(fd)

    def subdir_fd(self, prefix: str) -> int:
        """An O_PATH fd on a subdirectory of the store (made if missing), kept until close()."""
        fd = self._subdir_fds.get(prefix)
        if fd is None:
            subdir = self.root / prefix
            subdir.mkdir(mode=0o700, exist_ok=True)
            fd = self._subdir_fds[prefix] = os.open(
                subdir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
            )
        return fd

    def close(self) -> None:
        """Release the directory fds add() keeps."""
        for fd in self._subdir_fds.values():
            os.close(fd)
        self._subdir_fds.clear()

    def add(self, fd: int, content_hash: str, xattrs: dict[bytes, bytes]) -> StoreEntry:
        """Make the inode behind fd (O_PATH) a store entry: mark it, then link it in.

        xattrs (without cowfs's own) are what the caller read when hashing.
        """
        st = os.fstat(fd)
        name = f"{content_hash}-{meta_digest(meta_key(st, xattrs, with_mtime=True))}"
        dir_fd = self.subdir_fd(name[:2])
        # Before the link: a store inode is never unmarked, and a mount that
        # sees the link sees it as the store's.
        set_mark(fd, STORE_MARK)
        # link(2) makes the name atomically, on a complete inode: no temporary needed.
        os.link(fd_path(fd), name.encode(), dst_dir_fd=dir_fd, follow_symlinks=True)
        return StoreEntry(name, os.fstat(fd), content_hash)

    def gc(self, dry_run: bool) -> tuple[int, int]:
        """Remove entries no guest links any more; (entries, bytes) removed (or removable)."""
        removed = freed = 0
        if not dry_run:
            self.give_entries_store_marks()
        for entry in self.entries():
            if entry.st.st_nlink == 1:
                if not dry_run:
                    try:
                        os.unlink(self.path_of(entry.name))
                    except FileNotFoundError:
                        continue
                removed += 1
                freed += entry.st.st_blocks * 512
        if not dry_run:
            self.sweep_temporaries()
        return removed, freed

    def verify(self) -> Iterator[tuple[StoreEntry, str]]:
        """Entries whose content or metadata no longer matches their name, with the reason."""
        for entry in self.entries():
            path = self.path_of(entry.name)
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NOATIME | os.O_CLOEXEC)
            except OSError as e:
                if e.errno == errno.ENOENT:
                    continue
                yield entry, f"unreadable: {e.strerror}"
                continue
            try:
                mark = mark_of(fd)
                if mark is None:
                    yield entry, "COW mark missing"
                elif mark != STORE_MARK and self.store_marks:
                    yield entry, "COW mark not the store's"
                actual = self.hash_fd(fd)
                if actual != entry.content_hash:
                    yield entry, f"content hashes to {actual}"
                key = meta_key(os.fstat(fd), read_xattrs(fd), with_mtime=True)
                if meta_digest(key) != entry.name.partition("-")[2]:
                    yield entry, "metadata changed"
            finally:
                os.close(fd)

    def size(self) -> tuple[int, int]:
        """(entries, bytes on disk) of the store."""
        count = total = 0
        for entry in self.entries():
            count += 1
            total += entry.st.st_blocks * 512
        return count, total
