"""Sizes as people write them (10G, 512K) and as cowfs prints them."""

from __future__ import annotations

import re

from cowfs.errors import CowfsError

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*$", re.I)


def parse_size(text: str, what: str) -> int:
    """Bytes in "10G", "512K", "1.5T" or "4096"; a CowfsError naming `what` otherwise."""
    match = _SIZE.match(text)
    if not match:
        raise CowfsError(f"{what}: {text!r} is not a size (a number with K, M, G or T)")
    number, unit = match.groups()
    return int(float(number) * _UNITS[unit.upper()])


def format_bytes(count: int) -> str:
    """A short human size: 1.5 GiB."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
