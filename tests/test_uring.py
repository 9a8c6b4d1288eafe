"""Disk reads through io_uring (cowfs/serve/uring.py) and through the mount, on the real kernel."""

from __future__ import annotations

import errno
import os
import random
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest
import trio
from conftest import Mounts, run

from cowfs.serve.uring import Ring

T = TypeVar("T")


def open_ring(quick_wait_ns: int | None = None) -> Ring:
    ring = Ring.open()
    if ring is None:
        pytest.skip("the kernel refuses io_uring here (cowfs falls back to worker threads)")
    if quick_wait_ns is not None:
        ring.quick_wait_ns = quick_wait_ns
    return ring


def run_served(ring: Ring, work: Callable[[], Awaitable[T]]) -> T:
    """work() in trio while ring.serve() answers its requests; the ring closed after."""

    async def main() -> T:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ring.serve)
            try:
                return await work()
            finally:
                nursery.cancel_scope.cancel()

    try:
        return trio.run(main)
    finally:
        ring.close()


def drop_caches() -> None:
    run("sh", "-c", "sync; echo 3 > /proc/sys/vm/drop_caches")


@pytest.mark.parametrize("quick_wait_ns", [0, 250_000], ids=["awaited", "quick-wait"])
def test_ring_reads_what_pread_reads(tmp_path: Path, quick_wait_ns: int) -> None:
    data = os.urandom(3 * 2**20 + 123)
    (tmp_path / "f").write_bytes(data)
    drop_caches()
    ring = open_ring(quick_wait_ns)
    offsets = [*random.Random(3).sample(range(0, len(data), 4096), 50), len(data) - 100]

    async def read_all() -> list[bytes]:
        fd = os.open(tmp_path / "f", os.O_RDONLY)
        got: list[bytes] = []
        for off in offsets:
            buf = bytearray(8192)
            n = await ring.readinto(fd, memoryview(buf), off)
            got.append(bytes(buf[:n]))
        os.close(fd)
        return got

    got = run_served(ring, read_all)
    assert got == [data[off : off + 8192] for off in offsets]
    assert len(got[-1]) == 100  # a short read at the end of the file


def test_concurrent_reads_each_get_their_own_result(tmp_path: Path) -> None:
    files = {}
    for i in range(8):
        files[i] = os.urandom(65536)
        (tmp_path / f"f{i}").write_bytes(files[i])
    drop_caches()
    ring = open_ring()
    results: dict[int, bytes] = {}

    async def reader(i: int) -> None:
        fd = os.open(tmp_path / f"f{i}", os.O_RDONLY)
        buf = bytearray(65536)
        n = await ring.readinto(fd, memoryview(buf), 0)
        os.close(fd)
        results[i] = bytes(buf[:n])

    async def read_all() -> None:
        async with trio.open_nursery() as readers:
            for i in files:
                readers.start_soon(reader, i)

    run_served(ring, read_all)
    assert results == files


def test_a_read_that_waits_does_not_stall_the_loop() -> None:
    # A read from an empty pipe waits until someone writes: the loop must go on
    # (here, to the task that writes) and the reader must then get the data.
    ring = open_ring()
    read_end, write_end = os.pipe()
    order: list[str] = []

    async def reader() -> None:
        buf = bytearray(100)
        n = await ring.readinto(read_end, memoryview(buf), 0)  # a pipe ignores the offset
        order.append(f"read {bytes(buf[:n])!r}")

    async def writer() -> None:
        await trio.sleep(0.05)
        order.append("write")
        os.write(write_end, b"late data")

    async def both() -> None:
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(reader)
                nursery.start_soon(writer)

    try:
        run_served(ring, both)
    finally:
        os.close(read_end)
        os.close(write_end)
    assert order == ["write", "read b'late data'"]


def test_a_failed_read_raises_its_errno(tmp_path: Path) -> None:
    ring = open_ring()
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)

    async def read_a_directory() -> None:
        with pytest.raises(OSError) as caught:
            await ring.readinto(fd, memoryview(bytearray(10)), 0)
        assert caught.value.errno == errno.EISDIR

    try:
        run_served(ring, read_a_directory)
    finally:
        os.close(fd)


@pytest.mark.parametrize("option", ["--io-uring", "--no-io-uring"])
def test_cold_reads_through_the_mount(
    tmp_path: Path, backing: Path, mounts: Mounts, option: str
) -> None:
    data = os.urandom(8 * 2**20)
    (backing / "big").write_bytes(data)
    log = tmp_path / "mount.log"
    mnt = mounts.mount(backing, tmp_path / "mnt", option, "--no-passthrough", "--log", str(log))
    drop_caches()
    rng = random.Random(5)
    fd = os.open(mnt / "big", os.O_RDONLY)
    try:
        for _ in range(200):
            off = rng.randrange(0, len(data) - 4096)
            assert os.pread(fd, 4096, off) == data[off : off + 4096]
    finally:
        os.close(fd)
    drop_caches()
    assert (mnt / "big").read_bytes() == data
    probe = Ring.open() if option == "--io-uring" else None
    served_by = "io_uring" if probe is not None else "worker threads"  # the fallback, if refused
    if probe is not None:
        probe.close()
    assert f"disk reads by {served_by}" in log.read_text()


