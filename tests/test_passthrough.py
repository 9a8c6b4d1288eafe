"""FUSE passthrough: guests reading a shared file share one page cache, and nothing a guest
does through it can change another guest's file or dodge its limits."""

from __future__ import annotations

import errno
import json
import mmap
import os
import subprocess
from pathlib import Path

import pyfuse3
import pytest
from conftest import Mounts, cowfs, is_marked
from contextd_harness import SLEEPER, Contextd

BIG = 8 * 1024 * 1024

pytestmark = pytest.mark.skipif(
    not getattr(pyfuse3, "passthrough_available", lambda: False)(),
    reason="pyfuse3 built against a libfuse older than 3.17 (tools/install.sh could not build"
    " 3.17: see .venv/install.log)",
)


@pytest.fixture
def shared(tmp_path: Path, guest_tree: Path) -> tuple[Path, Path, Path]:
    """(template, guest A's backing, guest B's backing): a big shared file and a small one."""
    template = guest_tree
    (template / "usr" / "lib").mkdir(parents=True, exist_ok=True)
    (template / "usr" / "lib" / "libbig.so").write_bytes(os.urandom(BIG))
    (template / "etc" / "motd").write_text("shared\n")
    a, b = tmp_path / "a", tmp_path / "b"
    cowfs("clone", template, a)
    cowfs("clone", template, b)
    return template, a, b


def resident_bytes(path: Path) -> int:
    """Bytes of path's pages in the page cache, as the kernel answers mincore(2) for a
    mapping of it (fincore from util-linux)."""
    out = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return int(out.strip())


