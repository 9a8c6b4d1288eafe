#!/usr/bin/env python3
"""Page cache grown by N guests reading the same shared tree (a Debian /usr), per contender.

The template is a Debian bookworm minbase tree (tools/mkguest-debian.sh). Each
contender gives N guests the same files, and each guest reads every regular
file under its /usr through its own root, one guest after the other:

* cowfs: N `cowfs clone`s of the template, each mounted with cowfs (FUSE
  passthrough of read-only opens of shared files, the default);
* cowfs --no-passthrough: the same clones, mounted without it (each mount
  caches what it reads in its own page cache, on top of the backing file's);
* overlayfs: N overlay mounts with the template as their lower layer and an
  upper and work directory each;
* hard links: N `cp -al` copies of the template's /usr, read directly (one
  inode per file, so one cache: the native baseline).

Before each contender's run the caches are dropped, /proc/meminfo's Cached
recorded, the N guests' reads done, and Cached recorded again: the growth is
the page cache the N guests cost, along with whatever else the host cached
meanwhile. So the page cache the trees' own inodes hold is counted too
(cachestat(2) on every file and directory of the template and of each guest's
root, each inode once; through a FUSE or overlay mount that is the mount's own
inode's pages). The contenders run in turn for each N,
every round (odd rounds in reverse order); medians, min and max over rounds.
With --mmap, N processes then map the same shared library (libc) through N
guests, one guest each, and touch every page: the total proportional set size
of those mappings (their pages shared or not).

Runs in a 0700 directory of --workdir's filesystem (not a loop-mounted scratch
ext4: a loop device's backing file would cache every page a second time).
Every mount and tree is removed afterwards. Prints a table for RESULTS.md. Run as root:
    .venv/bin/python bench/pagecache_bench.py [--rounds 3] [--guests 1,2,10] [--mmap]
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COWFS = str(Path(sys.executable).parent / "cowfs")
RUN_DIR = Path(os.environ.get("COWFS_RUN_DIR", "/run/cowfs"))
LIBC = "usr/lib/x86_64-linux-gnu/libc.so.6"
MIB = 2**20
PAGE = os.sysconf("SC_PAGESIZE")
MAPPING = re.compile(r"[0-9a-f]+-[0-9a-f]+ ")  # a mapping's first line in /proc/PID/smaps

# A process that maps a file read-only and privately, as the dynamic loader maps a
# library, touches every page, prints the mapping's address and waits for its stdin
# to close.
MAPPER = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_long]
fd = os.open(sys.argv[1], os.O_RDONLY)
size = os.fstat(fd).st_size
addr = libc.mmap(None, size, 1, 2, fd, 0)  # PROT_READ, MAP_PRIVATE
if addr in (None, ctypes.c_void_p(-1).value):
    sys.exit("mmap failed: " + os.strerror(ctypes.get_errno()))
os.close(fd)
touched = sum(ctypes.string_at(addr + offset, 1)[0] for offset in range(0, size, 4096))
print(hex(addr), touched, flush=True)
sys.stdin.read()
"""


def sh(*args: str | os.PathLike[str]) -> None:
    """Run a command, failing loudly, its output discarded."""
    subprocess.run([str(a) for a in args], check=True, stdout=subprocess.DEVNULL)


def drop_caches() -> None:
    """Empty the page, dentry and inode caches (FUSE inodes' pages too)."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def meminfo() -> dict[str, int]:
    """/proc/meminfo's figures, in bytes."""
    return {
        line.split(":")[0]: int(line.split()[1]) * 1024
        for line in Path("/proc/meminfo").read_text().splitlines()
    }


def regular_files(top: Path, directories: bool = False) -> Iterator[str]:
    """Every regular file under top (symlinks not followed), and directories if asked."""
    todo = [top]
    while todo:
        directory = todo.pop()
        if directories:
            yield str(directory)
        with os.scandir(directory) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    todo.append(Path(entry.path))
                elif entry.is_file(follow_symlinks=False):
                    yield entry.path


def read_tree(top: Path) -> tuple[int, int]:
    """Read every regular file under top to its end: (files, bytes)."""
    files = total = 0
    buffer = bytearray(MIB)
    for path in regular_files(top):
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            while n := os.readv(fd, [buffer]):
                total += n
        finally:
            os.close(fd)
        files += 1
    return files, total