def test_where_the_kernel_refuses_io_uring_reads_go_to_threads(
    tmp_path: Path, backing: Path, mounts: Mounts
) -> None:
    switch = Path("/proc/sys/kernel/io_uring_disabled")
    if not switch.exists():
        pytest.skip("this kernel has no kernel.io_uring_disabled switch (before 6.6)")
    data = os.urandom(2**20)
    (backing / "f").write_bytes(data)
    log = tmp_path / "mount.log"
    before = switch.read_text()
    switch.write_text("2\n")  # io_uring_setup fails with EPERM for everyone
    try:
        assert Ring.open() is None
        mnt = mounts.mount(backing, tmp_path / "mnt", "--log", str(log))
    finally:
        switch.write_text(before)
    drop_caches()
    assert (mnt / "f").read_bytes() == data
    assert "disk reads by worker threads" in log.read_text()


def test_reads_from_the_page_cache_and_from_the_disk_agree(
    tmp_path: Path, backing: Path, mounts: Mounts
) -> None:
    # pyfuse3 (patched) answers a read itself when the backing file's pages are
    # cached, and calls cowfs's read handler otherwise: the same bytes either way,
    # also for ranges only partly cached and at the end of the file.
    data = os.urandom(3 * 2**20 + 777)
    (backing / "f").write_bytes(data)
    log = tmp_path / "mount.log"
    # Without passthrough: the reads must reach this server (passthrough would serve
    # them in the kernel from the backing file).
    mnt = mounts.mount(backing, tmp_path / "mnt", "--no-passthrough", "--log", str(log))
    drop_caches()
    with open(backing / "f", "rb") as warm:  # cache the first MiB and scattered pages
        warm.read(2**20)
        for page in range(300, 700, 7):
            warm.seek(page * 4096)
            warm.read(4096)
    rng = random.Random(9)
    fd = os.open(mnt / "f", os.O_RDONLY)
    try:
        for _ in range(3):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # empty the mount's cache
            for _ in range(100):
                off, size = rng.randrange(0, len(data)), rng.choice([100, 4096, 70000])
                assert os.pread(fd, size, off) == data[off : off + size]
            assert os.pread(fd, 4096, len(data) - 77) == data[-77:]
            assert os.pread(fd, 4096, len(data) + 10) == b""
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        drop_caches()
        assert os.pread(fd, len(data) + 1, 0) == data
    finally:
        os.close(fd)
    mounts.umount(mnt)
    counts = re.search(
        r"reads: (\d+) from the page cache by pyfuse3, (\d+) by cowfs", log.read_text()
    )
    assert counts is not None
    assert int(counts[1]) > 0 and int(counts[2]) > 0  # both ways were taken


def test_ring_writes_what_pwrite_writes(tmp_path: Path) -> None:
    ring = open_ring()
    chunks = [(off, os.urandom(size)) for off, size in [(0, 5000), (4096, 100), (2**20, 3), (7, 1)]]
    expected = bytearray(2**20 + 3)
    for off, data in chunks:
        expected[off : off + len(data)] = data

    async def write_all() -> list[int]:
        fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT, 0o644)
        appending = os.open(tmp_path / "log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        readonly = os.open(tmp_path / "f", os.O_RDONLY)
        written = []
        try:
            for off, data in chunks:
                written.append(await ring.write(fd, memoryview(data), off))
            for line in (b"first\n", b"second\n"):  # O_APPEND: the offset is ignored
                written.append(await ring.write(appending, line, 0))
            with pytest.raises(OSError) as caught:
                await ring.write(readonly, b"no", 0)
            assert caught.value.errno == errno.EBADF
        finally:
            for f in (fd, appending, readonly):
                os.close(f)
        return written

    written = run_served(ring, write_all)
    assert written == [len(data) for _, data in chunks] + [6, 7]
    assert (tmp_path / "f").read_bytes() == bytes(expected)
    assert (tmp_path / "log").read_bytes() == b"first\nsecond\n"


@pytest.mark.parametrize("option", ["--io-uring", "--no-io-uring"])
def test_writes_through_the_mount(
    tmp_path: Path, backing: Path, mounts: Mounts, option: str
) -> None:
    # ext4 refuses RWF_NOWAIT for buffered writes, so there every write goes to
    # io_uring (or, without it, to a worker thread): the same file either way.
    mnt = mounts.mount(backing, tmp_path / "mnt", option)
    rng = random.Random(11)
    expected = bytearray()
    fd = os.open(mnt / "f", os.O_WRONLY | os.O_CREAT, 0o644)
    appending = os.open(mnt / "log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        for _ in range(300):
            off = rng.randrange(0, 2**20)
            data = rng.randbytes(rng.randrange(1, 20000))
            assert os.pwrite(fd, data, off) == len(data)
            expected[len(expected) : off] = bytes(max(0, off - len(expected)))
            expected[off : off + len(data)] = data
            os.write(appending, b"%d\n" % off)
    finally:
        os.close(fd)
        os.close(appending)
    assert (backing / "f").read_bytes() == bytes(expected)
    assert (mnt / "f").read_bytes() == bytes(expected)
    lines = (backing / "log").read_bytes().splitlines()
    assert len(lines) == 300
