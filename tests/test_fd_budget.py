"""A mount holding few fds: nodes are evicted and come back by file handle, invisibly."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from conftest import Mounts, cowfs, is_marked, run


def test_small_fd_budget_serves_large_tree(tmp_path: Path, mounts: Mounts) -> None:
    template = tmp_path / "tpl"
    for d in range(40):
        sub = template / f"d{d:02d}" / "inner"
        sub.mkdir(parents=True)
        for f in range(50):
            (sub / f"f{f:02d}").write_text(f"{d}/{f}")
    guest = tmp_path / "guest"
    cowfs("clone", template, guest)
    mnt = mounts.mount(guest, tmp_path / "m", "--max-node-fds", "16", "--cache-timeout", "0")
    assert len(run("find", mnt).stdout.split()) == 1 + 40 * 2 + 40 * 50
    # every file read back through nodes that were evicted and reopened
    for d in range(40):
        for f in range(0, 50, 7):
            assert (mnt / f"d{d:02d}" / "inner" / f"f{f:02d}").read_text() == f"{d}/{f}"
    # renames move nodes; a later link break must find them under their new names
    os.rename(mnt / "d00" / "inner", mnt / "moved")
    run("find", mnt, "-name", "nothing")  # churn the fd cache
    with open(mnt / "moved" / "f03", "a") as out:
        out.write(" changed")
    assert (guest / "moved" / "f03").read_text() == "0/3 changed"
    assert not is_marked(guest / "moved" / "f03")
    assert (template / "d00" / "inner" / "f03").read_text() == "0/3"
    # an open unlinked file keeps working while the cache churns
    fd = os.open(mnt / "d01" / "inner" / "f01", os.O_RDONLY)
    try:
        os.unlink(mnt / "d01" / "inner" / "f01")
        run("find", mnt, "-name", "nothing")
        assert os.fstat(fd).st_nlink == 1  # still linked by the template and the store
        assert os.pread(fd, 10, 0) == b"1/1"
    finally:
        os.close(fd)
    log = Path("/var/log/cowfs") / f"mount-{str(mnt).strip('/').replace('/', '_')}.log"
    mounts.umount(mnt)
    assert "node reopens" in log.read_text()
    reopens = int(log.read_text().rsplit("link breaks, ", 1)[1].split()[0])
    assert reopens > 100, "the small budget never made nodes come back by handle"


def test_a_table_given_a_smaller_share_closes_its_excess(tmp_path: Path) -> None:
    # A server of several mounts (cowfs.serve.host) shares its fd limit out among them:
    # a mount's table made smaller as others join keeps no more than its new share.
    from cowfs.serve.inodes import InodeTable

    for i in range(120):
        (tmp_path / f"f{i:03d}").write_text("x")
    root = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    table = InodeTable(root, 200)

    def admit(name: str) -> None:
        fd = os.open(name, os.O_PATH | os.O_CLOEXEC, dir_fd=root)
        table.add(fd, os.fstat(fd), table.root, name.encode())

    def node_fds() -> int:
        count = 0
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(FileNotFoundError):  # the listing's own fd, gone
                count += os.readlink(f"/proc/self/fd/{fd}").startswith(str(tmp_path) + "/f")
        return count

    for i in range(100):
        admit(f"f{i:03d}")
    assert node_fds() == 100
    table.resize(24)
    for i in range(100, 120):
        admit(f"f{i:03d}")
    assert node_fds() <= 24
    first = table.find(os.stat(tmp_path / "f000"))
    assert first is not None and first.fd >= 0  # reopened from its handle at need
    table.close()
    assert node_fds() == 0


def test_a_file_whose_link_broke_comes_back_as_its_private_copy(
    tmp_path: Path, mounts: Mounts
) -> None:
    # An evicted node comes back by the file handle it kept; after a link break that
    # handle must be its private copy's, or the guest would read, and copy again over
    # its own change, the shared file it left.
    template = tmp_path / "tpl"
    (template / "many").mkdir(parents=True)
    for f in range(200):
        (template / "many" / f"f{f:03d}").write_text(str(f))
    (template / "file").write_text("shared")
    guest = tmp_path / "guest"
    cowfs("clone", template, guest)
    mnt = mounts.mount(guest, tmp_path / "m", "--max-node-fds", "16", "--cache-timeout", "0")

    def churn() -> None:  # every node but the root's evicted (and given a handle) at least once
        for f in range(200):
            assert (mnt / "many" / f"f{f:03d}").read_text() == str(f)

    assert (mnt / "file").read_text() == "shared"
    churn()
    with open(mnt / "file", "a") as out:
        out.write(" changed")  # the break: the node now stands for a private copy
    churn()
    assert (mnt / "file").read_text() == "shared changed"
    with open(mnt / "file", "a") as out:
        out.write(" again")
    churn()
    assert (mnt / "file").read_text() == "shared changed again"
    assert (guest / "file").read_text() == "shared changed again"
    assert (template / "file").read_text() == "shared"
