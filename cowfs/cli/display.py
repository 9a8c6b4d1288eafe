"""Printing host paths safely: a guest's file names may hold newlines or invalid UTF-8."""

from __future__ import annotations

import os

_CONTROL = {i: f"\\x{i:02x}" for i in range(32)} | {9: "\\t", 10: "\\n", 13: "\\r", 127: "\\x7f"}


def display_path(path: str | bytes) -> str:
    """path with invalid UTF-8 and control characters backslash-escaped (one line, printable)."""
    if isinstance(path, str) and path.isascii() and path.isprintable() and "\\" not in path:
        return path  # nearly every path: nothing to escape
    raw = path if isinstance(path, bytes) else os.fsencode(path)
    text = raw.replace(b"\\", b"\\\\").decode("utf-8", "backslashreplace")
    return text.translate(_CONTROL)
