"""A guest's console log: ``python -m contextd.console LOGFILE`` copies stdin to LOGFILE.

contextd starts one per guest on the read end of the pipe that is init's
stdout and stderr. It runs in its own session, so the guest's console keeps
being written while contextd is stopped, and ends when the guest's last
process closes the pipe.
"""

from __future__ import annotations

import os
import sys

MAX_LOG = 8 << 20  # keep the log below this size: older half dropped


def main() -> None:
    """python -m contextd.console LOGFILE."""
    copy_to_log(sys.argv[1])


def copy_to_log(path: str) -> None:
    """Copy stdin to the log file at path until end of file, keeping it under MAX_LOG."""
    out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    while chunk := os.read(0, 65536):
        os.write(out, chunk)
        if os.fstat(out).st_size > MAX_LOG:
            with open(path, "rb") as f:
                f.seek(-MAX_LOG // 2, os.SEEK_END)
                tail = f.read()
            os.ftruncate(out, 0)
            os.write(out, tail)


if __name__ == "__main__":
    main()
