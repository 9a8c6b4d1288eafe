#!/usr/bin/env python3
"""The cost of disk limits and quota on cowfs's write path, and cowfs du beside du -s, one run.

Two mounts of clones of the same tree: one guest with no limits or quota, one
with a space and inode limit and user and group quotas (large enough never to
refuse). Each runs the same write-path work; then `cowfs du` and `du -s` time
the same guests with a warm cache. Run as root:
    .venv/bin/python bench/accounting_bench.py [--files N] [--markdown]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fs_bench import create_delete, make_tree
from scratch import add_scratch_option, work_directory

COWFS = str(Path(sys.executable).parent / "cowfs")


def sh(*args: str | os.PathLike[str]) -> None:
    subprocess.run([str(a) for a in args], check=True, stdout=subprocess.DEVNULL)


def best_of(n: int, fn: Callable[[], object]) -> float:
    best = float("inf")
    for _ in range(n):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def small_appends(root: Path, count: int) -> None:
    with open(root / "appends", "ab", buffering=0) as f:
        for _ in range(count):
            f.write(b"y" * 4096)
    os.unlink(root / "appends")


def big_write(root: Path, mib: int) -> None:
    chunk = b"z" * (1 << 20)
    with open(root / "big", "wb", buffering=0) as f:
        for _ in range(mib):
            f.write(chunk)
    os.unlink(root / "big")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=20000)
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp/cowfs-acct-bench"))
    parser.add_argument("--markdown", action="store_true")
    add_scratch_option(parser)
    args = parser.parse_args()
    work: Path = args.workdir
    for m in work.glob("mnt-*"):
        subprocess.run(["umount", "-l", str(m)], check=False, stderr=subprocess.DEVNULL)
    with work_directory(work, 2, scratch=not args.no_scratch):
        measure(work, args)


def measure(work: Path, args: argparse.Namespace) -> None:
    """Both guests' write-path work, then the reports; the tables."""
    os.environ["COWFS_ROOT"] = str(work / "root")
    base = work / "base"
    make_tree(base, args.files)
    rows: dict[str, dict[str, float]] = {}
    for label, limited in (("no limits", False), ("limits + quota", True)):
        guest = work / ("limited" if limited else "free")
        sh(COWFS, "clone", base, guest)
        if limited:
            sh(
                COWFS,
                "limit",
                "set",
                guest,
                "--space",
                "100G",
                "--inodes",
                "10000000",
                "--reserved",
                "5%",
            )
            (guest / "etc").mkdir(exist_ok=True)
            (guest / "etc" / "passwd").write_text("root:x:0:0::/root:/bin/sh\n")
            (guest / "etc" / "group").write_text("root:x:0:\n")
            sh(
                COWFS,
                "quota",
                "set",
                guest,
                "--user",
                "root",
                "--space-hard",
                "100G",
                "--inodes-hard",
                "10000000",
            )
            sh(
                COWFS,
                "quota",
                "set",
                guest,
                "--group",
                "root",
                "--space-soft",
                "90G",
                "--space-hard",
                "100G",
            )
        mnt = work / f"mnt-{guest.name}"
        mnt.mkdir()
        sh(COWFS, "mount", guest, mnt)
        try:
            r = rows[label] = {}
            r["create+delete 10k files"] = best_of(3, partial(create_delete, mnt, 10000))
            r["20,000 appends of 4 KiB"] = best_of(3, partial(small_appends, mnt, 20000))
            r["write 512 MiB in 1 MiB writes"] = best_of(3, partial(big_write, mnt, 512))
        finally:
            sh(COWFS, "umount", mnt)
    guests = [work / "free", work / "limited"]
    subprocess.run(["du", "-s", *map(str, guests)], check=True, stdout=subprocess.DEVNULL)
    du_s = best_of(3, lambda: sh("du", "-s", *guests))
    cowfs_du = best_of(3, lambda: sh(COWFS, "du", *guests))
    header = f"tree: {args.files} files; cowfs du and du -s over both guests"
    if args.markdown:
        print(header + "\n")
        print("| work | no limits | limits + quota | ratio |")
        print("|---|---|---|---|")
        for row in rows["no limits"]:
            a, b = rows["no limits"][row], rows["limits + quota"][row]
            print(f"| {row} | {a:.3f}s | {b:.3f}s | {b / a:.2f}x |")
        print("\n| report | du -s | cowfs du | ratio |\n|---|---|---|---|")
        print(f"| two guests, warm | {du_s:.3f}s | {cowfs_du:.3f}s | {cowfs_du / du_s:.2f}x |")
    else:
        print(header)
        for row in rows["no limits"]:
            a, b = rows["no limits"][row], rows["limits + quota"][row]
            print(f"{row:32s} {a:8.3f}s {b:8.3f}s  {b / a:.2f}x")
        print(f"du -s {du_s:.3f}s   cowfs du {cowfs_du:.3f}s   {cowfs_du / du_s:.2f}x")


if __name__ == "__main__":
    main()
