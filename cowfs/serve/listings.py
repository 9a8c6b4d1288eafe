"""Directory listings read from the backing directory as the kernel asks, in bounded memory.

The kernel lists a directory in READDIR requests (of up to 128 KiB here), each
starting at the offset the previous reply ended with. cowfs hands out the backing
directory's own offsets (getdents64's ``d_off``, the cookies telldir and
seekdir use), so any request can be answered from the backing directory by
seeking there: nothing of a listing has to be kept between requests, and the
backing filesystem gives what POSIX asks of readdir while names come and go
(a name present throughout is listed exactly once; one added or removed
meanwhile may or may not be).

A guest may start any number of listings and never finish them, and without
opendir the kernel never says when one ends. So only a few backing
directories being listed are kept open, each with the unread rest of its last
getdents64 batch (the entries read beyond what one reply could hold), in an
LRU of ``MAX_STREAMS``; a listing whose stream was evicted, or that resumes
at another offset, seeks there again.
"""

from __future__ import annotations

import os
import struct
from collections import OrderedDict
from collections.abc import Iterator

from cowfs.serve.inodes import InodeTable, Node
from cowfs.tree.marks import fd_path
from native import syscalls

# Directories being listed at once whose backing fd stays open. A listing
# beyond them costs a reopen and a seek (a few µs), never a wrong answer;
# every stream holds an fd and READ_BYTES.
MAX_STREAMS = 32
# One getdents64 batch: from ~30 entries of the longest names to ~340 of the
# shortest, a few system calls for a reply of 128 KiB, little read ahead for
# a listing that stops.
READ_BYTES = 8192

# A linux_dirent64: d_ino, d_off, d_reclen, then d_type and the NUL-terminated name.
_DIRENT = struct.Struct("<QqH")
_NAME_AT = _DIRENT.size + 1

Entry = tuple[bytes, int, int]  # name, backing inode number, offset of the next entry


class DirStream:
    """An open backing directory, positioned where its listing goes on."""

    __slots__ = ("_buffer", "_end", "_pos", "fd", "node", "offset")

    def __init__(self, node: Node, fd: int):
        self.node = node
        self.fd = fd
        self.offset = 0  # where the next entry not yet handed out lies
        self._buffer = bytearray(READ_BYTES)
        self._end = 0  # bytes of _buffer the last getdents64 filled
        self._pos = 0  # the next entry's record in _buffer

    def seek(self, offset: int) -> None:
        """Go on from offset (0, or an offset an entry gave), forgetting what was read ahead."""
        os.lseek(self.fd, offset, os.SEEK_SET)
        self.offset = offset
        self._end = self._pos = 0

    def entries(self) -> Iterator[Entry]:
        """The entries from offset on, "." and ".." among them, as the backing directory has them.

        An entry counts as handed out once the next one is asked for: a caller
        that stops after one (its reply was full) gets it again next time.
        """
        buffer = self._buffer
        while True:
            if self._pos >= self._end:
                self._end = syscalls.getdents(self.fd, buffer)
                self._pos = 0
                if self._end == 0:
                    return
            pos = self._pos
            ino, next_offset, length = _DIRENT.unpack_from(buffer, pos)
            name = bytes(buffer[pos + _NAME_AT : buffer.index(0, pos + _NAME_AT, pos + length)])
            yield name, ino, next_offset
            self._pos = pos + length
            self.offset = next_offset

    def close(self) -> None:
        """Close the backing directory."""
        os.close(self.fd)


class Listings:
    """The mount's open directory streams, at most MAX_STREAMS, least recently used evicted."""

    def __init__(self, table: InodeTable, capacity: int = MAX_STREAMS):
        self.table = table
        self.capacity = capacity
        self._streams: OrderedDict[int, DirStream] = OrderedDict()

    def __len__(self) -> int:
        return len(self._streams)

    def at(self, directory: Node, offset: int) -> DirStream:
        """directory's stream, positioned at offset (0 starts the listing afresh)."""
        stream = self._streams.get(directory.nodeid)
        if stream is not None and stream.node is directory:
            self._streams.move_to_end(directory.nodeid)
            if offset != stream.offset or offset == 0:
                stream.seek(offset)
            return stream
        self.close(directory.nodeid)
        fd = self.table.open_with_room(
            fd_path(directory.fd), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
        )
        stream = DirStream(directory, fd)
        try:
            if offset:
                stream.seek(offset)
        except BaseException:
            stream.close()
            raise
        self._streams[directory.nodeid] = stream
        if len(self._streams) > self.capacity:
            _, oldest = self._streams.popitem(last=False)
            oldest.close()
        return stream

    def close(self, nodeid: int) -> None:
        """Drop the stream of the directory with this node id, if there is one."""
        stream = self._streams.pop(nodeid, None)
        if stream is not None:
            stream.close()

    def changed(self, directory: Node) -> None:
        """directory's entries changed: no later request may be answered from an older batch."""
        if directory.nodeid in self._streams:
            self.close(directory.nodeid)
