#!/usr/bin/env python3
"""cowfs hashify beside jdupes, rdfind and util-linux hardlink, on three Debian guests, one run.

Guests: two separate `debootstrap --variant=minbase bookworm` (tools/mkguest-debian.sh
slots 1 and 2: their dpkg/apt files differ in mtime) and a `cp -a` of the first.
For each tool, with a warm page cache: the time to find duplicates (a dry run,
best of three), then the time to link them on a fresh copy of the guests (best
of --repeat copies), the files it linked and the bytes it saved (`du` of the
three trees before and after, which counts each inode once).
Run as root:  .venv/bin/python bench/hashify_bench.py [--markdown]. Everything runs
in a fresh ext4 mounted at the work directory (bench/scratch.py says why).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from scratch import add_scratch_option, work_directory

ROOT = Path(__file__).resolve().parent.parent
COWFS = str(Path(sys.executable).parent / "cowfs")


def sh(args: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    """Run a command quietly, failing loudly."""
    return subprocess.run(args, check=True, capture_output=True, text=True, **kw)  # type: ignore[call-overload]


def du_bytes(dirs: list[Path]) -> int:
    """Disk bytes of the trees together, each inode counted once."""
    out = sh(["du", "-s", "-B1", "-c", *map(str, dirs)]).stdout
    return int(out.strip().splitlines()[-1].split()[0])


def links_made(dirs: list[Path]) -> int:
    """Regular files minus distinct inodes: names that share an inode with another."""
    files = 0
    inodes = set()
    for d in dirs:
        for dirpath, _dirs, names in os.walk(d):
            for name in names:
                st = os.lstat(os.path.join(dirpath, name))
                if (st.st_mode & 0o170000) == 0o100000:
                    files += 1
                    inodes.add((st.st_dev, st.st_ino))
    return files - len(inodes)


def warm(dirs: list[Path]) -> None:
    """Read every file once so that all tools start from a warm page cache."""
    subprocess.run(
        ["tar", "cf", "/dev/null", *map(str, dirs)],
        check=False,
        stderr=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
    )
    subprocess.run(
        f"find {' '.join(map(str, dirs))} -type f -print0 | xargs -0 cat > /dev/null",
        shell=True,
        check=False,
        stderr=subprocess.DEVNULL,
    )


Tool = tuple[str, Callable[[list[Path], Path], list[str]], Callable[[list[Path], Path], list[str]]]

TOOLS: list[Tool] = [
    (
        "cowfs hashify (whole tree)",
        lambda d, s: [
            COWFS,
            "hashify",
            "-n",
            "--no-default-excludes",
            "--min-size",
            "1",
            "--store",
            str(s),
            *map(str, d),
        ],
        lambda d, s: [
            COWFS,
            "hashify",
            "--no-default-excludes",
            "--min-size",
            "1",
            "--store",
            str(s),
            *map(str, d),
        ],
    ),
    (
        "cowfs hashify (default excludes)",
        lambda d, s: [COWFS, "hashify", "-n", "--store", str(s), *map(str, d)],
        lambda d, s: [COWFS, "hashify", "--store", str(s), *map(str, d)],
    ),
    (
        "jdupes -r -L (content only)",
        lambda d, s: ["jdupes", "-r", "-q", *map(str, d)],
        lambda d, s: ["jdupes", "-r", "-q", "-L", *map(str, d)],
    ),
    (
        "rdfind -makehardlinks (content only)",
        lambda d, s: [
            "rdfind",
            "-dryrun",
            "true",
            "-makehardlinks",
            "true",
            "-outputname",
            str(s) + ".rdfind",
            *map(str, d),
        ],
        lambda d, s: [
            "rdfind",
            "-makehardlinks",
            "true",
            "-outputname",
            str(s) + ".rdfind",
            *map(str, d),
        ],
    ),
    (
        "hardlink (mode, owner, mtime equal)",
        lambda d, s: ["hardlink", "-n", "-q", *map(str, d)],
        lambda d, s: ["hardlink", "-q", *map(str, d)],
    ),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp/cowfs-hashify-bench"))
    add_scratch_option(parser)
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument(
        "--repeat", type=int, default=2, help="link trials per tool, on fresh copies (best kept)"
    )
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("hashify_bench.py: run as root")
    with work_directory(args.workdir, 8, scratch=not args.no_scratch) as work:
        measure_all(work, args)


def measure_all(work: Path, args: argparse.Namespace) -> None:
    """Build the guests under work, time every tool, print the table."""
    pristine = [work / "pristine" / n for n in ("deb1", "deb2", "copy1")]
    print("building guests (debootstrap is cached per machine)", file=sys.stderr, flush=True)
    sh([str(ROOT / "tools" / "mkguest-debian.sh"), str(pristine[0]), "1"])
    sh([str(ROOT / "tools" / "mkguest-debian.sh"), str(pristine[1]), "2"])
    sh(["cp", "-a", str(pristine[0]), str(pristine[2])])
    files = sum(len(f) for g in pristine for _, _, f in os.walk(g))
    size = du_bytes(pristine)
    rows = []
    for name, dry, link in TOOLS:
        print(f"--- {name}", file=sys.stderr, flush=True)
        find_s = link_s = float("inf")
        for attempt in range(args.repeat):
            trial = work / "trial"
            shutil.rmtree(trial, ignore_errors=True)
            trial.mkdir()
            guests = [trial / g.name for g in pristine]
            for src, dst in zip(pristine, guests, strict=True):
                sh(["cp", "-a", str(src), str(dst)])
            store = trial / "store"
            # Written back and read in before timing: no writeback of the copy
            # competes with the tool, and every tool starts from a warm cache.
            os.sync()
            warm(guests)
            if attempt == 0:
                for _ in range(3):
                    start = time.perf_counter()
                    subprocess.run(dry(guests, store), check=True, stdout=subprocess.DEVNULL)
                    find_s = min(find_s, time.perf_counter() - start)
                before = du_bytes(guests)
                links_before = links_made(guests)
            start = time.perf_counter()
            subprocess.run(link(guests, store), check=True, stdout=subprocess.DEVNULL)
            link_s = min(link_s, time.perf_counter() - start)
            if attempt == 0:
                saved = before - du_bytes(guests)
                linked = links_made(guests) - links_before
            shutil.rmtree(trial, ignore_errors=True)
            for leftover in work.glob("*.rdfind"):
                leftover.unlink()
        rows.append((name, find_s, link_s, linked, saved))
    header = f"three guests: {files} files, {size / 2**20:.1f} MiB on disk"
    if args.markdown:
        print(header + "\n")
        print("| tool | find (dry run) | link | files linked | saved |")
        print("|---|---|---|---|---|")
        for name, f, lk, n, s in rows:
            print(f"| {name} | {f:.2f}s | {lk:.2f}s | {n} | {s / 2**20:.1f} MiB |")
    else:
        print(header)
        for name, f, lk, n, s in rows:
            print(f"{name:40s} find {f:6.2f}s  link {lk:6.2f}s  {n:6d} files  {s / 2**20:7.1f} MiB")


if __name__ == "__main__":
    main()
