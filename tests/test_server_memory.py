"""A guest cannot grow its FUSE server's memory: listings, owners and the like are bounded.

The server is measured from /proc (USS: its private resident pages) while a guest
user does what costs it most, and listings stay correct while their state comes and
goes (cowfs/serve/listings.py).
"""

from __future__ import annotations

import ctypes
import os
import random
import struct
import subprocess
from collections import Counter
from pathlib import Path

from conftest import Mounts

from cowfs.host import registry
from cowfs.serve.listings import MAX_STREAMS

# What the attacks below may add to the server's private memory. Before listings were
# bounded, one partial listing of a directory kept all its names: +52 MB for 150,000
# names of 200 bytes, for as long as the mount lived.
GROWTH_BOUND = 8 << 20
LONG = 194  # + a 6-digit number: names of 200 bytes
GUEST_USER = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"]
_O_PATH = 0o10000000


def server_pid(mountpoint: Path) -> int:
    record = registry.read_record(os.path.realpath(mountpoint))
    assert record is not None, f"no record of the mount at {mountpoint}"
    return record.pid


def private_bytes(pid: int) -> int:
    """The process's private resident memory (USS), from /proc/PID/smaps_rollup."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[2] == "kB":
            fields[parts[0].rstrip(":")] = int(parts[1]) * 1024
    return fields["Private_Clean"] + fields["Private_Dirty"]


def listing_fds(pid: int, directory: Path) -> int:
    """How many fds of process pid read directory (open for reading: not O_PATH node fds)."""
    target = os.path.realpath(directory)
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") != target:
                continue
            flags = Path(f"/proc/{pid}/fdinfo/{fd}").read_text().split("flags:")[1].split()[0]
        except (FileNotFoundError, IndexError):
            continue
        if not int(flags, 8) & _O_PATH:
            count += 1
    return count


def long_names(count: int, prefix: str = "") -> list[str]:
    return [f"{prefix}{i:06d}" + "x" * (LONG - len(prefix)) for i in range(count)]


def hard_links(directory: Path, names: list[str]) -> None:
    """Make names in directory as hard links to a few files (ext4 allows 65,000 links each)."""
    target = None
    for index, name in enumerate(names):
        if index % 60_000 == 0:
            target = directory / f"target{index}"
            target.write_bytes(b"")
        os.link(target, directory / name)  # type: ignore[arg-type]


# The guest user's side of the attack: 150,000 long names in 50 directories,
# made through the mount; then one getdents of each, directories kept open.
_ATTACK = r"""
import os, sys
root, dirs, per_dir, long = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
for d in range(dirs):
    directory = f"{root}/d{d:02d}"
    os.mkdir(directory)
    target = f"{directory}/target"
    open(target, "w").close()
    for i in range(per_dir):
        os.link(target, f"{directory}/{i:06d}" + "x" * long)
print("made", flush=True)
sys.stdin.readline()
listings = []
for d in range(dirs):
    listing = os.scandir(f"{root}/d{d:02d}")
    next(listing)
    listings.append(listing)
