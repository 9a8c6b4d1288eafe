"""POSIX behaviour of every operation through a cowfs mount (no sharing involved)."""

from __future__ import annotations

import errno
import os
import signal
import socket
import stat
import subprocess
import time
from pathlib import Path

import pytest
from conftest import run

from cowfs.host import registry
from cowfs.serve import stats
from native import syscalls


def as_user(
    uid: int, gid: int, script: str, cwd: Path | None = None, groups: tuple[int, ...] = ()
) -> subprocess.CompletedProcess[str]:
    """Run a shell script as uid:gid with supplementary groups (none by default).

    Its working directory (cwd) is entered as root first: a host user cannot
    reach a mount by path (the barrier), a guest's process starts inside it.
    """
    return subprocess.run(
        ["sh", "-c", script],
        user=uid,
        group=gid,
        extra_groups=list(groups),
        capture_output=True,
        text=True,
        cwd=cwd,
        check=False,
    )


def test_files_read_write_and_stat(mnt: Path, backing: Path) -> None:
    path = mnt / "f"
    path.write_bytes(b"hello world")
    assert (backing / "f").read_bytes() == b"hello world"
    assert path.read_bytes() == b"hello world"
    st, bst = path.stat(), (backing / "f").stat()
    assert (st.st_size, st.st_mode, st.st_uid, st.st_mtime_ns) == (
        bst.st_size,
        bst.st_mode,
        bst.st_uid,
        bst.st_mtime_ns,
    )
    assert st.st_ino == bst.st_ino  # node ids are the backing inode numbers
    with open(path, "r+b") as f:
        f.seek(6)
        f.write(b"WORLD")
    assert path.read_bytes() == b"hello WORLD"


def test_large_sparse_and_offsets(mnt: Path, backing: Path) -> None:
    path = mnt / "big"
    data = os.urandom(3 * 1024 * 1024 + 123)
    path.write_bytes(data)
    assert path.read_bytes() == data
    with open(path, "r+b") as f:
        f.seek(10 * 1024 * 1024)
        f.write(b"end")
    assert (backing / "big").stat().st_size == 10 * 1024 * 1024 + 3
    with open(path, "rb") as f:
        f.seek(5 * 1024 * 1024)
        assert f.read(4) == b"\0\0\0\0"
    # a hole stays a hole in the backing file
    assert (backing / "big").stat().st_blocks * 512 < 5 * 1024 * 1024


def test_open_flags_excl_trunc_append(mnt: Path) -> None:
    path = mnt / "f"
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o640)
    os.write(fd, b"abc")
    os.close(fd)
    with pytest.raises(FileExistsError):
        os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o640)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    os.write(fd, b"def")
    os.close(fd)
    assert path.read_bytes() == b"abcdef"
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    os.close(fd)
    assert path.read_bytes() == b""
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


def test_create_honours_mode_umask_and_caller(mnt: Path, backing: Path) -> None:
    os.chmod(mnt, 0o777)
    result = as_user(1000, 1000, "umask 027; echo x > f; mkdir d; ln -s f l; mkfifo p", cwd=mnt)
    assert result.returncode == 0, result.stderr
    for name, mode in (("f", 0o640), ("d", 0o750), ("p", 0o640)):
        st = (backing / name).lstat()
        assert (st.st_uid, st.st_gid) == (1000, 1000), name
        assert stat.S_IMODE(st.st_mode) == mode, name
    assert (backing / "l").lstat().st_uid == 1000


def test_setgid_directory_gives_its_group(mnt: Path, backing: Path) -> None:
    shared = mnt / "shared"
    shared.mkdir()
    os.chown(shared, 0, 50)
    os.chmod(shared, 0o2777)
    result = as_user(1000, 1000, "echo x > shared/f; mkdir shared/d", cwd=mnt)
    assert result.returncode == 0, result.stderr
    assert (backing / "shared" / "f").stat().st_gid == 50
    assert (backing / "shared" / "d").stat().st_gid == 50
    assert (backing / "shared" / "d").stat().st_mode & stat.S_ISGID