class _CacheStatRange(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _CacheStat(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_uint64)
        for name in ("nr_cache", "nr_dirty", "nr_writeback", "nr_evicted", "nr_recently_evicted")
    ]


_LIBC = ctypes.CDLL(None, use_errno=True)
SYS_CACHESTAT = 451  # x86_64 and every architecture of the unified syscall table (Linux 6.5+)


def cached_pages(fd: int) -> int:
    """Pages of the page cache that the inode fd's file reads from holds (cachestat(2)).

    An fd opened through a FUSE or overlay mount reports that mount's own inode's
    pages, not the backing inode's: the pages the mount caches by itself.
    """
    whole, out = _CacheStatRange(0, 0), _CacheStat()
    if _LIBC.syscall(SYS_CACHESTAT, fd, ctypes.byref(whole), ctypes.byref(out), 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"cachestat: {os.strerror(err)}")
    return int(out.nr_cache)


def inodes_cached_bytes(tops: list[Path]) -> int:
    """Page cache held by the inodes of the files and directories under tops, each inode once.

    Directories count for FUSE mounts: the kernel caches their listings in the
    directory inode's pages (cowfs lets it), ~1 page a directory per mount.
    """
    seen: set[tuple[int, int]] = set()
    total = 0
    for top in tops:
        for path in regular_files(top, directories=True):
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
            try:
                st = os.fstat(fd)
                if (st.st_dev, st.st_ino) not in seen:
                    seen.add((st.st_dev, st.st_ino))
                    total += cached_pages(fd) * PAGE
            finally:
                os.close(fd)
    return total


def mount_key(mountpoint: Path) -> str:
    """A cowfs mount's name in the run directory's records (cowfs.host.registry.mount_key)."""
    return hashlib.sha256(str(mountpoint).encode()).hexdigest()[:16]


def cowfs_stats(mountpoint: Path) -> dict[str, object]:
    """The counts a cowfs mount's server publishes, published afresh (SIGHUP) and read."""
    record = json.loads((RUN_DIR / "mounts" / f"{mount_key(mountpoint)}.json").read_text())
    path = RUN_DIR / "stats" / f"{mount_key(mountpoint)}.json"
    asked = time.time()
    os.kill(record["pid"], signal.SIGHUP)
    deadline = asked + 10
    while time.time() < deadline:
        try:
            data = json.loads(path.read_text())
            if data.get("written", 0) >= asked and data.get("pid") == record["pid"]:
                return dict(data)
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    return {}


def mapping_pss_kib(pid: int, address: int) -> int:
    """Pss of the mapping of process pid that starts at address, in KiB."""
    inside = False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        if MAPPING.match(line):
            inside = line.startswith(f"{address:x}-")
        elif inside and line.startswith("Pss:"):
            return int(line.split()[1])
    raise RuntimeError(f"no mapping at {address:#x} in process {pid}")


def mapped_pss_kib(paths: list[Path]) -> int:
    """Total Pss of one process per path, each mapping its file and touching every page."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", MAPPER, str(p)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for p in paths
    ]
    try:
        addresses = []
        for proc in procs:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError(f"the mapping process failed (status {proc.wait()})")
            addresses.append(int(line.split()[0], 16))
        return sum(mapping_pss_kib(p.pid, a) for p, a in zip(procs, addresses, strict=True))
    finally:
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.close()
            proc.wait()


class Contender:
    """N guest roots seeing the template's files: made once, mounted per measurement."""

    name = ""
    slug = ""

    def __init__(self, work: Path, template: Path):
        self.work = work
        self.template = template
        self.mounted: list[Path] = []

    def prepare(self, most: int) -> None:
        """Make what up to `most` guests need (before any measurement)."""

    def setup(self, n: int) -> list[Path]:
        """The roots of n guests, ready to be read."""
        raise NotImplementedError

    def teardown(self) -> None:
        while self.mounted:
            sh("umount", self.mounted.pop())

    def check(self) -> str:
        """Anything odd about the last run, for the report (empty if nothing)."""
        return ""

    def mountpoint(self, k: int) -> Path:
        mnt = self.work / "mnt" / f"{self.slug}-{k}"
        mnt.mkdir(parents=True, exist_ok=True)
        return mnt


