"""Copy-on-write: writes through one guest's mount never reach the template or another guest."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Mounts, cowfs, have, is_marked, run, snapshot


@pytest.fixture
def guests(tmp_path: Path, guest_tree: Path, mounts: Mounts) -> tuple[Path, Path, Path, Path]:
    """(template, guest A's backing, guest B's backing, A's mountpoint) with sample files."""
    template = guest_tree
    (template / "etc" / "config").write_text("setting=1\nother=2\n")
    os.chmod(template / "etc" / "config", 0o640)
    os.chown(template / "etc" / "config", 33, 50)  # not root's: a copy must keep its owner
    os.setxattr(template / "etc" / "config", "user.origin", b"template")
    (template / "usr" / "lib").mkdir(parents=True, exist_ok=True)
    (template / "usr" / "lib" / "libbig.so").write_bytes(os.urandom(2 * 1024 * 1024))
    os.chown(template / "usr" / "lib" / "libbig.so", 1000, 1000)
    os.utime(template / "usr" / "lib" / "libbig.so", ns=(1_500_000_000_000_000_000,) * 2)
    a, b = tmp_path / "a", tmp_path / "b"
    cowfs("clone", template, a)
    cowfs("clone", template, b)
    mnt = mounts.mount(a, tmp_path / "mnt-a")
    return template, a, b, mnt


MODIFICATIONS: dict[str, Callable[[Path], object]] = {
    "append": lambda m: run("sh", "-c", f"echo more >> {m}/etc/config"),
    "overwrite-in-place": lambda m: _pwrite(m / "usr/lib/libbig.so", b"PATCH", 4096),
    "truncate": lambda m: os.truncate(m / "usr/lib/libbig.so", 100),
    "truncate-to-zero": lambda m: os.truncate(m / "etc/config", 0),
    "chmod": lambda m: os.chmod(m / "etc/config", 0o600),
    "chown": lambda m: os.chown(m / "etc/config", 1000, 1000),
    "utimens": lambda m: os.utime(m / "etc/config", ns=(1, 2)),
    "setxattr": lambda m: os.setxattr(m / "etc/config", "user.origin", b"guest"),
    "removexattr": lambda m: os.removexattr(m / "etc/config", "user.origin"),
    "sed -i": lambda m: run("sed", "-i", "s/setting=1/setting=9/", m / "etc/config"),
    "cp over": lambda m: run("cp", "/etc/hostname", m / "etc/config"),
    "open O_TRUNC": lambda m: os.close(os.open(m / "etc/config", os.O_WRONLY | os.O_TRUNC)),
    "open O_RDWR": lambda m: _pwrite(m / "etc/config", b"X", 0),
    "busybox sh": lambda m: run("chroot", m, "/bin/sh", "-c", "echo guest >> /etc/config"),
}


def _pwrite(path: Path, data: bytes, offset: int) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


@pytest.mark.parametrize("name", sorted(MODIFICATIONS))
def test_modification_stays_private(name: str, guests: tuple[Path, Path, Path, Path]) -> None:
    template, a, b, mnt = guests
    before_template, before_b = snapshot(template), snapshot(b)
    before_a = snapshot(mnt)
    MODIFICATIONS[name](mnt)
    after_a = snapshot(mnt)
    changed = [k for k in after_a if after_a[k] != before_a.get(k)]
    assert changed, f"{name}: guest A does not see its own change"
    assert snapshot(template) == before_template, f"{name}: the template changed"
    assert snapshot(b) == before_b, f"{name}: guest B changed"
    for rel in changed:
        if (a / rel).is_file() and not (a / rel).is_symlink():
            assert not is_marked(a / rel), f"{rel}: A's private copy still carries the mark"
            copy, shared = (a / rel).stat(), (template / rel).stat()
            assert copy.st_ino != shared.st_ino
            assert is_marked(template / rel), f"{rel}: the shared inode lost its mark"
            # What the modification did not touch, the private copy kept.
            if name != "chown":
                assert (copy.st_uid, copy.st_gid) == (shared.st_uid, shared.st_gid), rel
            if name != "chmod":
                assert copy.st_mode == shared.st_mode, rel
    assert after_a == snapshot(a), "the mount and its backing tree disagree"


def test_tar_extract_over_shared_files(
    guests: tuple[Path, Path, Path, Path], tmp_path: Path
) -> None:
    template, _a, b, mnt = guests
    before_template, before_b = snapshot(template), snapshot(b)
    src = tmp_path / "src" / "etc"
    src.mkdir(parents=True)
    (src / "config").write_text("from tar\n")
    archive = tmp_path / "x.tar"
    run("tar", "cf", archive, "-C", tmp_path / "src", "etc")
    run("tar", "xf", archive, "-C", mnt)
    run("tar", "xf", archive, "--overwrite", "-C", mnt)
    assert (mnt / "etc" / "config").read_text() == "from tar\n"
    assert snapshot(template) == before_template
    assert snapshot(b) == before_b


def test_copy_keeps_content_metadata_and_xattrs(guests: tuple[Path, Path, Path, Path]) -> None:
    template, a, _b, mnt = guests
    lib = "usr/lib/libbig.so"
    os.setxattr(template / lib, "security.capability", _cap_net_raw())
    os.setxattr(template / lib, "user.keep", b"me")
    os.chmod(template / lib, 0o4755)
    fd = os.open(mnt / lib, os.O_WRONLY)  # break without changing anything
    os.close(fd)
    src, dst = (template / lib).stat(), (a / lib).stat()
    assert (a / lib).read_bytes() == (template / lib).read_bytes()
    assert (dst.st_mode, dst.st_uid, dst.st_gid, dst.st_mtime_ns, dst.st_atime_ns) == (
        src.st_mode,
        src.st_uid,
        src.st_gid,
        src.st_mtime_ns,
        src.st_atime_ns,
    )
    assert os.getxattr(a / lib, "security.capability") == _cap_net_raw()
    assert os.getxattr(a / lib, "user.keep") == b"me"
    assert dst.st_ino != src.st_ino and not is_marked(a / lib)


def _cap_net_raw() -> bytes:
    # vfs_cap_data revision 2, permitted = CAP_NET_RAW (13), effective bit set.
    import struct

    return struct.pack("<IIIII", 0x02000001, 1 << 13, 0, 0, 0)


def test_sparse_file_stays_sparse(guests: tuple[Path, Path, Path, Path]) -> None:
    template, a, _b, mnt = guests
    with open(template / "sparse", "wb") as f:
        f.seek(64 * 1024 * 1024)
        f.write(b"tail")
    cowfs("umount", mnt)
    cowfs("clone", template, a.parent / "c")
    (a.parent / "mc").mkdir()
    cowfs("mount", a.parent / "c", a.parent / "mc")
    try:
        with open(a.parent / "mc" / "sparse", "r+b") as f:
            f.write(b"head")
        st = (a.parent / "c" / "sparse").stat()
        assert st.st_size == 64 * 1024 * 1024 + 4
        assert st.st_blocks * 512 < 1024 * 1024
    finally:
        cowfs("umount", a.parent / "mc")
        cowfs("mount", a, mnt)


def test_mark_is_invisible_and_cannot_be_forged(guests: tuple[Path, Path, Path, Path]) -> None:
    _template, a, _b, mnt = guests
    path = mnt / "etc" / "config"
    assert is_marked(a / "etc" / "config")
    assert not any(n.startswith("trusted.cowfs") for n in os.listxattr(path))
    with pytest.raises(OSError) as err:
        os.getxattr(path, "trusted.cowfs.cow")
    assert err.value.errno == errno.ENODATA
    for attempt in (
        lambda: os.setxattr(path, "trusted.cowfs.cow", b"1"),
        lambda: os.removexattr(path, "trusted.cowfs.cow"),
        lambda: os.setxattr(mnt / "etc" / "passwd", "trusted.cowfs.cow", b"0"),
    ):
        with pytest.raises(PermissionError):
            attempt()
    assert is_marked(a / "etc" / "config")
    # a guest file cannot be made shared by the guest
    (mnt / "mine").write_text("private")
    with pytest.raises(PermissionError):
        os.setxattr(mnt / "mine", "trusted.cowfs.cow", b"1")
    assert not is_marked(a / "mine")


def test_unlink_rename_link_break_nothing(guests: tuple[Path, Path, Path, Path]) -> None:
    template, a, _b, mnt = guests
    ino = (template / "etc" / "config").stat().st_ino
    os.rename(mnt / "etc" / "config", mnt / "etc" / "config.old")
    os.link(mnt / "etc" / "config.old", mnt / "config.link")
    assert (a / "etc" / "config.old").stat().st_ino == ino
    assert (a / "config.link").stat().st_ino == ino
    assert is_marked(a / "config.link")
    os.unlink(mnt / "etc" / "config.old")
    os.unlink(mnt / "config.link")
    assert (template / "etc" / "config").read_text() == "setting=1\nother=2\n"


def test_last_link_just_clears_mark(tmp_path: Path, mounts: Mounts) -> None:
    template = tmp_path / "t"
    template.mkdir()
    (template / "f").write_text("only")
    guest = tmp_path / "g"
    cowfs("clone", template, guest)
    os.unlink(template / "f")  # the guest now holds the inode's last link
    ino = (guest / "f").stat().st_ino
    mnt = mounts.mount(guest, tmp_path / "m")
    with open(mnt / "f", "a") as f:
        f.write(" mine")
    assert (guest / "f").stat().st_ino == ino
    assert not is_marked(guest / "f")
    assert (guest / "f").read_text() == "only mine"


def test_guest_own_hard_link_keeps_shared_content(guests: tuple[Path, Path, Path, Path]) -> None:
    """Documented behaviour: a guest's second name for a shared file stays shared."""
    template, a, _b, mnt = guests
    os.link(mnt / "etc" / "config", mnt / "etc" / "config.hard")
    _pwrite(mnt / "etc" / "config", b"CHANGED", 0)
    assert (mnt / "etc" / "config").read_bytes().startswith(b"CHANGED")
    run("sh", "-c", "echo 2 > /proc/sys/vm/drop_caches")
    assert (a / "etc" / "config.hard").read_bytes().startswith(b"setting")
    assert is_marked(a / "etc" / "config.hard")
    assert (template / "etc" / "config").read_bytes().startswith(b"setting")


def test_write_to_unlinked_shared_file_stays_private(guests: tuple[Path, Path, Path, Path]) -> None:
    template, _a, b, mnt = guests
    # Held by an O_PATH fd: a reader would make the write wait (ETXTBSY, test_passthrough).
    fd = os.open(mnt / "etc" / "config", os.O_PATH)
    try:
        os.unlink(mnt / "etc" / "config")
        wfd = os.open(f"/proc/self/fd/{fd}", os.O_WRONLY)
        try:
            os.pwrite(wfd, b"GHOST", 0)
        finally:
            os.close(wfd)
        rfd = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY)
        try:
            assert os.pread(rfd, 5, 0) == b"GHOST"
        finally:
            os.close(rfd)
    finally:
        os.close(fd)
    assert (template / "etc" / "config").read_text() == "setting=1\nother=2\n"
    assert (b / "etc" / "config").read_text() == "setting=1\nother=2\n"


