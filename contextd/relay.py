"""Carrying a guest command's input and output to and from the admin, on the admin's side.

A guest never gets one of the admin's fds: its command reads and writes a pty
of the guest's own devpts or pipes, and the admin's process copies bytes
between those and its own stdin, stdout and stderr (as ssh's client does).

What reaches the admin's terminal from a guest:
- on a pty (`enter`, and `exec` from a terminal), every byte, as an ssh
  session passes them: the admin asked for an interactive session;
- otherwise (`exec` with pipes, `logs`) output bound for a terminal is passed
  through TerminalFilter, which keeps text, tabs, newlines and colours (SGR)
  and shows every other control character as visible text, so that a guest's
  output cannot retitle the terminal, write the clipboard (OSC 52), move the
  cursor over earlier output or make the terminal answer a query into the
  admin's input.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import select
import signal
from collections.abc import Iterator

_SGR = re.compile(rb"\x1b\[[0-9;]*m")
_SAFE_CONTROLS = frozenset(b"\t\n\r\b")
# An escape sequence cut at the end of a read: held back until its end arrives.
_PARTIAL_SGR = re.compile(rb"\x1b(\[[0-9;]*)?\Z")


def _visible(byte: int) -> bytes:
    if byte == 0x7F:
        return b"^?"
    if byte < 0x20:
        return b"^" + bytes([byte + 0x40])
    return b"\\x%02x" % byte  # C1 controls, which some terminals obey


class TerminalFilter:
    """Makes a guest's output safe to print on the admin's terminal (see the module docstring)."""

    def __init__(self) -> None:
        self._held = b""

    def feed(self, data: bytes) -> bytes:
        """The printable form of data; an unfinished colour sequence at its end waits."""
        data = self._held + data
        partial = _PARTIAL_SGR.search(data)
        self._held = data[partial.start() :] if partial else b""
        if partial:
            data = data[: partial.start()]
        return self._clean(data)

    def flush(self) -> bytes:
        """Whatever was held back, made printable."""
        held, self._held = self._held, b""
        return self._clean(held)

    def _clean(self, data: bytes) -> bytes:
        out = bytearray()
        position = 0
        for match in _SGR.finditer(data):
            out += self._controls(data[position : match.start()])
            out += match.group()
            position = match.end()
        out += self._controls(data[position:])
        return bytes(out)

    @staticmethod
    def _controls(text: bytes) -> bytes:
        if not any((b < 0x20 and b not in _SAFE_CONTROLS) or 0x7F <= b < 0xA0 for b in text):
            return text
        # Bytes 0x80-0x9f inside UTF-8 are continuation bytes, not C1 controls.
        decoded = text.decode("utf-8", errors="surrogateescape")
        out = bytearray()
        for char in decoded:
            code = ord(char)
            if 0xDC80 <= code <= 0xDCFF:  # an undecodable byte
                byte = code - 0xDC00
                out += _visible(byte) if 0x80 <= byte < 0xA0 else bytes([byte])
            elif (code < 0x20 and code not in _SAFE_CONTROLS) or 0x7F <= code < 0xA0:
                out += _visible(code) if code < 0x80 else b"\\u%04x" % code
            else:
                out += char.encode("utf-8", errors="surrogateescape")
        return bytes(out)


def _write_all(fd: int, data: bytes) -> None:
    """Write all of data to fd, waiting while it is full (fd may be non-blocking)."""
    view = memoryview(data)
    while view:
        try:
            written = os.write(fd, view)
        except BlockingIOError:
            select.select([], [fd], [])
            continue
        view = view[written:]


class _Output:
    """One stream from the guest to one of ours, filtered when ours is a terminal."""

    def __init__(self, source: int, target: int, filtered: bool):
        self.source = source
        self.target = target
        self.filter = TerminalFilter() if filtered else None

    def copy(self, data: bytes) -> None:
        if self.filter is not None:
            data = self.filter.feed(data)
        if data:
            _write_all(self.target, data)

    def finish(self) -> None:
        if self.filter is not None and (rest := self.filter.flush()):
            _write_all(self.target, rest)


def _read(fd: int) -> bytes | None:
    """What is there to read: None if nothing yet, b"" at end of file (or EIO: a pty
    whose other side is closed)."""
    try:
        return os.read(fd, 65536)
    except BlockingIOError:
        return None
    except OSError as e:
        if e.errno == errno.EIO:
            return b""
        raise


def _drain(output: _Output) -> None:
    """Copy what the guest's side has written already, without waiting for more."""
    os.set_blocking(output.source, False)
    while data := _read(output.source):
        output.copy(data)
    output.finish()


def relay(
    joiner: int,
    to_guest: int | None,
    outputs: list[tuple[int, int]],
    filter_terminals: bool,
    end_of_input: bytes = b"",
) -> int:
    """Copy our stdin to to_guest and each (guest fd, our fd) of outputs until the process
    joiner (a pidfd) ends and its output is drained; its exit code.

    end_of_input is what to send when our stdin ends (^D on a pty; a pipe is closed).
    """
    streams = [
        _Output(source, target, filter_terminals and os.isatty(target))
        for source, target in outputs
    ]
    open_streams = {s.source: s for s in streams}
    stdin_open = to_guest is not None
    pending = b""
    if to_guest is not None:
        os.set_blocking(to_guest, False)
    for stream in streams:
        os.set_blocking(stream.source, False)
    while True:
        readable = [joiner, *open_streams]
        if stdin_open and not pending:
            readable.append(0)
        writable = [to_guest] if pending and to_guest is not None else []
        try:
            ready_r, _, _ = select.select(readable, writable, [])
        except InterruptedError:
            continue
        for fd in ready_r:
            if fd in open_streams:
                data = _read(fd)
                if data == b"":
                    open_streams.pop(fd).finish()
                elif data:
                    open_streams[fd].copy(data)
        if 0 in ready_r:
            data = os.read(0, 65536)
            if data:
                pending += data
            else:
                stdin_open = False
                if end_of_input:
                    pending += end_of_input
                elif to_guest is not None:
                    os.close(to_guest)
                    to_guest = None
        if to_guest is not None and pending:
            try:
                pending = pending[os.write(to_guest, pending) :]
            except BlockingIOError:
                pass
            except (BrokenPipeError, OSError):  # the guest's side stopped reading
                pending, stdin_open = b"", False
        if joiner in ready_r:
            break
    for stream in open_streams.values():
        _drain(stream)
    status = os.waitid(os.P_PIDFD, joiner, os.WEXITED)
    assert status is not None
    return status.si_status if status.si_code == os.CLD_EXITED else 128 + status.si_status


@contextlib.contextmanager
def signals_forwarded_to(pidfd: int, signals: tuple[int, ...]) -> Iterator[None]:
    """While inside, these signals to us are passed on to the process pidfd refers to."""

    def forward(signum: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(pidfd, signum)

    previous = {s: signal.signal(s, forward) for s in signals}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
