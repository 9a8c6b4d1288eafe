"""Replacing a small file whole: readers see the old contents or the new, never a part.

Run records, the store's metadata and guest configurations are written this
way: the new contents go to a temporary name of the writer's own beside the
file, then rename(2) puts it in place in one step.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def write_atomically(
    path: Path, data: str | bytes, mode: int = 0o644, durable: bool = False
) -> None:
    """Make path hold data, in one step (durable: on disk before this returns, rename included)."""
    raw = data.encode() if isinstance(data, str) else data
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        try:
            view = memoryview(raw)
            while view:
                view = view[os.write(fd, view) :]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if durable:
        directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