class HardLinks(Contender):
    name = "hard links"
    slug = "links"

    def prepare(self, most: int) -> None:
        for k in range(most):
            (self.work / "links" / str(k)).mkdir(parents=True)
            sh("cp", "-al", self.template / "usr", self.work / "links" / str(k) / "usr")

    def setup(self, n: int) -> list[Path]:
        return [self.work / "links" / str(k) for k in range(n)]


class Overlay(Contender):
    name = "overlayfs"
    slug = "overlay"

    def setup(self, n: int) -> list[Path]:
        for k in range(n):
            layer = self.work / "overlay" / str(k)
            shutil.rmtree(layer, ignore_errors=True)
            (layer / "upper").mkdir(parents=True)
            (layer / "work").mkdir()
            options = f"lowerdir={self.template},upperdir={layer}/upper,workdir={layer}/work"
            mnt = self.mountpoint(k)
            sh("mount", "-t", "overlay", "overlay", "-o", options, mnt)
            self.mounted.append(mnt)
        return list(self.mounted)


class Cowfs(Contender):
    name = "cowfs"
    slug = "cowfs"
    options: tuple[str, ...] = ()

    def __init__(self, work: Path, template: Path):
        super().__init__(work, template)
        self.stats: list[dict[str, object]] = []

    def guest(self, k: int) -> Path:
        return self.work / "guests" / f"g{k}"

    def prepare(self, most: int) -> None:
        for k in range(most):
            if not self.guest(k).exists():  # shared by both cowfs contenders
                sh(COWFS, "clone", self.template, self.guest(k))

    def setup(self, n: int) -> list[Path]:
        (self.work / "logs").mkdir(exist_ok=True)
        for k in range(n):
            mnt = self.mountpoint(k)
            log = self.work / "logs" / f"{self.slug}-{k}.log"
            sh(COWFS, "mount", *self.options, "--log", log, self.guest(k), mnt)
            self.mounted.append(mnt)
        return list(self.mounted)

    def collect(self) -> None:
        """The servers' counts after the reads (passthrough opens, reads they answered)."""
        self.stats = [cowfs_stats(mnt) for mnt in self.mounted]

    def teardown(self) -> None:
        while self.mounted:
            sh(COWFS, "umount", self.mounted.pop())

    def check(self) -> str:
        opens = [int(str(s.get("passthrough_opens", 0))) for s in self.stats]
        reads = [int(str(s.get("handler_reads", 0))) for s in self.stats]
        cached = [int(str(s.get("page_cache_reads", 0))) for s in self.stats]
        missing = sum(1 for s in self.stats if not s)
        note = (
            f"passthrough opens per guest {opens}, reads answered by the server's handler"
            f" {reads} and from the page cache without it {cached}"
        )
        return note + (f", {missing} mounts published no counts" if missing else "")


class CowfsNoPassthrough(Cowfs):
    name = "cowfs --no-passthrough"
    slug = "cowfs-nopt"
    options = ("--no-passthrough",)


def spread(values: list[float]) -> str:
    return f"{min(values):.1f}-{max(values):.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp/cowfs-pagecache-bench"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--guests", default="1,2,10", help="the values of N, comma-separated")
    parser.add_argument("--mmap", action="store_true", help="also the Pss of N mappings of libc")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("pagecache_bench.py: run as root (it mounts filesystems)")
    counts = [int(n) for n in args.guests.split(",")]
    work: Path = args.workdir
    if work.exists():
        sys.exit(f"pagecache_bench.py: {work} exists (left by a killed run?): remove it first")
    work.mkdir(parents=True)
    work.chmod(0o700)  # cowfs refuses trees and mountpoints that host users can reach
    contenders: list[Contender] = []
    try:
        template = work / "template"
        print(f"copying the Debian tree to {template}", file=sys.stderr, flush=True)
        sh(ROOT / "tools" / "mkguest-debian.sh", template)
        contenders = [
            cls(work, template) for cls in (HardLinks, Overlay, Cowfs, CowfsNoPassthrough)
        ]
        for c in contenders:
            c.prepare(max(counts))
        print(report(run(contenders, counts, args.rounds, args.mmap), template, args), flush=True)
    finally:
        for c in contenders:
            try:
                c.teardown()
            except subprocess.CalledProcessError as e:
                print(f"teardown of {c.name}: {e}", file=sys.stderr)
        for mnt in (work / "mnt").glob("*") if (work / "mnt").exists() else []:
            if mnt.is_mount():  # left by a failed teardown
                subprocess.run(["umount", "-l", str(mnt)], check=False)
        shutil.rmtree(work, ignore_errors=True)


