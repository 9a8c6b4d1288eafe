"""The FUSE operations: each a thin translation of a request into ``*at`` calls on backing fds.

Policy lives elsewhere: what an operation may allocate and what it costs
(cowfs.accounting.accountant), link breaking (cow.py), the reserved names and
attributes (marks.py). mount.serve builds the collaborators and hands them in:
the inode table (inodes.py), the open files (openfiles.py), directory listings
(listings.py), directory handles (unpatched.py). Handlers that cannot block
for long (metadata on a local filesystem) run on the event loop; data I/O
that may wait on the disk runs in worker threads, so no slow request stalls
the mount. Every OSError becomes the errno the caller sees; anything else is
logged and returned as EIO, never allowed to end the mount.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar, cast

import pyfuse3
import trio
from pyfuse3 import FUSEError

from cowfs.accounting.accountant import Accountant
from cowfs.serve.cow import LinkBreaker
from cowfs.serve.idmap import SAME_IDS, IdMap
from cowfs.serve.inodes import InodeTable, Node
from cowfs.serve.listings import Listings
from cowfs.serve.openfiles import OpenFiles
from cowfs.serve.passthrough import Passthrough
from cowfs.serve.privileges import kill_suidgid
from cowfs.serve.stats import RequestCounts
from cowfs.serve.unpatched import DirHandles
from cowfs.serve.uring import Ring
from cowfs.serve.workers import WorkerPool
from cowfs.tree.marks import fd_path, is_marked, is_reserved_name, is_reserved_xattr
from native import syscalls

log = logging.getLogger(__name__)

NAME_MAX = 255
# Reported as st_blksize: stdio and cp size their buffers by it, and every
# buffer is a round trip to this process, so ask for the largest FUSE write.
IO_BLOCK_SIZE = 128 * 1024
# Flags the kernel has already acted on, or that must not reach the backing open.
# O_APPEND too: the kernel already sends an appending write(2) at the end of the
# file it knows, and written at that offset it is the same when a successor does
# it again (a request resent after a server's death); appended, it would be twice.
_STRIP_OPEN_FLAGS = os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_NOFOLLOW | os.O_DIRECT | os.O_APPEND
_AT_FD = syscalls.AT_EMPTY_PATH | syscalls.AT_SYMLINK_NOFOLLOW

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def _errors_to_errno(handler: F) -> F:
    """Turn OSError into the errno the caller sees; log and map anything else to EIO."""

    kind = handler.__name__

    @functools.wraps(handler)
    async def wrapper(*args: Any) -> Any:
        counts: RequestCounts = args[0].counts
        counts.requests[kind] += 1
        began = time.perf_counter()
        try:
            return await handler(*args)
        except FUSEError:
            counts.errors[kind] += 1
            raise
        except OSError as e:
            counts.errors[kind] += 1
            raise FUSEError(e.errno or errno.EIO) from None
        except Exception:
            counts.errors[kind] += 1
            log.exception("%s%r failed", kind, args[1:])
            raise FUSEError(errno.EIO) from None
        finally:
            counts.took(kind, time.perf_counter() - began)

    return cast(F, wrapper)


def _kills_privileges(ctx: pyfuse3.RequestContext) -> bool:
    """Whether the kernel asks this request to kill the file's privileges (privileges.py).

    Never with a pyfuse3 older than cowfs's patch 10, which tells no request so.
    """
    return bool(getattr(ctx, "kill_suidgid", False))


def _check_new_name(name: bytes) -> None:
    """Refuse names a guest may not create: too long, or reserved by cowfs."""
    if len(name) > NAME_MAX:
        raise FUSEError(errno.ENAMETOOLONG)
    if is_reserved_name(name):
        raise FUSEError(errno.EPERM)


class CowFS(pyfuse3.Operations):
    """A guest root served from a backing tree, with copy-on-write for shared inodes."""

    supports_dot_lookup = False
    # File handles are the backing files' descriptors (see open): the patched pyfuse3
    # answers a read whose data is in the page cache without calling read().
    read_fh_directly = True
    enable_writeback_cache = False  # limits and quota must fail the write(2) itself
    enable_acl = True  # the kernel then checks POSIX ACLs too
    # The kernel then asks for no security.capability before each write: it flags
    # the writes, truncates and opens whose privilege kill is ours (privileges.py).
    handle_killpriv_v2 = True
    # A symlink never changes in place here (a new target is a new inode), so the
    # kernel may keep each one's target after the first READLINK: a booting
    # distribution resolves the same /etc/systemd and /lib links thousands of times.
    cache_symlinks = True

    def __init__(
        self,
        *,
        table: InodeTable,
        open_files: OpenFiles,
        passthrough: Passthrough,
        listings: Listings,
        dir_handles: DirHandles,
        breaker: LinkBreaker,
        acct: Accountant,
        workers: WorkerPool,
        disk: Ring | WorkerPool,
        cache_timeout: float = 60.0,
        after_init: Callable[[], None] | None = None,
        ids: IdMap = SAME_IDS,
    ):
        """The mount's collaborators, as mount.serve built them.

        disk: what reads, and writes that may wait, go to (io_uring, else the
        workers); after_init: run once the kernel has applied the INIT reply;
        ids: a user-namespaced guest's ids as the host sees them (idmap.py),
        mapped here, at the FUSE boundary, so that all else speaks tree ids.
        """
        super().__init__()
        self.table = table
        self.open_files = open_files
        self.passthrough = passthrough
        self.enable_passthrough = passthrough.wanted  # asked for at FUSE_INIT
        self.listings = listings
        self.dir_handles = dir_handles
        self.breaker = breaker
        self.acct = acct
        self.workers = workers
        self.disk = disk
        self.timeout = cache_timeout
        self._nowait_writes = True
        self.handler_reads = 0
        self.counts = RequestCounts()  # for monitoring (stats.py)
        self.after_init = after_init
        self.ids = ids
        self.session: pyfuse3.Session | None = None  # its FUSE connection, once mounted

    def init(self) -> None:
        """Schedule after_init."""
        # Called while the INIT request is answered: the kernel sets up the
        # connection (its read-ahead among it) when the reply is written, after
        # this returns, so after_init runs on the event loop's next pass.
        if self.after_init is None:
            return
        try:
            token = trio.lowlevel.current_trio_token()
        except RuntimeError:  # a replayed INIT (resume.py): the server calls it itself
            return
        token.run_sync_soon(self.after_init)

    # -- helpers ----------------------------------------------------------

    def _entry(self, node: Node, st: os.stat_result) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = node.nodeid
        e.generation = 0
        e.entry_timeout = self.timeout
        e.attr_timeout = self.timeout
        e.st_mode = st.st_mode
        e.st_nlink = st.st_nlink
        e.st_uid = self.ids.to_host(st.st_uid)
        e.st_gid = self.ids.to_host(st.st_gid)
        e.st_rdev = st.st_rdev
        e.st_size = st.st_size
        e.st_blksize = IO_BLOCK_SIZE
        e.st_blocks = st.st_blocks
        e.st_atime_ns = st.st_atime_ns
        e.st_mtime_ns = st.st_mtime_ns
        e.st_ctime_ns = st.st_ctime_ns
        return e

    def _negative_entry(self) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = 0  # cached "no such name" for entry_timeout
        e.entry_timeout = self.timeout
        return e

    def _uid(self, ctx: pyfuse3.RequestContext) -> int:
        """The caller's user id in the tree."""
        return self.ids.to_tree(ctx.uid)

    def _new_owner(self, parent: Node, ctx: pyfuse3.RequestContext) -> tuple[int, int]:
        """Owner of a new inode: the caller, with the group of a set-gid parent directory."""
        gid = self.ids.to_tree(ctx.gid)
        parent_st = os.fstat(parent.fd)
        if parent_st.st_mode & stat.S_ISGID:
            gid = parent_st.st_gid
        return self._uid(ctx), gid

    def _make(
        self,
        parent_inode: int,
        name: bytes,
        kind: int,
        ctx: pyfuse3.RequestContext,
        make: Callable[[int], None],
        data_bytes: int = 0,
    ) -> pyfuse3.EntryAttributes:
        """mkdir, mknod or symlink as root via make(dir_fd), then adopt the new inode."""
        _check_new_name(name)
        parent = self.table.get(parent_inode)
        uid, gid = self._new_owner(parent, ctx)
        with self.acct.new_inode(parent, self._uid(ctx), uid, gid, kind, data_bytes) as charge:
            make(parent.fd)
            fd, st = self._adopt(parent, name, kind, uid, gid)
            charge(st)
        self.listings.changed(parent)
        node = self.table.remember(fd, st, parent, name)
        return self._entry(node, st)

    def _adopt(
        self, parent: Node, name: bytes, kind: int, uid: int, gid: int
    ) -> tuple[int, os.stat_result]:
        """An O_PATH fd on the inode just made as parent/name, and its stat once given to uid:gid.

        The check guards against a guest swapping another file in under the
        name between the creation and the open: we only chown what we made.
        """
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent.fd)
        try:
            st = os.fstat(fd)
            if stat.S_IFMT(st.st_mode) != kind or st.st_uid != 0 or self.table.find(st):
                raise FUSEError(errno.EAGAIN)
            if (uid, gid) != (st.st_uid, st.st_gid):
                syscalls.fchownat(fd, b"", uid, gid, _AT_FD)
                st = os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise
        return fd, st

    # -- inodes -------------------------------------------------------------

    @_errors_to_errno
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        parent = self.table.get(parent_inode)
        if name == b"." or name == b"..":
            # Never resolve ".." on the host: above the guest root is the host.
            node = parent if name == b"." or parent.parent is None else parent.parent
            if self.table.by_nodeid.get(node.nodeid) is not node:
                node = self.table.root
            node.nlookup += 1
            return self._entry(node, os.fstat(node.fd))
        if len(name) > NAME_MAX:
            raise FUSEError(errno.ENAMETOOLONG)
        if is_reserved_name(name):
            return self._negative_entry()
        try:
            fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent.fd)
        except FileNotFoundError:
            return self._negative_entry()
        st = os.fstat(fd)
        node = self.table.remember(fd, st, parent, name)
        return self._entry(node, st)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for nodeid, count in inode_list:
            self.table.forget(nodeid, count)

    @_errors_to_errno
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = self.table.get(inode)
        return self._entry(node, os.fstat(node.fd))

    @_errors_to_errno
    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        node = self.table.get(inode)
        truncating_to_zero = fields.update_size and attr.st_size == 0
        # On a truncate only: a chown is flagged whoever calls, and needs nothing (privileges.py).
        kill = fields.update_size and _kills_privileges(ctx)
        if fields.update_size:
            self.passthrough.refuse_data_change(node)
        if (
            fields.update_size
            or fields.update_mode
            or fields.update_uid
            or fields.update_gid
            or fields.update_atime
            or fields.update_mtime
        ):
            await self.breaker.ensure_private(
                node, self._uid(ctx), with_data=not truncating_to_zero
            )
        if kill:
            kill_suidgid(node.fd, node.nodeid, ctx, self.ids, self.session)
        if fields.update_size:
            # Growing a file by truncate allocates nothing; its real change is charged.
            with self.acct.change(node):
                handle = self.open_files.get(fh)
                if handle is not None and handle.writable:
                    os.ftruncate(handle.fd, attr.st_size)
                else:
                    fd = os.open(fd_path(node.fd), os.O_WRONLY | os.O_CLOEXEC)
                    try:
                        os.ftruncate(fd, attr.st_size)
                    finally:
                        os.close(fd)
        if fields.update_mode:
            os.chmod(fd_path(node.fd), stat.S_IMODE(attr.st_mode))
        if fields.update_uid or fields.update_gid:
            uid = self.ids.to_tree(attr.st_uid) if fields.update_uid else -1
            gid = self.ids.to_tree(attr.st_gid) if fields.update_gid else -1
            with self.acct.chown(node, uid, gid):
                syscalls.fchownat(node.fd, b"", uid, gid, _AT_FD)
        if fields.update_atime or fields.update_mtime:
            syscalls.utimensat(
                node.fd,
                b"",
                attr.st_atime_ns if fields.update_atime else None,
                attr.st_mtime_ns if fields.update_mtime else None,
                syscalls.AT_EMPTY_PATH,
            )
        return self._entry(node, os.fstat(node.fd))

    @_errors_to_errno
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return os.readlink(b"", dir_fd=self.table.get(inode).fd)

    # -- directory entries ------------------------------------------------

    @_errors_to_errno
    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        return self._make(
            parent_inode,
            name,
            stat.S_IFMT(mode),
            ctx,
            lambda dir_fd: os.mknod(name, mode, rdev, dir_fd=dir_fd),
        )

    @_errors_to_errno
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        return self._make(
            parent_inode,
            name,
            stat.S_IFDIR,
            ctx,
            lambda dir_fd: os.mkdir(name, mode, dir_fd=dir_fd),
        )

    @_errors_to_errno
    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        return self._make(
            parent_inode,
            name,
            stat.S_IFLNK,
            ctx,
            lambda dir_fd: os.symlink(target, name, dir_fd=dir_fd),
            data_bytes=len(target),
        )

    @_errors_to_errno
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self._remove(parent_inode, name, os.unlink)

    @_errors_to_errno
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self._remove(parent_inode, name, os.rmdir)

    async def _remove(self, parent_inode: int, name: bytes, remove: Callable[..., None]) -> None:
        if len(name) > NAME_MAX:
            raise FUSEError(errno.ENAMETOOLONG)
        if is_reserved_name(name):
            raise FUSEError(errno.ENOENT)
        parent = self.table.get(parent_inode)
        st, node = self.table.child(parent, name)
        leaves = st is not None and self.acct.name_leaves(parent.fd, name, st)
        with self.acct.removing(parent):
            remove(name, dir_fd=parent.fd)
            self.listings.changed(parent)
            if node is not None:
                self.table.unlinked(node, parent, name)
            if st is not None and leaves:
                self.open_files.credit_removed(st, node)

    @_errors_to_errno
    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        if flags & ~(syscalls.RENAME_NOREPLACE | syscalls.RENAME_EXCHANGE):
            raise FUSEError(errno.EINVAL)
        if is_reserved_name(name_old):
            raise FUSEError(errno.ENOENT)
        _check_new_name(name_new)
        old_parent = self.table.get(parent_inode_old)
        new_parent = self.table.get(parent_inode_new)
        _, moving = self.table.child(old_parent, name_old)
        replaced_st, replaced = self.table.child(new_parent, name_new)
        exchanged = flags & syscalls.RENAME_EXCHANGE
        with self.acct.renaming(
            old_parent, new_parent, self._uid(ctx), adds_name=replaced_st is None
        ):
            leaves = (
                replaced_st is not None
                and not exchanged
                and self.acct.name_leaves(new_parent.fd, name_new, replaced_st)
            )
            syscalls.renameat2(old_parent.fd, name_old, new_parent.fd, name_new, flags)
            self.listings.changed(old_parent)
            self.listings.changed(new_parent)
            if replaced is not None:
                if exchanged:
                    self.table.renamed(replaced, old_parent, name_old)
                else:
                    self.table.unlinked(replaced, new_parent, name_new)
            if moving is not None:
                self.table.renamed(moving, new_parent, name_new)
            if leaves:
                assert replaced_st is not None
                self.open_files.credit_removed(replaced_st, replaced)

    @_errors_to_errno
    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        _check_new_name(new_name)
        node = self.table.get(inode)
        new_parent = self.table.get(new_parent_inode)
        with self.acct.new_name(new_parent, self._uid(ctx)):
            os.link(fd_path(node.fd), new_name, dst_dir_fd=new_parent.fd, follow_symlinks=True)
            self.listings.changed(new_parent)
        node.nlookup += 1
        self.table.linked(node, new_parent, new_name)
        return self._entry(node, os.fstat(node.fd))

    # -- files ------------------------------------------------------------

    @_errors_to_errno
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = self.table.get(inode)
        backing_flags = (flags & ~_STRIP_OPEN_FLAGS) | os.O_CLOEXEC
        if (flags & os.O_ACCMODE) != os.O_RDONLY or flags & os.O_TRUNC:
            backing_id = self.passthrough.backing_for_writer(node)
            if not backing_id:
                await self.breaker.ensure_private(
                    node, self._uid(ctx), with_data=not flags & os.O_TRUNC
                )
            if _kills_privileges(ctx):  # O_TRUNC
                kill_suidgid(node.fd, node.nodeid, ctx, self.ids, self.session)
        else:
            if is_marked(node.fd):
                backing_flags |= os.O_NOATIME  # reading must not touch the shared inode
            backing_id = self.passthrough.backing_for_reader(
                node,
                other_opens=self.open_files.has_served_opens(node),
                breaking=node.break_lock is not None,
            )
        try:
            if flags & os.O_TRUNC:
                with self.acct.change(node):
                    fd = self.table.open_with_room(fd_path(node.fd), backing_flags)
            else:
                fd = self.table.open_with_room(fd_path(node.fd), backing_flags)
        except BaseException:
            if backing_id:
                self.passthrough.forsake(node)
            raise
        handle = self.open_files.add(fd, node, backing_flags, self._uid(ctx), backing_id)
        if backing_id:
            # No FLUSH at close(2): the kernel needs this server only for the release. A
            # writer's write(2)s still come here (direct I/O): limits and quota apply.
            return pyfuse3.FileInfo(
                fh=handle.fh, backing_id=backing_id, noflush=True, direct_io=handle.writable
            )
        return pyfuse3.FileInfo(
            fh=handle.fh,
            keep_cache=self.passthrough.may_keep_cache(node),
            direct_io=bool(flags & os.O_DIRECT),
        )

    @_errors_to_errno
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        _check_new_name(name)
        parent = self.table.get(parent_inode)
        backing_flags = (flags & ~_STRIP_OPEN_FLAGS) | os.O_CLOEXEC
        uid, gid = self._new_owner(parent, ctx)
        try:
            with self.acct.new_inode(parent, self._uid(ctx), uid, gid, stat.S_IFREG) as charge:
                fd, path_fd, st = self._create_file(parent, name, backing_flags, mode, uid, gid)
                charge(st)
        except FileExistsError:
            # Only the exclusive open can raise it: nothing was made, nothing charged.
            if flags & os.O_EXCL:
                raise
            entry = await self.lookup(parent_inode, name, ctx)
            return await self.open(entry.st_ino, flags & ~os.O_CREAT, ctx), entry
        self.listings.changed(parent)
        node = self.table.remember(path_fd, st, parent, name)
        handle = self.open_files.add(fd, node, backing_flags, self._uid(ctx))
        info = pyfuse3.FileInfo(fh=handle.fh, keep_cache=True, direct_io=bool(flags & os.O_DIRECT))
        return info, self._entry(node, st)

    def _create_file(
        self, parent: Node, name: bytes, flags: int, mode: int, uid: int, gid: int
    ) -> tuple[int, int, os.stat_result]:
        """Create parent/name (open with flags) for uid:gid; the open fd, an O_PATH fd, its stat."""
        fd = self.table.open_with_room(
            name,
            flags | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
            stat.S_IMODE(mode),
            dir_fd=parent.fd,
        )
        try:
            if (uid, gid) != (0, 0):
                os.fchown(fd, uid, gid)
            st = os.fstat(fd)
            path_fd = os.open(fd_path(fd), os.O_PATH | os.O_CLOEXEC)
        except BaseException:
            os.close(fd)
            raise
        return fd, path_fd, st

    @_errors_to_errno
    async def read(self, fh: int, off: int, size: int) -> memoryview:  # type: ignore[override]
        # pyfuse3 takes any buffer here, and a view saves copying the data once more.
        self.handler_reads += 1
        fd = self.open_files[fh].fd
        buf = bytearray(size)
        view = memoryview(buf)
        try:
            # pyfuse3 has found the data not (or only partly) cached, but it may be
            # by now: served on the event loop if so; a read that would wait for
            # the disk goes to io_uring or a worker thread.
            got = os.preadv(fd, [view], off, os.RWF_NOWAIT)
        except (BlockingIOError, InterruptedError):
            got = 0
        if got < size and (got == 0 or off + got < os.fstat(fd).st_size):
            while got < size:
                more = await self.disk.readinto(fd, view[got:], off + got)
                if more == 0:
                    break
                got += more
        return view[:got]

    @_errors_to_errno
    async def write(
        self, fh: int, off: int, buf: bytes, ctx: pyfuse3.RequestContext | None = None
    ) -> int:
        handle = self.open_files[fh]
        fd = handle.fd
        if ctx is not None and _kills_privileges(ctx):
            kill_suidgid(fd, handle.node.nodeid, ctx, self.ids, self.session)
        with self.acct.writing(handle, handle.uid, off, len(buf)):
            written = 0
            if self._nowait_writes:
                try:
                    written = os.pwritev(fd, [buf], off, os.RWF_NOWAIT)
                except BlockingIOError:
                    pass
                except OSError as e:
                    if e.errno != errno.EOPNOTSUPP:
                        raise
                    self._nowait_writes = False
            if written < len(buf):
                # Only the rest, at its own offset.
                rest = memoryview(buf)[written:]
                written += await self.disk.write(fd, rest, off + written)
        return written

    @_errors_to_errno
    async def fallocate(self, fh: int, mode: int, offset: int, length: int) -> None:
        handle = self.open_files[fh]
        with self.acct.allocating(handle, handle.uid, mode, offset, length):
            await self.workers.run(syscalls.fallocate, handle.fd, mode, offset, length)

    async def flush(self, fh: int) -> None:
        # Writes reach the backing file synchronously, so close(2) has nothing
        # to report: ENOSYS tells the kernel to stop sending FLUSH (a round
        # trip per close saved).
        raise FUSEError(errno.ENOSYS)

    @_errors_to_errno
    async def release(self, fh: int) -> None:
        self.open_files.release(fh)

    @_errors_to_errno
    async def fsync(self, fh: int, datasync: bool) -> None:
        sync = os.fdatasync if datasync else os.fsync
        await self.workers.run(sync, self.open_files[fh].fd)

    # -- directories ------------------------------------------------------

    @_errors_to_errno
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        # Declined with the patched pyfuse3: the kernel then caches listings.
        return self.dir_handles.open(inode)

    @_errors_to_errno
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        # Offsets are the backing directory's own (cowfs/serve/listings.py).
        directory = self.table.get(self.dir_handles.listed(fh, token))
        stream = self.listings.at(directory, start_id)
        dev = os.fstat(directory.fd).st_dev
        replied = False
        for name, ino, next_offset in stream.entries():
            if name == b"." or name == b"..":
                # Never the host's "..": above the guest root is the host.
                dot = directory if name == b"." else directory.parent or directory
                entry = self._entry(dot, os.fstat(dot.fd))
                if not pyfuse3.readdir_reply(token, name, entry, next_offset):
                    return
                replied = True
                continue
            if is_reserved_name(name):
                continue
            listed = self.table.listed(directory, dev, name, ino)
            if listed is None:
                continue
            node, st, new = listed
            if not pyfuse3.readdir_reply(token, name, self._entry(node, st), next_offset):
                if new:
                    self.table.drop(node)
                return
            node.nlookup += 1
            replied = True
        if not replied:
            # At the end (the kernel asks once more after the last entries): it
            # has the whole listing and caches it from here.
            self.listings.close(directory.nodeid)

    @_errors_to_errno
    async def releasedir(self, fh: int) -> None:
        nodeid = self.dir_handles.release(fh)
        if nodeid is not None:
            self.listings.close(nodeid)

    @_errors_to_errno
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        nodeid = self.dir_handles.synced(fh)
        if nodeid is None:
            # No handle says which directory: make the whole filesystem durable.
            await self.workers.run(syscalls.syncfs, self.table.mount_fd)
            return
        directory = self.table.get(nodeid)
        fd = self.table.open_with_room(fd_path(directory.fd), os.O_RDONLY | os.O_CLOEXEC)
        try:
            await self.workers.run(os.fsync, fd)
        finally:
            os.close(fd)

    @_errors_to_errno
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        sv = os.statvfs(self.table.root.fd)
        # The guest's limits (and the caller's quota), as VServer showed them.
        figures = self.acct.policy.statfs(sv, self._uid(ctx))
        data = pyfuse3.StatvfsData()
        data.f_bsize = sv.f_bsize
        data.f_frsize = sv.f_frsize
        data.f_blocks = figures.blocks
        data.f_bfree = figures.bfree
        data.f_bavail = figures.bavail
        data.f_files = figures.files
        data.f_ffree = figures.ffree
        data.f_favail = figures.favail
        data.f_namemax = NAME_MAX
        return data

    # -- extended attributes ----------------------------------------------

    @_errors_to_errno
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        if is_reserved_xattr(name):
            raise FUSEError(errno.ENODATA)
        value = os.getxattr(fd_path(self.table.get(inode).fd), name)
        return self.ids.xattr_to_host(name, value)

    @_errors_to_errno
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        names = os.listxattr(fd_path(self.table.get(inode).fd))
        return [n for n in map(os.fsencode, names) if not is_reserved_xattr(n)]

    @_errors_to_errno
    async def setxattr(
        self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        if is_reserved_xattr(name):
            raise FUSEError(errno.EPERM)
        node = self.table.get(inode)
        value = self.ids.xattr_to_tree(name, value)
        uid = self._uid(ctx)
        await self.breaker.ensure_private(node, uid)
        with self.acct.growth(node, uid, len(name) + len(value)):
            os.setxattr(fd_path(node.fd), name, value)

    @_errors_to_errno
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        if is_reserved_xattr(name):
            raise FUSEError(errno.EPERM)
        node = self.table.get(inode)
        await self.breaker.ensure_private(node, self._uid(ctx))
        with self.acct.change(node):
            os.removexattr(fd_path(node.fd), name)
