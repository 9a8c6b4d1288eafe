"""contextd-supervise (native/supervise.c), the supervisor of a running guest: its exit
record's console lines are what Python's own decoding makes of the console's bytes,
and a running guest's supervisor is that program, not a Python process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

from contextd_harness import (
    SLEEPER,
    Contextd,
    guest_status,
    left_behind,
    parent_of,
    procfs_alive,
    wait_for,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from contextd.supervisor import STEADY, TAIL_LINES

KEEP = 16384  # bytes of the console kept for the record (supervisor._copy_console)


def _tail(data: bytes) -> list[str]:
    out = subprocess.run(
        [str(STEADY), "--console-tail"], input=data, capture_output=True, check=True
    ).stdout
    return list(json.loads(out))


def _python_tail(data: bytes) -> list[str]:
    return data[-KEEP:].decode(errors="replace").splitlines()[-TAIL_LINES:]


# Bytes a console shows, weighted to the hard cases: line breaks of every kind
# str.splitlines() knows, and broken, overlong and surrogate UTF-8.
_PIECES = st.sampled_from(
    [
        b"\n",
        b"\r",
        b"\r\n",
        b"\x0b",
        b"\x0c",
        b"\x1c",
        b"\x1d",
        b"\x1e",
        b"\xc2\x85",
        b"\xe2\x80\xa8",
        b"\xe2\x80\xa9",
        b"\xe2\x80",
        b"\xf0\x9f\x98",
        b"\xf0\x9f\x98\x80",
        b"\xed\xa0\x80",
        b"\xc0\xaf",
        b"\xf4\x90\x80\x80",
        b"\xff",
        b"\x80",
        b'"',
        b"\\",
        b"\x1b[31m",
        b"\x7f",
        b"\xc3\xa9",
        b"a",
        b"text ",
    ]
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(_PIECES, st.binary(max_size=8)), max_size=60))
def test_console_tail_is_what_python_makes_of_the_bytes(pieces: list[bytes]) -> None:
    data = b"".join(pieces)
    assert _tail(data) == _python_tail(data)


def test_console_tail_keeps_the_last_lines_of_the_last_16_kib() -> None:
    data = b"".join(b"line %d\r\n" % i for i in range(5000)) + b"\xe2\x82"
    assert len(data) > KEEP
    assert _tail(data) == _python_tail(data)
    assert _tail(data)[-2:] == ["line 4999", "\ufffd"]


def test_a_running_guests_supervisor_is_the_small_program(ctx: Contextd, guest_tree: Path) -> None:
    ctx("create", "small", "--from", str(guest_tree), "--init", SLEEPER)
    ctx("start", "small")
    init = guest_status(ctx, "small")["init_pid"]
    supervisor = parent_of(init)
    assert os.readlink(f"/proc/{supervisor}/exe") == str(STEADY)
    rollup = Path(f"/proc/{supervisor}/smaps_rollup").read_text()
    private = sum(
        int(line.split()[1]) for line in rollup.splitlines() if line.startswith("Private_Dirty")
    )
    assert private < 1024, rollup  # KiB: a Python supervisor kept ~4 MiB
    ctx("stop", "small")
    assert left_behind("small", ctx) == []


def test_a_sigterm_for_the_daemon_leaves_the_guests_supervisor(
    ctx: Contextd, guest_tree: Path
) -> None:
    """`systemctl kill contextd` sends SIGTERM to every process of the daemon's unit, the
    guests' supervisors among them: the guest runs on, and the daemon still sees it
    running (tests/test_system_unit.py does it under systemd)."""
    ctx("create", "termed", "--from", str(guest_tree), "--init", SLEEPER)
    ctx("start", "termed")
    init = guest_status(ctx, "termed")["init_pid"]
    supervisor = parent_of(init)
    assert os.readlink(f"/proc/{supervisor}/exe") == str(STEADY)
    os.kill(supervisor, signal.SIGTERM)
    ctx.kill()  # and the daemon, as systemctl kill does
    time.sleep(1)
    assert procfs_alive(supervisor) and procfs_alive(init)
    ctx.serve()
    status = guest_status(ctx, "termed")
    assert status["state"] == "running" and status["init_pid"] == init, status
    ctx("stop", "termed")
    assert not procfs_alive(supervisor)
    assert left_behind("termed", ctx) == []


def test_an_ended_guests_console_lines_survive_any_bytes(ctx: Contextd, guest_tree: Path) -> None:
    # 25 lines, a quote, a backslash, broken UTF-8 and a form feed, then exit 3.
    script = guest_tree / "root" / "say.sh"
    script.parent.mkdir(exist_ok=True)
    script.write_bytes(
        b"#!/bin/sh\n"
        b'i=0; while [ $i -lt 25 ]; do echo "n$i"; i=$((i+1)); done\n'
        b"printf 'q\"b\\\\s\\n\\377\\342\\200x\\014y\\n'\n"
        b"sleep 1; exit 3\n"
    )
    script.chmod(0o755)
    ctx("create", "said", "--from", str(guest_tree), "--init", "/root/say.sh")
    ctx("start", "said")
    assert wait_for(lambda: guest_status(ctx, "said")["state"] == "failed", 10)
    printed = b"".join(b"n%d\r\n" % i for i in range(25)) + b'q"b\\s\r\n\xff\xe2\x80x\x0cy\r\n'
    assert guest_status(ctx, "said")["last_console"] == _python_tail(printed)
    assert guest_status(ctx, "said")["last_end"].startswith("init exited with status 3")
    assert left_behind("said", ctx) == []
