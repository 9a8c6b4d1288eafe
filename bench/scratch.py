"""A scratch ext4 on a loop device, so that a benchmark does not feel what ran before it.

The development VM's root filesystem is mounted with ``discard``: after a large
deletion (a test suite's temporary trees, a previous benchmark's), its journal
commits carry discards for minutes, and every create, link and rename waits for
them. Measured there: a create took 15 µs before 20,000 files of 8 KiB were
deleted, ~1 ms for the next 25 seconds and 100-330 µs two minutes later; on an
ext4 of its own, mounted without discard, 11-17 µs right after the same deletion.

The image is written once (zeros, so that no later write has to allocate on the
host filesystem), kept for the next run, and made a new filesystem
(``mkfs.ext4 -E nodiscard``) each time. Delete it to get its space back.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

IMAGE = Path("/var/tmp/cowfs-bench-scratch.img")
DEFAULT_GIB = 12


def _run(*args: str) -> None:
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


@contextlib.contextmanager
def scratch_fs(mountpoint: Path, size_gib: int, image: Path = IMAGE) -> Iterator[Path]:
    """A fresh ext4 of at least size_gib mounted at mountpoint (made if missing) meanwhile."""
    if image == IMAGE:
        # One size for every benchmark, so that none has to replace (and so delete) another's.
        size_gib = max(size_gib, DEFAULT_GIB)
    if not image.exists() or image.stat().st_size < size_gib << 30:
        print(f"writing the scratch image {image} ({size_gib} GiB, once)", file=sys.stderr)
        image.unlink(missing_ok=True)
        _run("dd", "if=/dev/zero", f"of={image}", "bs=64M", f"count={size_gib * 16}", "conv=fsync")
    _run("mkfs.ext4", "-q", "-F", "-E", "nodiscard,lazy_itable_init=0", str(image))
    mountpoint.mkdir(parents=True, exist_ok=True)
    _run("mount", "-o", "loop", str(image), str(mountpoint))
    try:
        yield mountpoint
    finally:
        os.sync()
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)


def add_scratch_option(parser: argparse.ArgumentParser) -> None:
    """The --no-scratch option of every benchmark that uses work_directory()."""
    parser.add_argument(
        "--no-scratch",
        action="store_true",
        help="run in --workdir's own filesystem, not a fresh scratch ext4 mounted there",
    )


@contextlib.contextmanager
def work_directory(
    path: Path, size_gib: int, scratch: bool = True, image: Path = IMAGE
) -> Iterator[Path]:
    """path, empty: a fresh scratch ext4 mounted there, or a plain directory; gone afterwards.

    A benchmark that may run beside another one gives its own image, of its own size.
    """
    if path.is_mount():  # left by a killed run
        subprocess.run(["umount", "-l", str(path)], check=False)
    shutil.rmtree(path, ignore_errors=True)
    if scratch:
        with scratch_fs(path, size_gib, image):
            path.chmod(0o700)  # root-only: cowfs refuses trees and mountpoints host users can reach
            yield path
        path.rmdir()
    else:
        path.mkdir(parents=True)
        path.chmod(0o700)
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)
