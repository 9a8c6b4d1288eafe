"""contextd's metrics, scraped over HTTP and read by the Prometheus client's own parser."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from contextd_harness import (
    CONTEXTD,
    SLEEPER,
    Contextd,
    fuse_server_of,
    wait_for,
)
from prometheus_client.parser import text_string_to_metric_families

from contextd.metrics import parse_address

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as answer:
        text = answer.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _value(samples: Samples, metric: str, **labels: str) -> float | None:
    return samples.get((metric, frozenset(labels.items())))


@pytest.fixture
def scraped(tmp_path: Path) -> Iterator[tuple[Contextd, int]]:
    port = _free_port()
    daemon = Contextd(tmp_path / "contextd", serve_args=("--metrics", str(port)))
    daemon.serve()
    try:
        yield daemon, port
    finally:
        daemon.cleanup()


def test_a_scrape_shows_every_guest_and_its_values_move(
    scraped: tuple[Contextd, int], guest_tree: Path
) -> None:
    ctx, port = scraped
    ctx("create", "busy", "--from", str(guest_tree), "--init", SLEEPER)
    ctx("create", "idle", "--from", str(guest_tree), "--init", SLEEPER)
    ctx.configure("busy", limits={"memory": "256M", "disk_space": "64M", "pids": 100})
    ctx("start", "busy")
    busy = {"name": "busy", "xid": "101"}
    idle = {"name": "idle", "xid": "102"}
    before = _scrape(port)
    assert _value(before, "contextd_guest_up", **busy) == 1
    assert _value(before, "contextd_guest_up", **idle) == 0
    assert _value(before, "contextd_guest_state", **idle, state="stopped") == 1
    assert _value(before, "contextd_guest_state", **idle, state="running") == 0
    assert _value(before, "contextd_guest_memory_limit_bytes", **busy) == 256 << 20
    assert _value(before, "contextd_guest_disk_limit_bytes", **busy) == 64 << 20
    assert _value(before, "contextd_guest_pids_limit", **busy) == 100
    # Work: CPU in the guest, 4 MiB written through its root.
    ctx(
        "exec",
        "busy",
        "--",
        "/bin/sh",
        "-c",
        "i=0; while [ $i -lt 100000 ]; do i=$((i+1)); done;"
        " dd if=/dev/zero of=/root/blob bs=64k count=64 2>/dev/null",
    )
    os.kill(fuse_server_of("busy"), signal.SIGHUP)  # its books and counts, now

    def written() -> bool:
        now = _scrape(port)
        grew = (_value(now, "contextd_guest_disk_bytes", **busy, kind="private") or 0) - (
            _value(before, "contextd_guest_disk_bytes", **busy, kind="private") or 0
        )
        return (
            grew >= 4 << 20
            and (_value(now, "contextd_cowfs_requests_total", **busy, kind="write") or 0) >= 64
        )

    assert wait_for(written, 15)
    after = _scrape(port)
    cpu = "contextd_guest_cpu_seconds_total"
    assert (_value(after, cpu, **busy, mode="user") or 0) > (
        _value(before, cpu, **busy, mode="user") or 0
    )
    assert (_value(after, "contextd_guest_memory_bytes", **busy) or 0) > 0
    assert (_value(after, "contextd_guest_uptime_seconds", **busy) or 0) > 0
    assert _value(after, "contextd_cowfs_requests_total", **idle, kind="write") is None
    # How long its 64 writes took: a histogram whose buckets only grow, all of them in +Inf.
    hist = "contextd_cowfs_request_seconds"
    buckets = [
        _value(after, hist + "_bucket", **busy, kind="write", le=le)
        for le in ("0.0001", "0.001", "0.01", "0.1", "1.0", "+Inf")
    ]
    cumulative = [b for b in buckets if b is not None]
    assert len(cumulative) == len(buckets), buckets
    assert cumulative == sorted(cumulative)
    count = _value(after, hist + "_count", **busy, kind="write")
    assert count is not None and count >= 64 and cumulative[-1] == count
    assert 0 < (_value(after, hist + "_sum", **busy, kind="write") or 0) < 64
    # The guest ran its shared busybox: an open the kernel served from the shared inode.
    assert (_value(after, "contextd_cowfs_passthrough_opens_total", **busy) or 0) >= 1
    # A FUSE server replaced: counted.
    os.kill(fuse_server_of("busy"), signal.SIGKILL)
    replaced = "contextd_guest_root_server_replacements_total"
    assert wait_for(lambda: _value(_scrape(port), replaced, **busy) == 1, 20)


def test_a_bare_port_is_loopback_and_a_bad_address_is_one_line(tmp_path: Path) -> None:
    assert parse_address("9101") == ("127.0.0.1", 9101)
    assert parse_address("0.0.0.0:9101") == ("0.0.0.0", 9101)
    assert parse_address("[::1]:9101") == ("::1", 9101)
    done = subprocess.run(
        [CONTEXTD, "serve", "--metrics", "nonsense", "--config-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "CONTEXTD_RUN_DIR": str(tmp_path / "run")},
    )
    assert done.returncode == 1
    assert done.stderr == "contextd: error: --metrics 'nonsense': expected [ADDRESS:]PORT\n"