def test_permissions_enforced_for_other_users(mnt: Path) -> None:
    secret = mnt / "secret"
    secret.write_text("top")
    os.chmod(secret, 0o600)
    os.chmod(mnt, 0o755)
    result = as_user(1000, 1000, "cat secret", cwd=mnt)
    assert result.returncode != 0 and "Permission denied" in result.stderr
    result = as_user(1000, 1000, "touch new", cwd=mnt)
    assert result.returncode != 0 and "Permission denied" in result.stderr
    os.chmod(secret, 0o644)
    assert as_user(1000, 1000, "cat secret", cwd=mnt).stdout == "top"


def test_chmod_chown_utimens(mnt: Path, backing: Path) -> None:
    path = mnt / "f"
    path.write_text("x")
    os.chmod(path, 0o4751)
    assert stat.S_IMODE((backing / "f").stat().st_mode) == 0o4751
    os.chown(path, 1234, 5678)
    st = (backing / "f").stat()
    assert (st.st_uid, st.st_gid) == (1234, 5678)
    os.utime(path, ns=(1_000_000_123, 2_000_000_456))
    st = (backing / "f").stat()
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_000_000_123, 2_000_000_456)
    # UTIME_OMIT for atime, UTIME_NOW for mtime
    fd = os.open(mnt, os.O_PATH)
    try:
        syscalls.utimensat(fd, b"f", None, None, 0)  # both omitted: a no-op
        before = time.time_ns()
        os.utime(path, ns=(1_000_000_123, before))
        subprocess.run(["touch", "-m", str(path)], check=True)
    finally:
        os.close(fd)
    st = (backing / "f").stat()
    assert st.st_atime_ns == 1_000_000_123
    assert st.st_mtime_ns >= before - 1_000_000_000


def test_lchown_and_symlink_times(mnt: Path, backing: Path) -> None:
    os.symlink("target", mnt / "l")
    os.chown(mnt / "l", 42, 43, follow_symlinks=False)
    os.utime(mnt / "l", ns=(5_000_000_000, 6_000_000_000), follow_symlinks=False)
    st = (backing / "l").lstat()
    assert (st.st_uid, st.st_gid, st.st_mtime_ns) == (42, 43, 6_000_000_000)
    assert os.readlink(mnt / "l") == "target"


def requests_served(mountpoint: Path) -> dict[str, int]:
    """The mount server's request counts by kind, published afresh (cowfs/serve/stats.py)."""
    where = os.path.realpath(mountpoint)
    before = stats.read(where).get("written")
    record = registry.read_record(where)
    assert record is not None
    os.kill(record.pid, signal.SIGHUP)  # publish now
    deadline = time.monotonic() + 10
    while (published := stats.read(where)).get("written") == before:
        assert time.monotonic() < deadline, "the server published no counts"
        time.sleep(0.01)
    counts = published["requests"]
    assert isinstance(counts, dict)
    return counts


def test_a_symlink_is_read_once_and_a_replaced_one_seen_at_once(mnt: Path) -> None:
    # A booting distribution resolves the same links thousands of times: the kernel
    # keeps a link's target after its first READLINK (FUSE_CAP_CACHE_SYMLINKS).
    os.symlink("first", mnt / "link")
    assert os.readlink(mnt / "link") == "first"
    served = requests_served(mnt).get("readlink", 0)
    assert served >= 1
    for _ in range(20):
        assert os.readlink(mnt / "link") == "first"
    assert requests_served(mnt).get("readlink", 0) == served
    # A link's target never changes in place: a new target is a new inode, seen at once.
    os.symlink("second", mnt / "link.new")
    os.rename(mnt / "link.new", mnt / "link")
    assert os.readlink(mnt / "link") == "second"
    os.unlink(mnt / "link")
    os.symlink("third", mnt / "link")
    assert os.readlink(mnt / "link") == "third"
    assert (mnt / "link").lstat().st_size == len("third")


def test_truncate(mnt: Path) -> None:
    path = mnt / "f"
    path.write_bytes(b"0123456789")
    os.truncate(path, 4)
    assert path.read_bytes() == b"0123"
    os.truncate(path, 8)
    assert path.read_bytes() == b"0123\0\0\0\0"
    with open(path, "r+b") as f:
        f.truncate(2)
    assert path.read_bytes() == b"01"


