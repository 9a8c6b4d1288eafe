"""cowfs's id map for user-namespaced guests: on attributes the kernel itself wrote, then
through real mounts used from a real user namespace (as contextd's guests with
`[security] userns = true` use them)."""

from __future__ import annotations

import json
import os
import stat
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import Mounts, cowfs, run

from cowfs.serve.idmap import IdMap, parse_id_map

BASE = 23 * 65536
MAP = IdMap(BASE, 65536)


def test_ids_in_the_range_move_and_others_stay() -> None:
    assert [MAP.to_host(i) for i in (0, 1000, 65535, 65536, -1)] == [
        BASE, BASE + 1000, BASE + 65535, 65536, -1
    ]  # fmt: skip
    assert [MAP.to_tree(i) for i in (BASE, BASE + 1000, BASE + 65535, BASE + 65536, 0, -1)] == [
        0, 1000, 65535, BASE + 65536, 0, -1
    ]  # fmt: skip


def test_file_capabilities_belong_to_the_guests_root_as_the_host_sees_it(tmp_path: Path) -> None:
    tool = tmp_path / "ping"
    tool.write_bytes(b"")
    run("setcap", "cap_net_raw+ep", tool)
    on_disk = os.getxattr(tool, "security.capability")  # revision 2, as setcap on a host writes
    assert struct.unpack_from("<I", on_disk)[0] >> 24 == 2 and len(on_disk) == 20
    shown = MAP.xattr_to_host(b"security.capability", on_disk)
    magic, rootid = struct.unpack_from("<I", shown)[0], struct.unpack_from("<I", shown, 20)[0]
    assert magic >> 24 == 3 and rootid == BASE and shown[4:20] == on_disk[4:20]
    assert MAP.xattr_to_tree(b"security.capability", shown) == on_disk
    # A root id outside the guest's range is not the guest's: kept as it is, both ways.
    foreign = shown[:20] + struct.pack("<I", 5)
    assert MAP.xattr_to_tree(b"security.capability", foreign) == foreign