def drop_pages(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


@pytest.mark.parametrize("passthrough", [True, False])
def test_guests_reading_a_shared_file_share_its_page_cache(
    passthrough: bool, shared: tuple[Path, Path, Path], tmp_path: Path, mounts: Mounts
) -> None:
    template, a, b = shared
    flag = "--passthrough" if passthrough else "--no-passthrough"
    mnt_a = mounts.mount(a, tmp_path / "mnt-a", flag)
    mnt_b = mounts.mount(b, tmp_path / "mnt-b", flag)
    lib = "usr/lib/libbig.so"
    drop_pages(template / lib)
    assert resident_bytes(template / lib) == 0
    assert resident_bytes(mnt_b / lib) == 0  # nothing read yet: a count of 0 is possible
    (mnt_a / lib).read_bytes()
    assert resident_bytes(template / lib) == BIG  # A's read cached the shared inode's pages
    # B has read nothing. Through passthrough its mapping is of the shared inode, whose
    # pages A's read brought in; without, B's mount has a page cache of its own, empty.
    assert resident_bytes(mnt_b / lib) == (BIG if passthrough else 0)


def test_two_guests_map_the_same_pages(
    shared: tuple[Path, Path, Path], tmp_path: Path, mounts: Mounts
) -> None:
    """Two processes mapping a shared library through two guests' mounts share its pages:
    each one's proportional share (Pss) is half of what it maps."""
    _, a, b = shared
    mnt_a = mounts.mount(a, tmp_path / "mnt-a")
    mnt_b = mounts.mount(b, tmp_path / "mnt-b")
    program = (
        "import mmap, sys, time\n"
        "f = open(sys.argv[1], 'rb')\n"
        "m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)\n"
        "sum(m[i] for i in range(0, len(m), 4096))\n"
        "print('mapped', flush=True)\n"
        "time.sleep(60)\n"
    )
    mappers = [
        subprocess.Popen(
            ["python3", "-c", program, str(m / "usr/lib/libbig.so")],
            stdout=subprocess.PIPE,
            text=True,
        )
        for m in (mnt_a, mnt_b)
    ]
    try:
        for p in mappers:
            assert p.stdout is not None and p.stdout.readline() == "mapped\n"
        for p in mappers:
            rss, pss = _mapping_memory(p.pid, "libbig.so")
            assert rss == BIG // 1024
            assert pss == BIG // 1024 // 2, f"Pss {pss} kB of Rss {rss} kB: pages not shared"
    finally:
        for p in mappers:
            p.kill()
            p.wait()


def _mapping_memory(pid: int, name: str) -> tuple[int, int]:
    """(Rss, Pss) in kB of pid's mapping of a file named name."""
    rss = pss = 0
    inside = False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        if "-" in line.split(" ", 1)[0]:
            inside = line.endswith(name)
        elif inside and line.startswith("Rss:"):
            rss += int(line.split()[1])
        elif inside and line.startswith("Pss:"):
            pss += int(line.split()[1])
    return rss, pss


def test_a_reader_in_one_guest_never_sees_another_guests_write(
    shared: tuple[Path, Path, Path], tmp_path: Path, mounts: Mounts
) -> None:
    template, a, b = shared
    mnt_a = mounts.mount(a, tmp_path / "mnt-a")
    mnt_b = mounts.mount(b, tmp_path / "mnt-b")
    original = (template / "usr/lib/libbig.so").read_bytes()
    with open(mnt_a / "usr/lib/libbig.so", "rb") as reader:
        mapping = mmap.mmap(reader.fileno(), 0, prot=mmap.PROT_READ)
        with open(mnt_b / "usr/lib/libbig.so", "r+b") as writer:
            writer.write(b"B WAS HERE" * 1000)
        assert (mnt_b / "usr/lib/libbig.so").read_bytes()[:10] == b"B WAS HERE"
        assert reader.read() == original
        assert mapping[:] == original
        mapping.close()
    assert (template / "usr/lib/libbig.so").read_bytes() == original
    assert (mnt_a / "usr/lib/libbig.so").read_bytes() == original
    assert is_marked(template / "usr/lib/libbig.so") and not is_marked(b / "usr/lib/libbig.so")


def test_a_shared_mapping_for_writing_of_a_reader_is_refused(
    shared: tuple[Path, Path, Path], tmp_path: Path, mounts: Mounts
) -> None:
    template, a, _ = shared
    mnt_a = mounts.mount(a, tmp_path / "mnt-a")
    with open(mnt_a / "etc/motd", "rb") as reader:
        with pytest.raises(PermissionError):
            mmap.mmap(reader.fileno(), 0, flags=mmap.MAP_SHARED, prot=mmap.PROT_WRITE)
        private = mmap.mmap(reader.fileno(), 0, flags=mmap.MAP_PRIVATE)
        private[:6] = b"guest!"
        private.close()
    assert (template / "etc/motd").read_text() == "shared\n"
    assert (mnt_a / "etc/motd").read_text() == "shared\n"


CHANGES_OF_DATA = {
    "open for writing": lambda p: os.close(os.open(p, os.O_WRONLY)),
    "open O_RDONLY|O_TRUNC": lambda p: os.close(os.open(p, os.O_RDONLY | os.O_TRUNC)),
    "truncate": lambda p: os.truncate(p, 3),
}


@pytest.mark.parametrize("change", sorted(CHANGES_OF_DATA))
def test_the_data_of_a_file_being_read_through_the_kernel_does_not_change(
    change: str, shared: tuple[Path, Path, Path], tmp_path: Path, mounts: Mounts
) -> None:
    """ETXTBSY, as for a running program's file, rather than a reader on stale data."""
    template, a, _ = shared
    mnt_a = mounts.mount(a, tmp_path / "mnt-a")
    motd = mnt_a / "etc/motd"
    with open(motd, "rb") as reader:
        with pytest.raises(OSError) as refused:
            CHANGES_OF_DATA[change](motd)
        assert refused.value.errno == errno.ETXTBSY
        assert reader.read() == b"shared\n"
    assert is_marked(a / "etc/motd")  # no link was broken
    # Once the reader is gone, the change is made, and stays the guest's.
    CHANGES_OF_DATA[change](motd)
    motd.write_text("mine\n")
    assert motd.read_text() == "mine\n"
    assert (template / "etc/motd").read_text() == "shared\n"


def test_a_change_of_metadata_under_a_reader_breaks_the_link_and_reads_go_on(
    shared: tuple[Path, Path, Path], tmp_path: Path, mounts: Mounts
) -> None:
    template, a, _ = shared
    mnt_a = mounts.mount(a, tmp_path / "mnt-a")
    motd = mnt_a / "etc/motd"
    with open(motd, "rb") as reader:
        os.chmod(motd, 0o600)
        assert not is_marked(a / "etc/motd")
        assert (motd.stat().st_mode & 0o777) == 0o600
        # A new open of the node: the kernel would refuse it (EIO) unless served from the
        # readers' backing file; its data is the same.
        assert motd.read_text() == "shared\n"
        assert reader.read() == b"shared\n"
        # The readers' backing file is still the shared inode: a writer may not share it
        # (a writable mapping of it would write the shared inode).
        with pytest.raises(OSError) as refused:
            open(motd, "r+b").close()
        assert refused.value.errno == errno.ETXTBSY
    motd.write_text("mine\n")
    assert motd.read_text() == "mine\n"
    assert (template / "etc/motd").read_text() == "shared\n"
    assert (template / "etc/motd").stat().st_mode & 0o777 == 0o644


def test_a_private_file_is_read_from_its_backing_inode(
    shared: tuple[Path, Path, Path], tmp_path: Path, mounts: Mounts
) -> None:
    """A guest's own file too: one page cache (the backing file's), not two."""
    _, a, _ = shared
    mnt_a = mounts.mount(a, tmp_path / "mnt-a")
    (mnt_a / "own").write_bytes(os.urandom(BIG))
    drop_pages(a / "own")
    (a / "own").read_bytes()  # on the host: the backing inode's pages
    assert resident_bytes(mnt_a / "own") == BIG


def test_a_writer_and_a_mapping_reader_of_a_private_file_see_one_inode(
    shared: tuple[Path, Path, Path], tmp_path: Path, mounts: Mounts
) -> None:
    _, a, _ = shared
    mnt_a = mounts.mount(a, tmp_path / "mnt-a")
    own = mnt_a / "own"
    own.write_bytes(b"0" * 8192)
    with open(own, "rb") as reader:
        mapping = mmap.mmap(reader.fileno(), 0, prot=mmap.PROT_READ)
        with open(own, "r+b", buffering=0) as writer:
            writer.seek(4096)
            writer.write(b"written")
            shared_map = mmap.mmap(writer.fileno(), 0)
            shared_map[:6] = b"mapped"
            shared_map.flush()
            shared_map.close()
        assert mapping[4096:4103] == b"written" and mapping[:6] == b"mapped"
        mapping.close()
    assert (a / "own").read_bytes()[:6] == b"mapped"
    assert (a / "own").read_bytes()[4096:4103] == b"written"


def test_a_private_file_read_and_written_at_once_is_served_and_counted(
    shared: tuple[Path, Path, Path], tmp_path: Path, mounts: Mounts
) -> None:
    """A reader of a private file does not hold up its writer (a log and its tail), and
    every write(2) still reaches cowfs, which checks it against the guest's limit."""
    _, a, _ = shared
    used = json.loads(cowfs("du", a, "--json").stdout)["guests"][0]["private_bytes"]
    cowfs("limit", "set", a, "--space", str(used + 2 * 1024 * 1024))
    mnt_a = mounts.mount(a, tmp_path / "mnt-a")
    log_file = mnt_a / "var-log"
    log_file.write_bytes(b"first\n")
    with open(log_file, "rb") as tail, open(log_file, "ab", buffering=0) as appender:
        appender.write(b"second\n")
        assert tail.read() == b"first\nsecond\n"
        with pytest.raises(OSError) as full:
            for _ in range(64):
                appender.write(b"x" * 65536)
        assert full.value.errno == errno.ENOSPC
    assert log_file.stat().st_size <= 2 * 1024 * 1024 + 64


def test_without_passthrough_a_write_under_a_reader_goes_on_as_before(
    shared: tuple[Path, Path, Path], tmp_path: Path, mounts: Mounts
) -> None:
    """--no-passthrough keeps the old semantics: the write breaks the link at once and the
    reader follows the guest's private copy."""
    template, a, _ = shared
    mnt_a = mounts.mount(a, tmp_path / "mnt-a", "--no-passthrough")
    motd = mnt_a / "etc/motd"
    with open(motd, "rb") as reader:
        with open(motd, "r+b") as writer:
            writer.write(b"MINE")
        assert reader.read() == b"MINEed\n"
    assert (template / "etc/motd").read_text() == "shared\n"


@pytest.mark.parametrize("passthrough", [True, False])
def test_a_guests_configuration_turns_passthrough_on_or_off(
    passthrough: bool, ctx: Contextd, guest_tree: Path
) -> None:
    """contextd's `passthrough` key reaches the guest's root: with it, a shared file held
    open for reading inside the guest cannot be changed there (ETXTBSY); without, it can."""
    ctx("create", "pt", "--from", str(guest_tree), "--init", SLEEPER)
    ctx.configure("pt", passthrough=passthrough)
    ctx("start", "pt")
    result = ctx(
        "exec",
        "pt",
        "--",
        "/bin/sh",
        "-c",
        "exec 3</etc/passwd; echo x >> /etc/passwd && echo appended",
        check=False,
    )
    if passthrough:
        assert result.returncode != 0 and "Text file busy" in result.stderr, result
    else:
        assert result.returncode == 0 and result.stdout == "appended\n", result
    ctx("stop", "pt")
