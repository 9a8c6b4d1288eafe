#!/usr/bin/env python3
"""contextd beside `unshare ... chroot` and systemd-nspawn on the same busybox guest, one run.

contextd runs twice: each guest's root served by a cowfs process of its own, and
all of them by one shared one (fuse_server = "shared"). For each: the time from
the start command to the guest's init running (it prints "ready"), and from the
stop command to nothing left; then memory per idle guest (proportional set size
of every process a guest costs: for contextd the guest's processes, its cowfs
FUSE server and its supervisor, and once for all guests the fork server and the
shared cowfs server) and 50 guests at once. Run as root:
    .venv/bin/python bench/contextd_bench.py [--markdown]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import stat
import statistics
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import tomli_w

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
# An init that ends on SIGTERM, as real ones do (a PID 1 without a handler ignores it).
INIT = "trap 'exit 0' TERM; echo ready; sleep 1000000 & wait"


def pss_kib(pids: list[int]) -> int:
    """Proportional set size of these processes together, in KiB."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


def descendants(pid: int) -> list[int]:
    """A process and every process below it."""
    children: dict[int, list[int]] = {}
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat_file.read_text().rpartition(")")[2].split()[1])
        except (OSError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat_file.parent.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo += children.get(current, [])
    return found


def _ppid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])


def holding_open(path: Path) -> list[int]:
    """The processes with an fd open on path."""
    found = []
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            if any(os.readlink(fd) == str(path) for fd in fd_dir.iterdir()):
                found.append(int(fd_dir.parent.name))
        except OSError:
            continue
    return found


class Contextd:
    """A contextd daemon of the benchmark's; shared: guests' roots served by one cowfs
    process (fuse_server = "shared") instead of one each."""

    def __init__(self, work: Path, template: Path, shared: bool = False):
        self.shared = shared
        self.name = "contextd, shared server" if shared else "contextd"
        self.work = work
        self.template = template
        self.starting: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.env = dict(os.environ)
        self.env.update(
            CONTEXTD_CONFIG_DIR=str(work / "etc"),
            CONTEXTD_RUN_DIR=str(work / "run"),
            CONTEXTD_LOG_DIR=str(work / "log"),
            CONTEXTD_SOCKET=str(work / "run" / "sock"),
            COWFS_ROOT=str(work / "cowfs"),
        )
        (work / "etc").mkdir(parents=True)
        self.daemon = subprocess.Popen(
            [str(BIN / "contextd"), "serve", "--log", str(work / "daemon.log")], env=self.env
        )
        while not (work / "run" / "sock").exists():
            if self.daemon.poll() is not None:
                sys.exit("contextd did not start")
            time.sleep(0.05)
        time.sleep(0.2)

    def cmd(self, *args: str) -> str:
        return subprocess.run(
            [str(BIN / "contextd"), *args], env=self.env, check=True, capture_output=True, text=True
        ).stdout

    def create(self, name: str) -> None:
        self.cmd("create", name, "--from", str(self.template), "--init", f'/bin/sh -c "{INIT}"')
        if self.shared:
            path = self.work / "etc" / f"{name}.toml"
            config = tomllib.loads(path.read_text())
            config["fuse_server"] = "shared"
            path.write_text(tomli_w.dumps(config))

    def start(self, name: str) -> float:
        """Seconds from the start command to "ready" on the console (the command itself
        returns later: it watches init for its boot check, config boot_check)."""
        log = self.work / "log" / f"{name}.console.log"
        before = log.stat().st_size if log.exists() else 0  # the log keeps earlier boots
        started = time.perf_counter()
        command = subprocess.Popen(
            [str(BIN / "contextd"), "start", name], env=self.env, stdout=subprocess.DEVNULL
        )
        while not log.exists() or b"ready" not in log.read_bytes()[before:]:
            time.sleep(0.001)
        self.starting.append((name, command))  # its boot check goes on meanwhile
        return time.perf_counter() - started

    def started(self) -> None:
        """Wait for the start commands still watching their guests' boot; each succeeded."""
        for name, command in self.starting:
            if command.wait() != 0:
                raise RuntimeError(f"contextd start {name} failed")
        self.starting.clear()

    def stop(self, name: str) -> float:
        self.started()
        started = time.perf_counter()
        self.cmd("stop", name, "--timeout", "5")
        return time.perf_counter() - started

    def pids(self, name: str) -> list[int]:
        procs = set(
            int(p)
            for p in Path(f"/sys/fs/cgroup/pids/contextd/{name}/guest/cgroup.procs")
            .read_text()
            .split()
        )
        mount_record = [json.loads(p.read_text()) for p in Path("/run/cowfs/mounts").glob("*.json")]
        procs |= {
            r["pid"]
            for r in mount_record
            if r["mountpoint"].endswith(f"/roots/{name}") and not r.get("shared")
        }
        procs |= set(holding_open(self.work / "log" / f"{name}.console.log"))  # its supervisor
        return sorted(procs)

    def shared_pids(self) -> list[int]:
        """Processes that serve every guest: the fork server (contextd.forkserver), and the
        shared cowfs server (cowfs.serve.host) if guests share one."""
        # The FUSE servers it forked passed to the daemon too, with its command line.
        records = [
            json.loads(record.read_text()) for record in Path("/run/cowfs/mounts").glob("*.json")
        ]
        mounts = {record["pid"] for record in records}
        hosts = {
            record["pid"]
            for record in records
            if record.get("shared") and record["mountpoint"].startswith(str(self.work))
        }
        return sorted(hosts) + [
            pid
            for pid in descendants(self.daemon.pid)
            if pid != self.daemon.pid
            and pid not in mounts
            and _ppid(pid) == self.daemon.pid
            and b"contextd.forkserver" in Path(f"/proc/{pid}/cmdline").read_bytes()
        ]

    def close(self) -> None:
        self.daemon.send_signal(signal.SIGTERM)
        self.daemon.wait()


