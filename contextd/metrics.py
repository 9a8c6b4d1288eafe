"""contextd's metrics: every guest's state and accounting in the Prometheus/OpenMetrics
text format, for `contextd serve --metrics [ADDRESS:]PORT`.

A scrape reads what `contextd status` reads (cgroup files, the state
database's usage row, the network counters, contextd's records) and the
counts each guest's FUSE server publishes every few seconds
(cowfs.serve.stats): no request to a guest or its server, no tree walk.
Served by prometheus-client's HTTP server in a thread of the daemon.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from contextd import config as configs
from contextd import runstate, runtime
from cowfs.errors import CowfsError
from cowfs.serve import stats

log = logging.getLogger(__name__)

STATES = ("running", "stopping", "stopped", "failed", "restarting")
GUEST = ["name", "xid"]


def parse_address(text: str) -> tuple[str, int]:
    """ "PORT" (loopback), "ADDRESS:PORT" or "[IPv6]:PORT" as (address, port)."""
    host, _, port = text.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    try:
        number = int(port)
    except ValueError:
        raise CowfsError(f"--metrics {text!r}: expected [ADDRESS:]PORT") from None
    if not 0 < number < 65536:
        raise CowfsError(f"--metrics {text!r}: port out of range")
    return host, number


class GuestCollector(Collector):
    """The metrics of every configured guest, built at each scrape."""

    def __init__(self, config_dir: Path):
        self.config_dir = config_dir

    def collect(self) -> Iterator[Metric]:
        try:
            guests = list(configs.load_all(self.config_dir).values())
        except CowfsError as e:  # a bad file: said in the daemon's log, nothing scraped
            log.error("metrics: %s", e)
            return
        families = _Families()
        for config in guests:
            try:
                families.add(config, runtime.status(config))
            except (CowfsError, OSError) as e:
                log.error("metrics of %s: %s", config.name, e)
        yield from families.all()


class _Families:
    def __init__(self) -> None:
        def gauge(name: str, doc: str, extra: list[str] | None = None) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, labels=GUEST + (extra or []))

        def counter(name: str, doc: str, extra: list[str] | None = None) -> CounterMetricFamily:
            return CounterMetricFamily(name, doc, labels=GUEST + (extra or []))

        p = "contextd_guest_"
        self.state = gauge(p + "state", "1 for the guest's state, 0 for the others", ["state"])
        self.up = gauge(p + "up", "1 if the guest's init runs")
        self.uptime = gauge(p + "uptime_seconds", "Seconds since the guest started")
        self.cpu = counter(p + "cpu_seconds", "CPU time of the guest's processes", ["mode"])
        self.memory = gauge(p + "memory_bytes", "Memory the guest's cgroup uses")
        self.memory_limit = gauge(p + "memory_limit_bytes", "The guest's memory limit")
        self.processes = gauge(p + "processes", "Processes of the guest")
        self.pids_limit = gauge(p + "pids_limit", "The guest's limit of processes and threads")
        self.disk = gauge(p + "disk_bytes", "Disk space of the guest's tree", ["kind"])
        self.inodes = gauge(p + "disk_inodes", "Inodes of the guest's tree", ["kind"])
        self.disk_limit = gauge(p + "disk_limit_bytes", "The guest's disk space limit")
        self.inodes_limit = gauge(p + "disk_limit_inodes", "The guest's inode limit")
        self.hits = counter(p + "limit_hits", "Times a limit refused the guest", ["limit"])
        self.net_bytes = counter(p + "network_bytes", "Traffic of the guest", ["direction"])
        self.net_packets = counter(p + "network_packets", "Packets of the guest", ["direction"])
        self.restarts = gauge(
            p + "recent_restarts", "Automatic restarts within the guest's restart_interval"
        )
        self.replacements = counter(
            p + "root_server_replacements", "FUSE servers of its root that died and were replaced"
        )
        self.replacement_seconds = gauge(
            p + "root_server_replacement_seconds", "How long the last replacement took"
        )
        c = "contextd_cowfs_"
        self.requests = counter(
            c + "requests", "Requests its root's FUSE server answered", ["kind"]
        )
        self.errors = counter(c + "request_errors", "Requests answered with an error", ["kind"])
        self.request_seconds = HistogramMetricFamily(
            c + "request_seconds",
            "Time from a request's handler starting to its answer, by kind",
            labels=[*GUEST, "kind"],
        )
        self.breaks = counter(c + "link_breaks", "Shared files the guest made private copies of")
        self.cached_reads = counter(
            c + "page_cache_reads", "Reads answered from the page cache without Python"
        )
        self.passthrough_opens = counter(
            c + "passthrough_opens", "Opens of shared files the kernel served from the shared inode"
        )
        self.nodes = gauge(c + "nodes", "Inodes the kernel knows through the mount")

    def add(self, config: configs.GuestConfig, status: runtime.Status) -> None:
        guest = [config.name, str(config.xid)]
        for name in STATES:
            self.state.add_metric([*guest, name], 1 if status.state == name else 0)
        self.up.add_metric(guest, 1 if status.state == "running" else 0)
        _maybe(self.uptime, guest, status.uptime_seconds)
        _maybe(self.cpu, [*guest, "user"], status.cpu_user_seconds)
        _maybe(self.cpu, [*guest, "system"], status.cpu_system_seconds)
        _maybe(self.memory, guest, status.memory_bytes)
        _maybe(self.memory_limit, guest, config.limits.memory)
        self.processes.add_metric(guest, status.processes)
        _maybe(self.pids_limit, guest, config.limits.pids)
        _maybe(self.disk, [*guest, "private"], status.disk_bytes)
        _maybe(self.disk, [*guest, "shared"], status.disk_shared_bytes)
        _maybe(self.inodes, [*guest, "private"], status.disk_inodes)
        _maybe(self.inodes, [*guest, "shared"], status.disk_shared_inodes)
        _maybe(self.disk_limit, guest, config.limits.disk_space)
        _maybe(self.inodes_limit, guest, config.limits.disk_inodes)
        for limit, hits in status.limit_hits.items():
            self.hits.add_metric([*guest, limit], hits)
        if status.traffic:
            for direction, prefix in (("receive", "rx"), ("transmit", "tx")):
                self.net_bytes.add_metric([*guest, direction], status.traffic[f"{prefix}_bytes"])
                self.net_packets.add_metric(
                    [*guest, direction], status.traffic[f"{prefix}_packets"]
                )
        self.restarts.add_metric(guest, status.restarts)
        self.replacements.add_metric(guest, status.root_server_replacements)
        took = runstate.load_root_server_record(config.name).get("took")
        if isinstance(took, int | float):
            self.replacement_seconds.add_metric(guest, took)
        state = runstate.load(config.name)
        if status.state == "running" and state is not None:
            self._add_server(guest, stats.read(os.path.realpath(state.mountpoint)))

    def _add_server(self, guest: list[str], counts: dict[str, Any]) -> None:
        for kind, count in (counts.get("requests") or {}).items():
            self.requests.add_metric([*guest, kind], count)
        for kind, count in (counts.get("errors") or {}).items():
            self.errors.add_metric([*guest, kind], count)
        for kind, histogram in (counts.get("durations") or {}).items():
            self.request_seconds.add_metric(
                [*guest, kind], _cumulative(histogram["buckets"]), histogram["sum"]
            )
        _maybe(self.breaks, guest, counts.get("link_breaks"))
        _maybe(self.cached_reads, guest, counts.get("page_cache_reads"))
        _maybe(self.passthrough_opens, guest, counts.get("passthrough_opens"))
        _maybe(self.nodes, guest, counts.get("nodes"))

    def all(self) -> Iterator[Metric]:
        yield from (v for v in vars(self).values() if isinstance(v, Metric))


def _cumulative(counts: list[int]) -> list[tuple[str, float]]:
    """A server's per-bucket counts (stats.DURATION_BOUNDS, then +Inf) as Prometheus's
    cumulative buckets."""
    bounds = [*(str(bound) for bound in stats.DURATION_BOUNDS), "+Inf"]
    return [(bound, float(sum(counts[: i + 1]))) for i, bound in enumerate(bounds)]


def _maybe(family: GaugeMetricFamily | CounterMetricFamily, labels: list[str], value: Any) -> None:
    if isinstance(value, int | float):
        family.add_metric(labels, value)


def serve(config_dir: Path, address: str) -> Any:
    """Serve the metrics on address ([ADDRESS:]PORT) from a thread; the server (its
    shutdown() ends it)."""
    from prometheus_client import start_http_server

    host, port = parse_address(address)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(GuestCollector(config_dir))
    try:
        server, _thread = start_http_server(port, addr=host, registry=registry)
    except OSError as e:
        raise CowfsError(f"--metrics {address}: {e.strerror}") from None
    return server