def test_busybox_guest_does_real_work(guests: tuple[Path, Path, Path, Path]) -> None:
    template, a, b, mnt = guests
    before_template = snapshot(template)
    script = """
        set -e
        echo 'carol:x:1002:1002::/home/carol:/bin/sh' >> /etc/passwd
        mkdir -p /home/carol /srv/data
        chown 1002 /home/carol
        for i in 1 2 3 4 5; do echo "line $i" >> /srv/data/log; done
        sed -i 's/line 3/LINE THREE/' /srv/data/log
        tar cf /tmp/etc.tar /etc
        mkdir /tmp/x && tar xf /tmp/etc.tar -C /tmp/x
        cp -a /bin/busybox /usr/bin/busybox-copy
        chmod 700 /usr/bin/busybox-copy
        /usr/bin/busybox-copy echo copied-busybox-runs
        grep -c carol /etc/passwd
        wc -l < /srv/data/log
        ln -s /srv/data/log /root/log && readlink /root/log
        find / -xdev -name config | sort
    """
    result = run("chroot", mnt, "/bin/sh", "-c", script)
    lines = result.stdout.split()
    assert "copied-busybox-runs" in lines
    assert "/srv/data/log" in lines
    assert "/etc/config" in lines and "/tmp/x/etc/config" in lines
    assert "LINE THREE" in (a / "srv" / "data" / "log").read_text()
    assert "carol" in (a / "etc" / "passwd").read_text()
    assert "carol" not in (template / "etc" / "passwd").read_text()
    assert "carol" not in (b / "etc" / "passwd").read_text()
    assert snapshot(template) == before_template
    assert stat.S_IMODE((a / "usr" / "bin" / "busybox-copy").stat().st_mode) == 0o700