Results = dict[tuple[int, str], dict[str, list[float]]]


def run(contenders: list[Contender], counts: list[int], rounds: int, mmap: bool) -> Results:
    """Every contender for every N, rounds times; figures by (N, contender name)."""
    results: Results = {}
    for round_number in range(rounds):
        for n in counts:
            for c in contenders if round_number % 2 == 0 else contenders[::-1]:
                print(f"--- N={n} {c.name} (round {round_number + 1})", file=sys.stderr, flush=True)
                roots = c.setup(n)
                try:
                    drop_caches()
                    before = meminfo()
                    began = time.perf_counter()
                    read = [read_tree(r / "usr") for r in roots]
                    took = time.perf_counter() - began
                    after = meminfo()
                    figures = {
                        "grown": (after["Cached"] - before["Cached"]) / MIB,
                        "shmem": (after["Shmem"] - before["Shmem"]) / MIB,  # tmpfs: noise
                        "seconds": took,
                    }
                    figures["files"] = float(read[0][0])
                    figures["read"] = read[0][1] / MIB
                    if len({f for f, _ in read}) != 1:
                        print(f"guests read different file counts: {read}", file=sys.stderr)
                    if isinstance(c, Cowfs):
                        c.collect()  # before the opens below count as passthrough opens
                    tops = [c.template / "usr"] + [r / "usr" for r in roots]
                    figures["inodes"] = inodes_cached_bytes(tops) / MIB
                    if mmap:
                        figures["pss"] = mapped_pss_kib([r / LIBC for r in roots]) / 1024
                    note = c.check()
                    if note:
                        print(f"    {note}", file=sys.stderr)
                finally:
                    c.teardown()
                print(
                    f"    grown {figures['grown']:.1f} MiB (Shmem {figures['shmem']:+.1f}),"
                    f" the tree's inodes cache {figures['inodes']:.1f} MiB"
                    f" in {took:.2f}s" + (f", libc Pss {figures['pss']:.2f} MiB" if mmap else ""),
                    file=sys.stderr,
                    flush=True,
                )
                entry = results.setdefault((n, c.name), {})
                for key, value in figures.items():
                    entry.setdefault(key, []).append(value)
    return results


def report(results: Results, template: Path, args: argparse.Namespace) -> str:
    du = subprocess.run(
        ["du", "-s", "--apparent-size", "-B1", str(template / "usr")],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()[0]
    first = next(iter(results.values()))
    lines = [
        f"/usr: {int(du) / MIB:.1f} MiB (du --apparent-size); each guest read"
        f" {statistics.median(first['files']):.0f} files, {statistics.median(first['read']):.1f}"
        f" MiB; rounds: {args.rounds}",
        "",
    ]
    header = (
        "| N | contender | Cached grown: median (min-max) | vs overlayfs, hard links"
        " | the tree's inodes' cache: median (min-max) | vs overlayfs, hard links | reads took |"
    )
    if args.mmap:
        header += " libc Pss, N mappings | vs overlayfs |"
    lines += [header, "|---" * header.count(" |") + "|"]
    for n, name in results:
        row = f"| {n} | {name} |"
        for key in ("grown", "inodes"):
            value = statistics.median(results[(n, name)][key])
            overlay = statistics.median(results[(n, "overlayfs")][key])
            links = statistics.median(results[(n, "hard links")][key])
            row += (
                f" {value:.1f} MiB ({spread(results[(n, name)][key])})"
                f" | {value / overlay:.2f}x, {value / links:.2f}x |"
            )
        row += f" {statistics.median(results[(n, name)]['seconds']):.2f}s |"
        if args.mmap:
            pss = statistics.median(results[(n, name)]["pss"])
            overlay_pss = statistics.median(results[(n, "overlayfs")]["pss"])
            row += f" {pss:.2f} MiB | {pss / overlay_pss:.2f}x |"
        lines.append(row)
    return "\n".join(lines)


if __name__ == "__main__":
    main()