print("listed", flush=True)
sys.stdin.readline()
"""


def test_partial_listings_do_not_grow_the_server(tmp_path: Path, mounts: Mounts) -> None:
    backing = tmp_path / "backing"
    backing.mkdir()
    mnt = mounts.mount(backing, tmp_path / "mnt")
    os.mkdir(mnt / "home")
    os.chown(mnt / "home", 65534, 65534)
    pid = server_pid(mnt)
    dirs, per_dir = 50, 3000
    assert dirs > MAX_STREAMS  # more listings left open than the server keeps streams for
    # Relative to a working directory in the mount: the guest user needs no way
    # through the host's directories above it.
    attack_args = [".", str(dirs), str(per_dir), str(LONG)]
    guest = subprocess.Popen(
        [*GUEST_USER, "/usr/bin/python3", "-c", _ATTACK, *attack_args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=mnt / "home",
    )
    assert guest.stdin is not None and guest.stdout is not None
    try:
        assert guest.stdout.readline() == "made\n"
        before = private_bytes(pid)
        guest.stdin.write("go\n")
        guest.stdin.flush()
        assert guest.stdout.readline() == "listed\n"
        grown = private_bytes(pid) - before
        assert grown < GROWTH_BOUND, f"the server grew by {grown >> 20} MiB"
    finally:
        guest.stdin.close()
        assert guest.wait(timeout=60) == 0
    assert len(os.listdir(backing / "home" / "d07")) == per_dir + 1
    assert private_bytes(pid) - before < GROWTH_BOUND


def test_chown_through_many_owners_keeps_no_record_of_each(tmp_path: Path, mounts: Mounts) -> None:
    """Per-owner usage is kept for owners that own something, not for every id ever used."""
    backing = tmp_path / "backing"
    backing.mkdir()
    mnt = mounts.mount(backing, tmp_path / "mnt")
    pid = server_pid(mnt)
    (mnt / "f").write_text("x")
    before = private_bytes(pid)
    for owner in range(100_000, 130_000):
        os.chown(mnt / "f", owner, owner)
    grown = private_bytes(pid) - before
    assert grown < GROWTH_BOUND, f"the server grew by {grown >> 20} MiB"
    assert os.stat(backing / "f").st_uid == 129_999


def _big_directory(tmp_path: Path, count: int) -> tuple[Path, Path, list[str]]:
    """A backing tree whose big/ holds count long names; (backing, big, names)."""
    backing = tmp_path / "backing"
    big = backing / "big"
    big.mkdir(parents=True)
    names = long_names(count)
    hard_links(big, names)
    return backing, big, [*names, *(p.name for p in big.glob("target*"))]


def test_listing_resumes_after_its_stream_is_evicted(tmp_path: Path, mounts: Mounts) -> None:
    backing, big, names = _big_directory(tmp_path, 150_000)
    evictors = MAX_STREAMS + 8
    for e in range(evictors):
        (backing / f"e{e:02d}").mkdir()
        hard_links(backing / f"e{e:02d}", long_names(600))  # more than one reply holds
    mnt = mounts.mount(backing, tmp_path / "mnt")
    pid = server_pid(mnt)
    seen: Counter[str] = Counter()
    resumed = 0
    with os.scandir(mnt / "big") as listing:
        for count, entry in enumerate(listing, 1):
            seen[entry.name] += 1
            if count % 5000:
                continue
            was_open = listing_fds(pid, big) == 1
            for e in range(evictors):
                other = mnt / f"e{e:02d}"
                (other / f"new{count}").touch()  # changed: its next listing reaches cowfs
                with os.scandir(other) as partial:
                    next(partial)  # one reply of a listing left unfinished
            if was_open and listing_fds(pid, big) == 0:
                resumed += 1
    assert resumed >= 20, f"the big listing's stream was evicted only {resumed} times"
    assert not [name for name, times in seen.items() if times != 1]
    assert sorted(seen) == sorted(names)


def test_listing_during_creates_and_deletes_meets_posix(tmp_path: Path, mounts: Mounts) -> None:
    """Names present throughout are listed exactly once; others at most once."""
    backing, _big, names = _big_directory(tmp_path, 150_000)
    mnt = mounts.mount(backing, tmp_path / "mnt")
    rng = random.Random(7)
    removed: set[str] = set()
    created: set[str] = set()
    pending = [n for n in names if not n.startswith("target")]
    seen: Counter[str] = Counter()
    with os.scandir(mnt / "big") as listing:
        for count, entry in enumerate(listing, 1):
            seen[entry.name] += 1
            if count % 2000:
                continue
            for name in rng.sample(pending, 50):  # some listed already, most not yet
                os.unlink(mnt / "big" / name)
                removed.add(name)
                pending.remove(name)
            for i in range(50):
                name = f"new{count:06d}-{i:02d}" + "y" * 180
                (mnt / "big" / name).touch()
                created.add(name)
    assert len(removed) > 3000 and len(created) > 3000
    assert not [name for name, times in seen.items() if times != 1]
    assert set(seen) <= set(names) | created
    assert set(names) - removed <= set(seen)
    assert sorted(os.listdir(mnt / "big")) == sorted((set(names) - removed) | created)


def _raw_listing(directory: Path) -> dict[bytes, int]:
    """{name: d_ino} of directory as getdents64 gives it, "." and ".." included."""
    libc = ctypes.CDLL(None, use_errno=True)
    buffer = ctypes.create_string_buffer(1 << 16)
    listed: dict[bytes, int] = {}
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        while (size := libc.getdents64(fd, buffer, len(buffer))) > 0:
            data, pos = buffer.raw[:size], 0
            while pos < size:
                ino, _offset, length = struct.unpack_from("<QqH", data, pos)
                listed[data[pos + 19 : data.index(b"\0", pos + 19)]] = ino
                pos += length
    finally:
        os.close(fd)
    assert size == 0, os.strerror(ctypes.get_errno())
    return listed


def test_dot_dot_of_the_root_is_the_root(backing: Path, mnt: Path) -> None:
    """The backing root's ".." (a host directory) is never listed: the guest root's is itself."""
    (mnt / "sub").mkdir()
    root_ino = os.stat(mnt).st_ino
    assert os.stat(backing.parent).st_ino != root_ino
    root = _raw_listing(mnt)
    assert root[b"."] == root[b".."] == root_ino
    assert root[b"sub"] == os.stat(mnt / "sub").st_ino
    sub = _raw_listing(mnt / "sub")
    assert sub == {b".": os.stat(mnt / "sub").st_ino, b"..": root_ino}
