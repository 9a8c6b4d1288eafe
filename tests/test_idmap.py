"""cowfs's id map for user-namespaced guests, on attributes the kernel itself wrote."""

from __future__ import annotations

import os
import struct
from pathlib import Path

from conftest import run

from cowfs.serve.idmap import IdMap

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