def test_mknod_fifo_socket_device(mnt: Path, backing: Path) -> None:
    os.mkfifo(mnt / "fifo", 0o600)
    assert stat.S_ISFIFO((backing / "fifo").lstat().st_mode)
    os.mknod(mnt / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    st = (backing / "null").lstat()
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(mnt / "sock"))
    finally:
        sock.close()
    assert stat.S_ISSOCK((backing / "sock").lstat().st_mode)
    # the mount is nodev by default: the device node cannot be opened
    with pytest.raises(PermissionError), open(mnt / "null", "rb"):
        pass


def test_fifo_works_through_mount(mnt: Path) -> None:
    os.mkfifo(mnt / "fifo")
    result = run("sh", "-c", f"(echo through > {mnt}/fifo &) ; cat {mnt}/fifo")
    assert result.stdout == "through\n"


def test_mkdir_rmdir_readdir(mnt: Path) -> None:
    (mnt / "d").mkdir()
    names = {f"n{i:04d}" for i in range(1500)}
    for name in names:
        (mnt / "d" / name).write_text(name)
    assert set(os.listdir(mnt / "d")) == names
    assert {".", ".."} <= set(run("ls", "-a", mnt / "d").stdout.split())
    with pytest.raises(OSError) as err:
        os.rmdir(mnt / "d")
    assert err.value.errno == errno.ENOTEMPTY
    for name in names:
        os.unlink(mnt / "d" / name)
    os.rmdir(mnt / "d")
    assert not (mnt / "d").exists()


def test_rename_plain_noreplace_exchange(mnt: Path, backing: Path) -> None:
    (mnt / "a").write_text("A")
    (mnt / "b").write_text("B")
    (mnt / "sub").mkdir()
    os.rename(mnt / "a", mnt / "sub" / "a2")
    assert (backing / "sub" / "a2").read_text() == "A"
    dirfd = os.open(mnt, os.O_PATH | os.O_DIRECTORY)
    try:
        with pytest.raises(FileExistsError):
            syscalls.renameat2(dirfd, b"b", dirfd, b"sub/a2", syscalls.RENAME_NOREPLACE)
        syscalls.renameat2(dirfd, b"b", dirfd, b"sub/a2", syscalls.RENAME_EXCHANGE)
    finally:
        os.close(dirfd)
    assert (mnt / "b").read_text() == "A"
    assert (mnt / "sub" / "a2").read_text() == "B"
    os.rename(mnt / "b", mnt / "sub" / "a2")  # replace
    assert (mnt / "sub" / "a2").read_text() == "A"
    assert not (mnt / "b").exists()


def test_hard_links_behave_as_hard_links(mnt: Path) -> None:
    (mnt / "a").write_text("one")
    os.link(mnt / "a", mnt / "b")
    sa, sb = (mnt / "a").stat(), (mnt / "b").stat()
    assert sa.st_ino == sb.st_ino and sa.st_nlink == 2
    with open(mnt / "b", "a") as f:
        f.write(" two")
    assert (mnt / "a").read_text() == "one two"
    os.unlink(mnt / "a")
    assert (mnt / "b").stat().st_nlink == 1


def test_nlink_zero_for_open_unlinked_file(mnt: Path) -> None:
    path = mnt / "f"
    path.write_text("x")
    fd = os.open(path, os.O_RDWR)
    try:
        os.unlink(path)
        assert os.fstat(fd).st_nlink == 0
        os.write(fd, b"still writable")
        assert os.pread(fd, 100, 0) == b"still writable"
    finally:
        os.close(fd)


def test_inode_numbers_stable(mnt: Path) -> None:
    path = mnt / "f"
    path.write_text("x")
    ino = path.stat().st_ino
    os.rename(path, mnt / "g")
    os.chmod(mnt / "g", 0o600)
    run("sh", "-c", "echo 3 > /proc/sys/vm/drop_caches")
    assert (mnt / "g").stat().st_ino == ino


