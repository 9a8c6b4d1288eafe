#!/usr/bin/env python3
"""cowfs beside its peers on the same trees, in one run: native, overlayfs, fuse-overlayfs, cowfs.

Every figure is printed as seconds and as a ratio to the native backing
directory (lower is better). Run as root:  .venv/bin/python bench/fs_bench.py
Options: --files N (tree size, default 50000), --big-mib N (default 1024),
--workdir DIR (default /var/tmp/cowfs-bench), --rounds N (every contender N
times in turn, medians reported), --markdown (a table for RESULTS.md).
Everything runs in a fresh ext4 mounted at the work directory (bench/scratch.py
says why); --no-scratch runs in the work directory's own filesystem.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from scratch import add_scratch_option, work_directory

COWFS = str(Path(sys.executable).parent / "cowfs")


def sh(*args: str | os.PathLike[str], **kw: object) -> subprocess.CompletedProcess[bytes]:
    """Run a command, failing loudly."""
    return subprocess.run([str(a) for a in args], check=True, **kw)  # type: ignore[call-overload]


def drop_caches() -> None:
    """Empty the page, dentry and inode caches (FUSE inodes too)."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def make_tree(root: Path, files: int, seed: int = 7) -> None:
    """A synthetic guest-like tree: 100 files per directory, 0-8 KiB each."""
    rng = random.Random(seed)
    per_dir = 100
    for d in range((files + per_dir - 1) // per_dir):
        sub = root / f"usr/share/pkg{d // 50:03d}/dir{d:04d}"
        sub.mkdir(parents=True, exist_ok=True)
        for f in range(min(per_dir, files - d * per_dir)):
            (sub / f"file{f:03d}").write_bytes(rng.randbytes(rng.randint(0, 8192)))


def make_shared(root: Path, count: int) -> None:
    """count files of 16 KiB for the first-write (copy-up / link break) test."""
    shared = root / "shared"
    shared.mkdir()
    for i in range(count):
        (shared / f"s{i:04d}").write_bytes(os.urandom(16384))


class Contender:
    """One filesystem under test: where the tree is seen and how to set it up."""

    name = ""
    only: tuple[str, ...] = ()  # the tests it runs, if not all

    def __init__(self, work: Path, base: Path):
        self.work = work / self.name
        self.base = base
        self.root = self.work / "mnt"

    def setup(self) -> None:
        raise NotImplementedError

    def teardown(self) -> None:
        if self.root.is_mount():
            sh("umount", self.root)


class Native(Contender):
    name = "native"

    def setup(self) -> None:
        self.work.mkdir(parents=True)
        sh("cp", "-a", self.base, self.root)

    def teardown(self) -> None:
        pass


class Overlay(Contender):
    name = "overlayfs"

    def _dirs(self) -> str:
        for d in ("upper", "work", "mnt"):
            (self.work / d).mkdir(parents=True, exist_ok=True)
        return f"lowerdir={self.base},upperdir={self.work}/upper,workdir={self.work}/work"

    def setup(self) -> None:
        sh("mount", "-t", "overlay", "overlay", "-o", self._dirs(), self.root)


class FuseOverlay(Overlay):
    name = "fuse-overlayfs"

    def setup(self) -> None:
        sh("fuse-overlayfs", "-o", self._dirs(), self.root)


class Cowfs(Contender):
    name = "cowfs"
    mount_options: tuple[str, ...] = ()

    def setup(self) -> None:
        self.work.mkdir(parents=True)
        sh(COWFS, "clone", self.base, self.work / "guest", stdout=subprocess.DEVNULL)
        self.root.mkdir()
        sh(
            COWFS,
            "mount",
            *self.mount_options,
            self.work / "guest",
            self.root,
            stdout=subprocess.DEVNULL,
        )

    def teardown(self) -> None:
        if self.root.is_mount():
            sh(COWFS, "umount", self.root)


class CowfsNoSync(Cowfs):
    """Link breaks without fdatasync, as fuse-overlayfs copies up (kernel overlayfs syncs)."""

    name = "cowfs --no-sync-breaks"
    mount_options = ("--no-sync-breaks",)
    only = ("first write to 1,000 shared files",)


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def best_of(n: int, prepare: Callable[[], None], fn: Callable[[], object]) -> float:
    result = float("inf")
    for _ in range(n):
        prepare()
        result = min(result, timed(fn))
    return result


def nothing() -> None:
    return None


def seq_write(root: Path, mib: int) -> None:
    sh(
        "dd",
        "if=/dev/zero",
        f"of={root}/big",
        "bs=1M",
        f"count={mib}",
        "conv=fsync",
        stderr=subprocess.DEVNULL,
    )


def seq_read(root: Path) -> None:
    sh("dd", f"if={root}/big", "of=/dev/null", "bs=1M", stderr=subprocess.DEVNULL)


def random_reads(root: Path, count: int, span: int) -> None:
    rng = random.Random(1)
    fd = os.open(root / "big", os.O_RDONLY)
    try:
        for _ in range(count):
            os.pread(fd, 4096, rng.randrange(0, span // 4096) * 4096)
    finally:
        os.close(fd)


def find(root: Path, printf: bool) -> None:
    args = ["find", str(root / "usr")] + (["-printf", "%s\n"] if printf else [])
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL)


def create_delete(root: Path, count: int) -> None:
    d = root / "churn"
    d.mkdir()
    payload = b"x" * 100
    for i in range(count):
        with open(d / f"f{i}", "wb") as f:
            f.write(payload)
    for i in range(count):
        os.unlink(d / f"f{i}")
    d.rmdir()


def tar_wc(root: Path) -> None:
    subprocess.run(
        f"tar cf - -C {root} usr | wc -c", shell=True, check=True, stdout=subprocess.DEVNULL
    )


def first_writes(root: Path, count: int) -> None:
    for i in range(count):
        fd = os.open(root / "shared" / f"s{i:04d}", os.O_WRONLY)
        os.pwrite(fd, b"changed", 0)
        os.close(fd)


def measure(root: Path, big_mib: int, only: tuple[str, ...] = ()) -> dict[str, float]:
    """Every test on one filesystem, in an order where each leaves what the next needs."""
    r: dict[str, float] = {}
    if only == ("first write to 1,000 shared files",):
        drop_caches()
        r[only[0]] = timed(lambda: first_writes(root, 1000))
        return r
    drop_caches()
    r["find, cold"] = timed(lambda: find(root, False))
    r["find, warm"] = best_of(3, nothing, lambda: find(root, False))
    drop_caches()
    r["find -printf %s, cold"] = timed(lambda: find(root, True))
    r["find -printf %s, warm"] = best_of(3, nothing, lambda: find(root, True))
    r["tar c | wc -c, warm"] = best_of(3, nothing, lambda: tar_wc(root))
    r["create+delete 10k files"] = best_of(3, nothing, lambda: create_delete(root, 10000))
    drop_caches()
    r["first write to 1,000 shared files"] = timed(lambda: first_writes(root, 1000))
    r[f"seq write {big_mib} MiB + fsync"] = timed(lambda: seq_write(root, big_mib))
    drop_caches()
    r[f"seq read {big_mib} MiB, cold"] = timed(lambda: seq_read(root))
    r[f"seq read {big_mib} MiB, warm"] = best_of(2, nothing, lambda: seq_read(root))
    span = big_mib * 2**20
    drop_caches()
    r["4 KiB random reads x5000, cold"] = timed(lambda: random_reads(root, 5000, span))
    r["4 KiB random reads x50000, warm"] = best_of(
        3, nothing, lambda: random_reads(root, 50000, min(span, 256 * 2**20))
    )
    return r


def run_benchmarks(
    contenders: list[Contender], big_mib: int, rounds: int = 1
) -> dict[str, dict[str, float]]:
    """measure() on each contender, set up and torn down in turn; medians over rounds.

    Odd rounds go through the contenders in reverse order: a warm sequential
    read was measured faster on whichever FUSE filesystem had filled its page
    cache last (memory placement in this VM, both ways round), and an even
    number of rounds gives each order the same weight.
    """
    runs: dict[str, list[dict[str, float]]] = {c.name: [] for c in contenders}
    for round_number in range(rounds):
        for c in contenders if round_number % 2 == 0 else contenders[::-1]:
            print(f"--- {c.name} (round {round_number + 1})", file=sys.stderr, flush=True)
            c.setup()
            try:
                runs[c.name].append(measure(c.root, big_mib, c.only))
            finally:
                c.teardown()
            if round_number + 1 < rounds:
                shutil.rmtree(c.work)  # the next round starts from a fresh copy
    return {
        name: {row: statistics.median(r[row] for r in results) for row in results[0]}
        for name, results in runs.items()
    }


def report(results: dict[str, dict[str, float]], markdown: bool) -> str:
    names = list(results)
    rows = list(results[names[0]])
    native = results["native"]
    lines = []
    if markdown:
        lines.append("| test | " + " | ".join(names) + " |")
        lines.append("|---|" + "---|" * len(names))
    for row in rows:
        cells = []
        for n in names:
            if row not in results[n]:
                cells.append("")
                continue
            secs = results[n][row]
            ratio = secs / native[row] if native[row] > 0 else float("nan")
            cells.append(f"{secs:.3f}s" if n == "native" else f"{secs:.3f}s ({ratio:.2f}x)")
        if markdown:
            lines.append(f"| {row} | " + " | ".join(cells) + " |")
        else:
            lines.append(f"{row:38s} " + "  ".join(f"{c:>18s}" for c in cells))
    if not markdown:
        lines.insert(0, f"{'':38s} " + "  ".join(f"{n:>18s}" for n in names))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=50000)
    parser.add_argument("--big-mib", type=int, default=1024)
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp/cowfs-bench"))
    add_scratch_option(parser)
    parser.add_argument(
        "--rounds", type=int, default=1, help="run every contender N times; medians reported"
    )
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--only", nargs="*", help="contenders to run (native always runs)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("fs_bench.py: run as root (it mounts filesystems)")
    work: Path = args.workdir
    if work.exists():
        for m in sorted(work.glob("*/mnt"), reverse=True):
            subprocess.run(["umount", "-l", str(m)], stderr=subprocess.DEVNULL, check=False)
    # Five big files and six copies of the tree, with room to spare.
    with work_directory(work, 5 * args.big_mib // 1024 + 5, scratch=not args.no_scratch):
        base = work / "base"
        base.mkdir()
        print(f"building a {args.files}-file tree in {base}", file=sys.stderr, flush=True)
        make_tree(base, args.files)
        make_shared(base, 1000)
        classes = [Native, Overlay, FuseOverlay, Cowfs, CowfsNoSync]
        contenders = [
            cls(work, base)
            for cls in classes
            if cls is Native or not args.only or cls.name in args.only
        ]
        results = run_benchmarks(contenders, args.big_mib, args.rounds)
        print(report(results, args.markdown))


if __name__ == "__main__":
    main()