class Plain:
    """unshare --fork --pid --mount-proc chroot / systemd-nspawn: a process to start and kill."""

    def __init__(self, name: str, argv: list[str]):
        self.name = name
        self.argv = argv
        self.procs: dict[str, subprocess.Popen[str]] = {}

    def start(self, key: str, root: Path) -> float:
        started = time.perf_counter()
        errors = open(root.parent / f"{root.name}.{key}.stderr", "w")  # noqa: SIM115
        proc = subprocess.Popen(
            [a.replace("ROOT", str(root)) for a in self.argv],
            stdout=subprocess.PIPE,
            stderr=errors,
            text=True,
            start_new_session=True,
        )
        assert proc.stdout is not None
        while "ready" not in proc.stdout.readline():
            pass
        self.procs[key] = proc
        return time.perf_counter() - started

    def stop(self, key: str) -> float:
        proc = self.procs[key]
        left = self.pids(key)
        del self.procs[key]
        started = time.perf_counter()
        if proc.poll() is not None:
            ended = f"{self.name} {key} had ended by itself (exit {proc.returncode})"
            print(ended, file=sys.stderr)
            return 0.0
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)  # contextd's stop timeout in this run
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        while any(Path(f"/proc/{pid}").exists() for pid in left):  # nothing left
            time.sleep(0.001)
        return time.perf_counter() - started

    def pids(self, key: str) -> list[int]:
        return descendants(self.procs[key].pid)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp/contextd-bench"))
    parser.add_argument("--guests", type=int, default=50)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    work: Path = args.workdir
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    work.chmod(0o700)  # root-only: cowfs refuses trees and mountpoints host users can reach
    template = work / "template"
    subprocess.run([str(ROOT / "tools" / "mkguest-busybox.sh"), str(template)], check=True)
    rows: dict[str, dict[str, float]] = {}

    for shared in (False, True):
        contextd = Contextd(work / ("contextd-shared" if shared else "contextd"), template, shared)
        try:
            contextd.create("one")
            contextd.start("one")  # warm-up: caches and the first cowfs mount
            contextd.stop("one")
            starts, stops = [], []
            for _ in range(args.repeat):
                starts.append(contextd.start("one"))
                stops.append(contextd.stop("one"))
            row = {"start": statistics.median(starts), "stop": statistics.median(stops)}
            names = [f"g{i}" for i in range(args.guests)]
            for name in names:
                contextd.create(name)
            began = time.perf_counter()
            for name in names:
                contextd.start(name)
            all_started = time.perf_counter() - began
            contextd.started()
            time.sleep(1)
            running = sum(
                json.loads(contextd.cmd("status", n, "--json"))["state"] == "running" for n in names
            )
            memory = pss_kib([p for n in names for p in contextd.pids(n)] + contextd.shared_pids())
            began = time.perf_counter()
            for name in names:
                contextd.stop(name)
            all_stopped = time.perf_counter() - began
            row.update(
                memory=memory / args.guests,
                all_start=all_started,
                all_stop=all_stopped,
                running=running,
            )
            rows[contextd.name] = row
        finally:
            contextd.close()

    peers = [
        Plain(
            "unshare + chroot",
            [
                "unshare",
                "--fork",
                "--pid",
                "--mount-proc=ROOT/proc",
                "--mount",
                "--uts",
                "--ipc",
                "chroot",
                "ROOT",
                "/bin/sh",
                "-c",
                INIT,
            ],
        ),
        Plain(
            "systemd-nspawn",
            [
                "systemd-nspawn",
                "--quiet",
                "--register=no",
                "--keep-unit",
                "--link-journal=no",
                "-D",
                "ROOT",
                "/bin/sh",
                "-c",
                INIT,
            ],
        ),
    ]
    for peer in peers:
        roots = []
        for i in range(args.guests):
            root = work / peer.name.replace(" ", "_") / f"g{i}"
            root.parent.mkdir(parents=True, exist_ok=True)
            subprocess.run(["cp", "-a", str(template), str(root)], check=True)
            # A shell's background job needs /dev/null; contextd and nspawn make a /dev.
            (root / "dev").mkdir(exist_ok=True)
            os.mknod(root / "dev" / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
            roots.append(root)
        starts, stops = [], []
        for _ in range(args.repeat):
            starts.append(peer.start("one", roots[0]))
            stops.append(peer.stop("one"))
        began = time.perf_counter()
        for i, root in enumerate(roots):
            peer.start(f"g{i}", root)
        all_started = time.perf_counter() - began
        contextd.started()
        time.sleep(1)
        memory = pss_kib([p for i in range(args.guests) for p in peer.pids(f"g{i}")])
        running = sum(1 for i in range(args.guests) if peer.procs[f"g{i}"].poll() is None)
        began = time.perf_counter()
        for i in range(args.guests):
            peer.stop(f"g{i}")
        rows[peer.name] = {
            "start": statistics.median(starts),
            "stop": statistics.median(stops),
            "memory": memory / args.guests,
            "all_start": all_started,
            "all_stop": time.perf_counter() - began,
            "running": running,
        }
    for log in work.glob("*/*.stderr"):
        if "ended" in log.read_text() or "Failed" in log.read_text():
            print(f"{log}: {log.read_text().strip()[-300:]}", file=sys.stderr)
    shutil.rmtree(work, ignore_errors=True)
    labels = [
        ("start", "start -> init running (median)", "s"),
        ("stop", "stop -> nothing left (median)", "s"),
        ("memory", "memory per idle guest (PSS)", "KiB"),
        ("all_start", f"start {args.guests} guests", "s"),
        ("all_stop", f"stop {args.guests} guests", "s"),
        ("running", f"running of {args.guests}", ""),
    ]
    names = list(rows)
    if args.markdown:
        print("| | " + " | ".join(names) + " |")
        print("|---|" + "---|" * len(names))
        for key, label, unit in labels:
            cells = [
                f"{rows[n][key]:.3f} {unit}".strip()
                if unit == "s"
                else f"{rows[n][key]:.0f} {unit}".strip()
                for n in names
            ]
            print(f"| {label} | " + " | ".join(cells) + " |")
    else:
        for key, label, unit in labels:
            print(f"{label:36s} " + "  ".join(f"{n}: {rows[n][key]:.3f}{unit}" for n in names))


if __name__ == "__main__":
    main()
