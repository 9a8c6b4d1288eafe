"""A function run in a forked child process, on another CPU, its result marshalled back.

For the commands whose work splits across CPUs (hashify's hashing, du's scans
of several guests). The child inherits everything (nothing is sent to it) and
sends back only the function's result, marshalled through a pipe (plain data:
numbers, bytes, strings, tuples, lists, dicts). It leaves with os._exit: no
atexit handlers, no flushing of the parent's buffers, no database closed under
the parent. concurrent.futures would do the same at 17 ms of imports a command
here, more than the split saves on two CPUs.
"""

from __future__ import annotations

import marshal
import os
from collections.abc import Callable
from typing import Any


class ForkedCall:
    """fn(*args) running in a forked child; result() waits for what it returned."""

    def __init__(self, pid: int, read_fd: int):
        self.pid = pid
        self.read_fd = read_fd

    @classmethod
    def start(cls, fn: Callable[..., Any], *args: Any) -> ForkedCall | None:
        """Fork a child running fn(*args); None if this process has one CPU or cannot fork."""
        if len(os.sched_getaffinity(0)) < 2:
            return None
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        try:
            pid = os.fork()
        except OSError:  # out of processes or memory: the caller does the work itself
            os.close(read_fd)
            os.close(write_fd)
            return None
        if pid == 0:  # the child: never returns
            status = 1
            try:
                os.close(read_fd)
                data = marshal.dumps(fn(*args))
                with open(write_fd, "wb") as pipe:
                    pipe.write(data)
                status = 0
            finally:
                os._exit(status)
        os.close(write_fd)
        return cls(pid, read_fd)

    def result(self) -> tuple[bool, Any]:
        """Wait for the child: (True, what fn returned), or (False, None) if it failed."""
        with open(self.read_fd, "rb") as pipe:
            data = pipe.read()
        _, status = os.waitpid(self.pid, 0)
        if not os.WIFEXITED(status) or os.WEXITSTATUS(status) != 0:
            return False, None
        try:
            return True, marshal.loads(data)
        except (EOFError, ValueError, TypeError):
            return False, None