def test_fsync_and_fdatasync(mnt: Path) -> None:
    fd = os.open(mnt / "f", os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        os.write(fd, b"durable")
        os.fsync(fd)
        os.fdatasync(fd)
    finally:
        os.close(fd)
    dfd = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def test_statfs_reports_backing(mnt: Path, backing: Path) -> None:
    a, b = os.statvfs(mnt), os.statvfs(backing)
    assert a.f_blocks * a.f_frsize == b.f_blocks * b.f_frsize
    assert a.f_namemax == 255


def test_name_too_long(mnt: Path) -> None:
    for op in (
        lambda p: p.write_text("x"),
        lambda p: p.mkdir(),
        lambda p: p.stat(),
        lambda p: os.symlink("x", p),
    ):
        with pytest.raises(OSError) as err:
            op(mnt / ("x" * 256))
        assert err.value.errno == errno.ENAMETOOLONG
    (mnt / ("y" * 255)).write_text("ok")


def test_xattrs_user_trusted_security(mnt: Path, backing: Path) -> None:
    path = mnt / "f"
    path.write_text("x")
    os.setxattr(path, "user.colour", b"blue")
    os.setxattr(path, "trusted.note", b"t")
    assert os.getxattr(path, "user.colour") == b"blue"
    assert os.getxattr(backing / "f", "trusted.note") == b"t"
    assert {"user.colour", "trusted.note"} <= set(os.listxattr(path))
    with pytest.raises(FileExistsError):
        os.setxattr(path, "user.colour", b"red", os.XATTR_CREATE)
    os.setxattr(path, "user.colour", b"red", os.XATTR_REPLACE)
    os.removexattr(path, "user.colour")
    with pytest.raises(OSError) as err:
        os.getxattr(path, "user.colour")
    assert err.value.errno == errno.ENODATA


def test_posix_acls(mnt: Path, backing: Path) -> None:
    path = mnt / "f"
    path.write_text("acl")
    os.chmod(path, 0o600)
    os.chmod(mnt, 0o755)
    run("setfacl", "-m", "u:1000:r", path)
    assert "user:1000:r--" in run("getfacl", "-cn", backing / "f").stdout
    # the kernel honours the ACL: uid 1000 may read, uid 1001 may not
    assert as_user(1000, 1000, "cat f", cwd=mnt).stdout == "acl"
    assert as_user(1001, 1001, "cat f", cwd=mnt).returncode != 0
    (mnt / "d").mkdir()
    run("setfacl", "-d", "-m", "u:1001:rwx", mnt / "d")
    (mnt / "d" / "child").write_text("x")
    assert "user:1001:rwx" in run("getfacl", "-cn", backing / "d" / "child").stdout


def test_unknown_errno_is_returned_not_fatal(mnt: Path) -> None:
    # EISDIR from the backing tree: passed on, and the mount keeps serving
    (mnt / "d").mkdir()
    with pytest.raises(IsADirectoryError):
        os.open(mnt / "d", os.O_WRONLY)
    with pytest.raises(OSError) as err:
        os.link(mnt / "d", mnt / "d2")
    assert err.value.errno == errno.EPERM
    (mnt / "after").write_text("still alive")
    assert (mnt / "after").read_text() == "still alive"


def test_non_root_user_works_in_own_home(mnt: Path, backing: Path) -> None:
    home = mnt / "home"
    home.mkdir()
    os.chown(home, 1000, 1000)
    script = (
        "set -e; cd -P home; echo data > a; cat a >/dev/null; cp a b; mv b c; ln c d;"
        " mkdir sub; mv a sub/; chmod 600 c; ln -s c e; rm d; ls -la >/dev/null;"
        " printf 'x' >> c; touch -d '2001-01-01' c; rm -r sub"
    )
    result = as_user(1000, 1000, script, cwd=mnt)
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(backing / "home")) == ["c", "e"]
    assert (backing / "home" / "c").read_text() == "data\nx"
    assert (backing / "home" / "c").stat().st_uid == 1000


def test_fallocate_modes(mnt: Path, backing: Path) -> None:
    path = mnt / "f"
    path.write_bytes(b"a" * 65536)
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, 1 << 20)  # plain allocation grows the file
        assert os.fstat(fd).st_size == 1 << 20
        syscalls.fallocate(fd, 0x01, 0, 4 << 20)  # FALLOC_FL_KEEP_SIZE
        assert os.fstat(fd).st_size == 1 << 20
        assert (backing / "f").stat().st_blocks * 512 >= 4 << 20
        syscalls.fallocate(fd, 0x01 | 0x02, 4096, 8192)  # PUNCH_HOLE | KEEP_SIZE
        assert os.pread(fd, 8192, 4096) == b"\0" * 8192
        assert os.pread(fd, 4096, 0) == b"a" * 4096
    finally:
        os.close(fd)