def test_concurrent_writers_break_once(guests: tuple[Path, Path, Path, Path]) -> None:
    template, a, _b, mnt = guests
    procs = [
        subprocess.Popen(["sh", "-c", f"echo writer{i} >> {mnt}/etc/config"]) for i in range(8)
    ]
    for p in procs:
        assert p.wait() == 0
    text = (a / "etc" / "config").read_text()
    assert all(f"writer{i}" in text for i in range(8))
    assert (template / "etc" / "config").read_text() == "setting=1\nother=2\n"
    assert not any(n.startswith(".cowfs~") for n in os.listdir(a / "etc"))


@pytest.mark.skipif(not have("setcap"), reason="setcap (libcap2-bin) not installed")
def test_file_capabilities_survive_break(guests: tuple[Path, Path, Path, Path]) -> None:
    template, a, _b, mnt = guests
    run("setcap", "cap_net_raw+ep", template / "bin" / "busybox")
    cowfs("umount", mnt)
    cowfs("mount", a, mnt)
    os.utime(mnt / "bin" / "busybox")
    assert "cap_net_raw" in run("getcap", a / "bin" / "busybox").stdout
    assert not is_marked(a / "bin" / "busybox")


@pytest.mark.parametrize("passthrough", [True, False])
def test_reading_a_shared_file_leaves_its_atime(
    passthrough: bool, guests: tuple[Path, Path, Path, Path], tmp_path: Path, mounts: Mounts
) -> None:
    """A guest reading a shared file must not touch the inode every sharer sees (its atime
    would tell one guest when another read it): read by the kernel (passthrough) or by
    cowfs."""
    template, _a, b, _ = guests
    flag = "--passthrough" if passthrough else "--no-passthrough"
    mnt = mounts.mount(b, tmp_path / "mnt-b", flag)
    lib = "usr/lib/libbig.so"
    old = (template / lib).stat().st_atime_ns
    assert (mnt / lib).read_bytes()  # a fresh mount: the reads reach the backing file
    assert (template / lib).stat().st_atime_ns == old
    # The control: on this relatime filesystem, reading the file directly does move it.
    (template / lib).read_bytes()
    assert (template / lib).stat().st_atime_ns != old


def test_a_write_through_a_hard_link_whose_other_name_went_lands_in_the_guest(
    guests: tuple[Path, Path, Path, Path],
) -> None:
    """One node stands for every name of an inode: when the name it was last reached by is
    removed, a write through another name the kernel holds must replace that name, not
    go to a copy no name reaches (the guest's data would vanish from its tree)."""
    template, a, _b, mnt = guests
    os.link(mnt / "etc" / "config", mnt / "etc" / "config.hard")  # a second name, shared
    os.stat(mnt / "etc" / "config.hard")
    os.stat(mnt / "etc" / "config")  # the inode's last looked-up name
    os.unlink(mnt / "etc" / "config")
    _pwrite(mnt / "etc" / "config.hard", b"CHANGED", 0)  # its dentry cached: no new lookup
    assert (a / "etc" / "config.hard").read_bytes().startswith(b"CHANGED")
    assert not is_marked(a / "etc" / "config.hard")
    assert (template / "etc" / "config").read_bytes().startswith(b"setting")
    assert is_marked(template / "etc" / "config")
