"""A one-line progress display on stderr, shown only when stderr is a terminal."""

from __future__ import annotations

import sys
import time


class ProgressLine:
    """Rewrites one status line at most every `interval` seconds; silent off a terminal."""

    def __init__(self, interval: float = 0.2):
        self.enabled = sys.stderr.isatty()
        self.interval = interval
        self._last = 0.0
        self._shown = False

    def show(self, text: str) -> None:
        """Display text if enough time passed since the last update."""
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last < self.interval:
            return
        self._last = now
        sys.stderr.write("\r\033[K" + text)
        sys.stderr.flush()
        self._shown = True

    def done(self) -> None:
        """Clear the line."""
        if self._shown:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()