def test_acl_entries_name_the_guests_users_as_the_host_sees_them(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.write_bytes(b"")
    run("setfacl", "-m", "u:1000:rw,g:50:r", shared)
    on_disk = os.getxattr(shared, "system.posix_acl_access")
    shown = MAP.xattr_to_host(b"system.posix_acl_access", on_disk)
    entries = [struct.unpack_from("<HHI", shown, 4 + 8 * i) for i in range((len(shown) - 4) // 8)]
    named = {(tag, entry_id) for tag, _perm, entry_id in entries if tag in (0x02, 0x08)}
    assert named == {(0x02, BASE + 1000), (0x08, BASE + 50)}
    assert MAP.xattr_to_tree(b"system.posix_acl_access", shown) == on_disk


def test_bad_id_maps_are_refused_with_the_reason(tmp_path: Path) -> None:
    for text, reason in [
        ("65536", "expected HOST_BASE:COUNT"),
        ("x:1", "expected HOST_BASE:COUNT"),
        ("0:65536", "above 0"),
        ("65536:0", "above 0"),
        ("4294967295:2", "outside"),
    ]:
        with pytest.raises(ValueError, match=reason):
            parse_id_map(text)
    (tmp_path / "b").mkdir()
    (tmp_path / "m").mkdir()
    result = cowfs("mount", "--id-map", "0:65536", tmp_path / "b", tmp_path / "m", check=False)
    assert result.returncode == 2 and "above 0" in result.stderr
    assert not os.path.ismount(tmp_path / "m")


# -- through a mount, from a user namespace ------------------------------------

# Run as a child of the test: enter a new user namespace, wait for the test to
# write its id maps, become the given id inside it, run the script. The working
# directory is entered first, as host root: guest ids cannot pass the host's
# 0700 directories above a mount (the barrier), as a guest's cannot.
_IN_USERNS = """
import os, sys
from native import syscalls
syscalls.unshare(0x10000000)  # CLONE_NEWUSER
print("unshared", flush=True)
sys.stdin.readline()
uid = int(sys.argv[2])
os.setgroups([])
os.setresgid(uid, uid, uid)
os.setresuid(uid, uid, uid)
os.execv("/bin/sh", ["sh", "-c", sys.argv[1]])
"""


def in_userns(cwd: Path, script: str, uid: int = 0) -> subprocess.CompletedProcess[str]:
    """Run script in cwd as uid of a user namespace whose ids 0..65535 are host BASE.."""
    child = subprocess.Popen(
        [sys.executable, "-c", _IN_USERNS, script, str(uid)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=cwd,
    )
    assert child.stdout is not None and child.stdout.readline() == "unshared\n"
    for kind in ("uid_map", "gid_map"):
        Path(f"/proc/{child.pid}/{kind}").write_text(f"0 {BASE} 65536\n")
    out, err = child.communicate("go\n", timeout=60)
    return subprocess.CompletedProcess(child.args, child.returncode, out, err)


@pytest.fixture
def guest(tmp_path: Path, guest_tree: Path) -> Path:
    """A busybox guest cloned from a template (its files shared), with a world-writable /srv."""
    path = tmp_path / "guest"
    cowfs("clone", guest_tree, path)
    (path / "srv").mkdir()
    os.chmod(path / "srv", 0o1777)
    return path


def mount_mapped(guest: Path, tmp_path: Path, mounts: Mounts) -> Path:
    return mounts.mount(guest, tmp_path / "mnt", "--id-map", f"{BASE}:65536")


def test_the_guest_sees_the_trees_owners_as_its_own_and_its_changes_keep_tree_ids(
    guest: Path, tmp_path: Path, mounts: Mounts
) -> None:
    os.chown(guest / "srv", 0, 0)
    (guest / "srv" / "alices").write_bytes(b"secret")
    os.chown(guest / "srv" / "alices", 1000, 1000)
    os.chmod(guest / "srv" / "alices", 0o600)
    mnt = mount_mapped(guest, tmp_path, mounts)
    seen = in_userns(mnt, "stat -c '%u:%g %n' bin/busybox home/alice srv/alices")
    assert seen.stdout.split("\n")[:3] == ["0:0 bin/busybox", "1000:1000 home/alice",
                                            "1000:1000 srv/alices"]  # fmt: skip
    assert (os.stat(mnt / "bin/busybox").st_uid, os.stat(mnt / "home/alice").st_uid) == (
        BASE,
        BASE + 1000,
    )  # the host sees the guest's ids as its range of host ids
    script = (
        "cat srv/alices >/dev/null && touch srv/new && mkdir srv/dir && ln -s new srv/link"
        " && mknod srv/fifo p && touch srv/given && chown 33:50 srv/given"
        " && echo more >> etc/motd && chown 1000 etc/motd"
    )
    assert in_userns(mnt, script).returncode == 0
    owners = {
        name: (os.lstat(guest / name).st_uid, os.lstat(guest / name).st_gid)
        for name in ("srv/new", "srv/dir", "srv/link", "srv/fifo", "srv/given", "etc/motd")
    }
    assert owners == {
        "srv/new": (0, 0), "srv/dir": (0, 0), "srv/link": (0, 0), "srv/fifo": (0, 0),
        "srv/given": (33, 50), "etc/motd": (1000, 0),
    }  # fmt: skip
    assert in_userns(mnt, "touch srv/alices-own", uid=1000).returncode == 0
    assert os.stat(guest / "srv/alices-own").st_uid == 1000
    # A set-gid directory's group goes to what is made in it, in tree ids too.
    assert (
        in_userns(mnt, "mkdir srv/team && chgrp 50 srv/team && chmod 2777 srv/team").returncode == 0
    )
    assert in_userns(mnt, "touch srv/team/doc", uid=1000).returncode == 0
    assert os.stat(guest / "srv/team/doc").st_gid == 50


def test_guest_root_has_no_power_over_ids_outside_its_range(
    guest: Path, tmp_path: Path, mounts: Mounts
) -> None:
    """A tree file of an id the guest's namespace lacks is nobody's to the guest and its root."""
    foreign = guest / "srv" / "foreign"
    foreign.write_bytes(b"not the guest's")
    os.chown(foreign, 70000, 70000)
    os.chmod(foreign, 0o600)
    mnt = mount_mapped(guest, tmp_path, mounts)
    assert os.stat(mnt / "srv/foreign").st_uid == 70000  # not in the range: shown as it is
    seen = in_userns(mnt, "stat -c %u srv/foreign; cat srv/foreign; chown 0 srv/foreign")
    assert seen.stdout.split("\n")[0] == "65534"
    assert "cat: srv/foreign: Permission denied" in seen.stderr
    assert "chown: changing ownership of 'srv/foreign': Operation not permitted" in seen.stderr
    assert os.stat(foreign).st_uid == 70000 and foreign.read_bytes() == b"not the guest's"


def _capabilities(path: Path) -> tuple[int, int, bytes]:
    """The revision, size and permitted set of path's security.capability as the tree keeps it."""
    raw = os.getxattr(path, "security.capability", follow_symlinks=False)
    return struct.unpack_from("<I", raw)[0] >> 24, len(raw), raw[4:8]


def test_file_capabilities_work_in_the_guest_and_stay_host_style_in_the_tree(
    guest: Path, tmp_path: Path, mounts: Mounts
) -> None:
    net_raw = 1 << 13
    # One set on the host (as a distribution's package installs it), one set inside the guest.
    run("cp", "/bin/cat", guest / "srv" / "host-cat")
    run("setcap", "cap_net_raw+ep", guest / "srv" / "host-cat")
    run("cp", "/bin/cat", guest / "srv" / "guest-cat")
    mnt = mount_mapped(guest, tmp_path, mounts)
    assert in_userns(mnt, "setcap cap_net_raw+ep srv/guest-cat").returncode == 0
    assert _capabilities(guest / "srv/guest-cat") == (2, 20, struct.pack("<I", net_raw))
    # To the host both belong to the guest's root only: they give nothing to a process
    # outside the guest's namespace that runs them through the mount.
    on_host = run("getcap", "-n", mnt / "srv/host-cat", mnt / "srv/guest-cat").stdout
    assert on_host.count(f"cap_net_raw=ep [rootid={BASE}]") == 2, on_host
    shown = in_userns(mnt, "getcap srv/host-cat srv/guest-cat").stdout
    assert shown.split() == ["srv/host-cat", "cap_net_raw=ep", "srv/guest-cat", "cap_net_raw=ep"]
    for tool in ("host-cat", "guest-cat"):
        status = in_userns(mnt, f"srv/{tool} /proc/self/status", uid=1000).stdout
        permitted = next(line for line in status.splitlines() if line.startswith("CapPrm:"))
        assert int(permitted.split()[1], 16) == net_raw, (tool, permitted)


def test_acls_set_in_the_guest_name_its_users_by_their_tree_ids(
    guest: Path, tmp_path: Path, mounts: Mounts
) -> None:
    (guest / "srv" / "shared").write_bytes(b"for alice")
    os.chmod(guest / "srv" / "shared", 0o600)
    mnt = mount_mapped(guest, tmp_path, mounts)
    assert in_userns(mnt, "setfacl -m u:1000:r,g:50:r srv/shared").returncode == 0
    on_tree = run("getfacl", "-n", "--omit-header", guest / "srv/shared").stdout.split()
    assert "user:1000:r--" in on_tree and "group:50:r--" in on_tree
    assert in_userns(mnt, "cat srv/shared", uid=1000).stdout == "for alice"
    assert in_userns(mnt, "cat srv/shared", uid=1001).returncode != 0


def test_quota_charges_the_guests_users_by_their_tree_ids(
    guest: Path, tmp_path: Path, mounts: Mounts
) -> None:
    cowfs("quota", "set", guest, "--user", "alice", "--space-hard", "1M")
    mnt = mount_mapped(guest, tmp_path, mounts)
    result = in_userns(mnt / "srv", "dd if=/dev/zero of=a bs=64k count=40 2>&1", uid=1000)
    assert "Disk quota exceeded" in result.stdout
    assert (guest / "srv" / "a").stat().st_size <= 2**20
    report = {
        (r["kind"], r["name"]): r
        for r in json.loads(cowfs("quota", "report", guest, "--json").stdout)
    }
    assert 2**20 - 65536 <= report[("user", "alice")]["used_bytes"] <= 2**20  # type: ignore[operator]
    assert stat.S_ISDIR(os.stat(guest / "srv").st_mode)
