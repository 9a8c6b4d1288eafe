"""contextd serve under a unit of Type=notify: READY=1 on systemd's notification socket once
its control socket answers (so that `systemctl start contextd` returns then, and the next
command finds it), STOPPING=1 when it is told to stop; no helper of it inherits the
socket. The service manager's side is a datagram socket of the test's own, as systemd's is
(sd_notify(3)); tests/test_system_unit.py runs it under systemd itself."""

from __future__ import annotations

import signal
import socket
import subprocess
from pathlib import Path

from contextd_harness import CONTEXTD, Contextd, parent_of, wait_for


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if parent_of(int(entry.name)) == pid:
                found.append(int(entry.name))
        except (OSError, ValueError):
            continue
    return found


def test_ready_once_the_socket_answers_and_stopping_at_sigterm(tmp_path: Path) -> None:
    daemon = Contextd(tmp_path / "contextd")
    manager = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    manager.bind(str(tmp_path / "notify"))
    manager.settimeout(60)
    proc = subprocess.Popen(
        [CONTEXTD, "serve", "--log", str(tmp_path / "daemon.log")],
        env={**daemon.env, "NOTIFY_SOCKET": str(tmp_path / "notify")},
    )
    try:
        ready = manager.recv(4096).decode()
        assert ready == f"READY=1\nMAINPID={proc.pid}"
        # At READY the control socket answers at once: no wait, no retry.
        done = subprocess.run(
            [CONTEXTD, "list"], env=daemon.env, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
        # Its helpers (the fork server, started after READY) do not inherit the socket.
        assert wait_for(lambda: bool(_children(proc.pid)), 30)
        for child in _children(proc.pid):
            assert b"NOTIFY_SOCKET=" not in Path(f"/proc/{child}/environ").read_bytes()
        proc.send_signal(signal.SIGTERM)
        assert manager.recv(4096) == b"STOPPING=1"
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        manager.close()


def test_a_manager_that_is_not_there_is_said_and_the_daemon_serves(tmp_path: Path) -> None:
    daemon = Contextd(tmp_path / "contextd")
    daemon.env["NOTIFY_SOCKET"] = str(tmp_path / "nobody")
    daemon.serve()
    try:
        assert daemon("list").returncode == 0
    finally:
        daemon.kill()
    assert "cannot notify the service manager at " + str(tmp_path / "nobody") in daemon.log()
