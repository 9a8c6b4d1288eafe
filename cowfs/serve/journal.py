"""What a FUSE server leaves for a successor on the same FUSE session.

The kernel keeps a FUSE connection while any process holds its /dev/fuse fd
(contextd's supervisor keeps a copy), so a server that dies can be replaced
by a new one on the same session (resume.py). The kernel then goes on naming
inodes by the node ids and open files by the file handles the dead server
gave it; the new server must know what each stands for. The journal says so:

* ``nodes``: an append-only log of the node ids the kernel was given, each
  with the backing inode's file handle (name_to_handle_at) and the (parent,
  name) it was last reached by, which a link break needs; a rename, a new
  link or a link break appends the node again, a forget a record without a
  handle. When the log has grown to
  several times the table, it is rewritten from the table (``compact``).
* ``files``: one fixed-size slot per backing fd of an open file: its file
  handle (openfiles.py), node, open flags, opener and the backing id the
  kernel serves it from (passthrough.py), zeroed at its release.

Both live in the run directory (a tmpfs, root only): they need to outlive the
server, not the host. Writes are plain write(2)s to a tmpfs, a few
microseconds, made only when the kernel learns a new node or a name changes,
and at each open and release.
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from cowfs.host.barrier import make_private_dirs

log = logging.getLogger(__name__)

_NODE = struct.Struct("<QQHH")  # nodeid, parent's nodeid (0: none), len(handle), len(name)
# file handle, nodeid (0: free slot), open flags, opener, backing id (passthrough.py; 0: none)
_FILE = struct.Struct("<QQQIi")
_COMPACT_FLOOR = 1 << 16  # records written before a compaction is considered


@dataclass
class NodeRecord:
    """A node id as the last server knew it."""

    nodeid: int
    parent: int
    handle: bytes
    name: bytes | None


@dataclass
class FileRecord:
    """An open file as the last server knew it: its backing fd (the slot's number) and
    file handle (openfiles.py)."""

    fd: int
    fh: int
    nodeid: int
    flags: int
    uid: int
    backing_id: int = 0


def journal_dir(run_dir: Path, key: str) -> Path:
    """Where the journal of the mount with registry key ``key`` lives."""
    return run_dir / "sessions" / key


class Journal:
    """The writing side, kept by the serving process."""

    def __init__(self, directory: Path, fresh: bool):
        make_private_dirs(directory)
        self.directory = directory
        flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (os.O_TRUNC if fresh else 0)
        self._nodes = os.open(directory / "nodes", flags | os.O_APPEND, 0o600)
        self._files = os.open(directory / "files", flags, 0o600)
        self._written = 0

    def close(self) -> None:
        os.close(self._nodes)
        os.close(self._files)

    def node(self, nodeid: int, parent: int, handle: bytes, name: bytes | None) -> None:
        """Record what node id stands for now."""
        os.write(self._nodes, _pack_node(nodeid, parent, handle, name))
        self._written += 1

    def forgotten(self, nodeid: int) -> None:
        """Record that the kernel no longer knows node id (a record without a handle)."""
        os.write(self._nodes, _pack_node(nodeid, 0, b"", None))
        self._written += 1

    def needs_compaction(self, live: int) -> bool:
        """True if the log holds many more records than the table has nodes."""
        return self._written > max(_COMPACT_FLOOR, 4 * live)

    def compact(self, records: Iterable[NodeRecord]) -> None:
        """Rewrite the node log with only the records given (the table's nodes now)."""
        temporary = self.directory / "nodes.new"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        count = 0
        try:
            chunk = bytearray()
            for record in records:
                chunk += _pack_node(record.nodeid, record.parent, record.handle, record.name)
                count += 1
                if len(chunk) > 1 << 20:
                    os.write(fd, chunk)
                    chunk.clear()
            os.write(fd, chunk)
        finally:
            os.close(fd)
        os.replace(temporary, self.directory / "nodes")
        os.close(self._nodes)
        self._nodes = os.open(self.directory / "nodes", os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        self._written = count

    def opened(self, fd: int, fh: int, nodeid: int, flags: int, uid: int, backing_id: int) -> None:
        os.pwrite(self._files, _FILE.pack(fh, nodeid, flags, uid, backing_id), fd * _FILE.size)

    def released(self, fd: int) -> None:
        os.pwrite(self._files, bytes(_FILE.size), fd * _FILE.size)


def _pack_node(nodeid: int, parent: int, handle: bytes, name: bytes | None) -> bytes:
    name = name or b""
    return _NODE.pack(nodeid, parent, len(handle), len(name)) + handle + name


def read_nodes(directory: Path) -> dict[int, NodeRecord]:
    """The last record of each node id in the log (a torn last record is ignored)."""
    try:
        data = (directory / "nodes").read_bytes()
    except FileNotFoundError:
        return {}
    nodes: dict[int, NodeRecord] = {}
    offset = 0
    while offset + _NODE.size <= len(data):
        nodeid, parent, handle_len, name_len = _NODE.unpack_from(data, offset)
        end = offset + _NODE.size + handle_len + name_len
        if end > len(data):
            break
        handle = data[offset + _NODE.size : offset + _NODE.size + handle_len]
        name = data[offset + _NODE.size + handle_len : end] or None
        if handle:
            nodes[nodeid] = NodeRecord(nodeid, parent, handle, name)
        else:  # forgotten
            nodes.pop(nodeid, None)
        offset = end
    return nodes


def read_files(directory: Path) -> Iterator[FileRecord]:
    """The open files recorded."""
    try:
        data = (directory / "files").read_bytes()
    except FileNotFoundError:
        return
    for slot in range(len(data) // _FILE.size):
        fh, nodeid, flags, uid, backing_id = _FILE.unpack_from(data, slot * _FILE.size)
        if nodeid:
            yield FileRecord(slot, fh, nodeid, flags, uid, backing_id)
