"""A file's privileges after a write, truncate or O_TRUNC open through a mount, as natively.

With FUSE_HANDLE_KILLPRIV_V2 the kernel leaves killing the set-user-ID and
set-group-ID bits and file capabilities to cowfs (cowfs/serve/privileges.py).
Each case does the same to a file on the backing filesystem itself (ext4 here)
and to one through a mount, and expects the mount's to end as the native one
does: the native file is the reference, never cowfs's own code.
"""

from __future__ import annotations

import os
import shutil
import stat
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Mounts, cowfs
from test_posix import as_user

USER = 65534  # nobody: no CAP_FSETID
CAPABILITY = "security.capability"


def _cap_net_raw() -> bytes:
    # vfs_cap_data revision 2, permitted = CAP_NET_RAW (13), effective bit set.
    return struct.pack("<IIIII", 0x02000001, 1 << 13, 0, 0, 0)


def _privileges(path: Path) -> tuple[int, bytes | None]:
    """A file's mode bits and its security.capability (None: none)."""
    try:
        caps: bytes | None = os.getxattr(path, CAPABILITY)
    except OSError:
        caps = None
    return stat.S_IMODE(os.stat(path).st_mode), caps


@pytest.fixture
def dirs(tmp_path: Path, mnt: Path) -> Iterator[tuple[Path, Path]]:
    """(a native directory on the backing filesystem, the mount), both open to USER."""
    native = tmp_path / "native"
    native.mkdir()
    for d in (native, mnt):
        os.chmod(d, 0o777)
    yield native, mnt


def _plant(directory: Path, mode: int, caps: bool, gid: int = 0) -> Path:
    """f in directory: root's (group gid), with mode (set-id bits included), maybe a file
    capability."""
    path = directory / "f"
    path.write_bytes(b"\x7fELF" + b"\0" * 8188)
    os.chown(path, 0, gid)
    if caps:
        os.setxattr(path, CAPABILITY, _cap_net_raw())
    os.chmod(path, mode)  # after setxattr, which keeps set-id bits; a chmod never drops them
    return path


# What the caller does to ./f: (uid, script).
ACTIONS = {
    "user writes": (USER, "printf x | dd of=f conv=notrunc status=none"),
    "user writes O_DIRECT": (
        USER,
        "dd if=/dev/zero of=f bs=4096 count=1 oflag=direct conv=notrunc status=none",
    ),
    "user truncates": (USER, "truncate -s 100 f"),
    "user opens O_TRUNC": (USER, ": > f"),
    "root writes": (0, "printf x | dd of=f conv=notrunc status=none"),
    "root truncates": (0, "truncate -s 100 f"),
}


GROUP = 4242  # one of USER's supplementary groups (which a FUSE request does not carry)

# (mode, the file's group): set-id bits, and whether USER is in the group.
FILES = {
    "suid-sgid-gx": (0o6777, 0),
    "suid": (0o4777, 0),
    "sgid-stranger": (0o2666, 0),
    "sgid-member": (0o2666, USER),  # kept: a member's non-executable set-gid file
    "sgid-supplementary": (0o2666, GROUP),  # likewise
}


@pytest.mark.parametrize("action", ACTIONS)
@pytest.mark.parametrize("file", FILES)
def test_set_id_bits_as_natively(dirs: tuple[Path, Path], action: str, file: str) -> None:
    uid, script = ACTIONS[action]
    mode, gid = FILES[file]
    results = []
    for directory in dirs:
        _plant(directory, mode, caps=False, gid=gid)
        done = as_user(uid, uid, script, cwd=directory, groups=(GROUP,))
        assert done.returncode == 0, done.stderr
        results.append(_privileges(directory / "f"))
    native, mounted = results
    assert mounted == native
    # What the kernel does natively, which the comparison is only as good as.
    member = gid in (USER, GROUP)
    cleared = stat.S_ISUID | (stat.S_ISGID if mode & stat.S_IXGRP or not member else 0)
    assert native[0] == (mode & ~cleared if uid == USER else mode)


@pytest.mark.parametrize(
    "action", ["user writes", "user truncates", "user opens O_TRUNC", "root writes"]
)
def test_file_capability_removed_as_natively(dirs: tuple[Path, Path], action: str) -> None:
    uid, script = ACTIONS[action]
    results = []
    for directory in dirs:
        _plant(directory, 0o777, caps=True)
        assert _privileges(directory / "f") == (0o777, _cap_net_raw())
        done = as_user(uid, uid, script, cwd=directory)
        assert done.returncode == 0, done.stderr
        results.append(_privileges(directory / "f"))
    native, mounted = results
    assert native == (0o777, None)
    assert mounted == native


def test_chown_clears_set_id_bits_as_natively(dirs: tuple[Path, Path]) -> None:
    results = []
    for directory in dirs:
        path = _plant(directory, 0o6755, caps=True)
        os.chown(path, USER, USER)
        results.append(_privileges(path))
    native, mounted = results
    assert native == (0o755, None)
    assert mounted == native


@pytest.mark.parametrize(
    "write",
    [
        # Its first byte again: written through the kernel's page cache.
        r"printf '\177' | dd of=id conv=notrunc status=none",
        # Read and written back by one dd: its reader makes the writer a direct-I/O one.
        "dd if=id of=id bs=1 count=1 conv=notrunc status=none",
    ],
    ids=["cached", "direct"],
)
def test_users_write_does_not_leave_a_set_uid_program(dirs: tuple[Path, Path], write: str) -> None:
    """The kernel runs a program set-uid by the mode it has cached: right after a user's
    write that cleared the bit, it must know (a writable set-uid-root program is not one)."""
    _native, mnt = dirs
    program = mnt / "id"
    shutil.copy("/usr/bin/id", program)
    os.chmod(program, 0o4777)
    assert as_user(USER, USER, "./id -u", cwd=mnt).stdout.strip() == "0"  # set-uid root as planted
    done = as_user(USER, USER, f"{write} && ./id -u", cwd=mnt)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(USER)
    assert stat.S_IMODE(program.stat().st_mode) == 0o777


@pytest.mark.parametrize("action", ["user writes", "user truncates", "user opens O_TRUNC"])
def test_kill_happens_on_the_private_copy(tmp_path: Path, mounts: Mounts, action: str) -> None:
    """A user's write to a shared set-uid file kills the bits of the guest's copy only."""
    template = tmp_path / "template"
    template.mkdir()
    path = _plant(template, 0o6777, caps=True)
    guest = tmp_path / "guest"
    cowfs("clone", template, guest)
    mnt = mounts.mount(guest, tmp_path / "mnt-guest")
    os.chmod(mnt, 0o777)
    uid, script = ACTIONS[action]
    done = as_user(uid, uid, script, cwd=mnt)
    assert done.returncode == 0, done.stderr
    assert _privileges(path) == (0o6777, _cap_net_raw())  # the shared inode: untouched
    assert _privileges(guest / "f") == (0o777, None)
    assert (guest / "f").stat().st_ino != path.stat().st_ino
