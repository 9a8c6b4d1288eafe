#!/usr/bin/env python3
"""Soak: guests at work while their FUSE servers are killed at random.

N busybox guests each run a loop that appends a numbered line with the time
to a log, rewrites one of 50 files with known content (write to a temporary,
rename), reads a binary and sleeps 20 ms. Every few seconds the FUSE server
of a guest chosen at random is killed with SIGKILL, and a command is run in
another with ``contextd exec``. At the end: every guest must be running, and
every file is checked against what its number says it holds. Printed: kills,
replacements, guests running, files checked and bad, lines lost or doubled,
workload and exec errors, and the pauses the guests saw (the gap in their log
around each kill, beside the loop's usual period).

Run as root:  .venv/bin/python bench/soak.py [--guests 20] [--minutes 10] [--markdown]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
INIT = "trap 'exit 0' TERM; sleep 1000000 & wait"
FILES = 50
WORKLOAD = f"""#!/bin/sh
mkdir -p /root/soak
cd /root/soak
i=0
while [ ! -e /root/soak.stop ]; do
    read up rest < /proc/uptime
    echo "$i $up" >> times || echo "times $i" >> errors
    n=$((i % {FILES}))
    seq $i $((i + 20)) > f$n.new && mv f$n.new f$n || echo "file $i" >> errors
    cat /bin/busybox > /dev/null || echo "read $i" >> errors
    i=$((i + 1))
    usleep 20000
done
echo done > /root/soak.done
"""


def uptime() -> float:
    """The clock the guests' log uses (/proc/uptime: the same inside and out)."""
    return float(Path("/proc/uptime").read_text().split()[0])


class Daemon:
    def __init__(self, work: Path):
        self.work = work
        self.env = dict(os.environ)
        self.env.update(
            CONTEXTD_CONFIG_DIR=str(work / "etc"),
            CONTEXTD_RUN_DIR=str(work / "run"),
            CONTEXTD_LOG_DIR=str(work / "log"),
            CONTEXTD_SOCKET=str(work / "run" / "sock"),
            COWFS_ROOT=str(work / "cowfs"),
        )
        (work / "etc").mkdir(parents=True)
        self.proc = subprocess.Popen(
            [str(BIN / "contextd"), "serve", "--log", str(work / "daemon.log")], env=self.env
        )
        while not (work / "run" / "sock").exists():
            if self.proc.poll() is not None:
                sys.exit("contextd did not start")
            time.sleep(0.05)

    def __call__(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "contextd"), *args],
            env=self.env,
            check=check,
            capture_output=True,
            text=True,
            timeout=120,
        )

    def status(self, name: str) -> dict[str, object]:
        return dict(json.loads(self("status", name, "--json").stdout))

    def guest_path(self, name: str, path: str) -> Path:
        return self.work / "cowfs" / "guests" / name / path.lstrip("/")

    def close(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait()


def fuse_server(name: str) -> int | None:
    for record in Path("/run/cowfs/mounts").glob("*.json"):
        try:
            mount = json.loads(record.read_text())
        except (OSError, ValueError):
            continue
        if mount["mountpoint"].endswith(f"/soak/run/roots/{name}"):
            return int(mount["pid"])
    return None


def check_guest(daemon: Daemon, name: str) -> dict[str, int]:
    """Lines lost or doubled in its log, files with content not as their number says."""
    lines = daemon.guest_path(name, "/root/soak/times").read_text().splitlines()
    numbers = [int(line.split()[0]) for line in lines if line.strip()]
    seen = set(numbers)
    bad_files = 0
    for n in range(FILES):
        path = daemon.guest_path(name, f"/root/soak/f{n}")
        if not path.exists():
            continue  # its turn had not come
        values = path.read_text().split()
        first = int(values[0]) if values else -1
        if first % FILES != n or values != [str(v) for v in range(first, first + 21)]:
            bad_files += 1
    errors = daemon.guest_path(name, "/root/soak/errors")
    return {
        "iterations": len(seen),
        "lost": (max(seen) + 1 - len(seen)) if seen else 0,
        "doubled": len(numbers) - len(seen),
        "bad_files": bad_files,
        "workload_errors": len(errors.read_text().splitlines()) if errors.exists() else 0,
    }


def pauses(daemon: Daemon, kills: list[tuple[str, float]]) -> tuple[list[float], list[float]]:
    """(each kill's pause: the gap in the guest's log around it; all gaps of the logs)."""
    gaps_of: dict[str, list[tuple[float, float]]] = {}
    every_gap: list[float] = []
    for name in {k[0] for k in kills} | {p.name for p in (daemon.work / "etc").glob("*")}:
        name = name.removesuffix(".toml")
        path = daemon.guest_path(name, "/root/soak/times")
        if not path.exists():
            continue
        times = [float(line.split()[1]) for line in path.read_text().splitlines() if line.strip()]
        gaps = list(itertools.pairwise(times))
        gaps_of[name] = gaps
        every_gap += [b - a for a, b in gaps]
    seen = []
    for name, when in kills:
        for a, b in gaps_of.get(name, []):
            if a <= when <= b:
                seen.append(b - a)
                break
    return seen, every_gap


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp/soak"))
    parser.add_argument("--guests", type=int, default=20)
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--kill-every", type=float, default=3.0, help="seconds between kills")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    work: Path = args.workdir
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    work.chmod(0o700)
    template = work / "template"
    subprocess.run([str(ROOT / "tools" / "mkguest-busybox.sh"), str(template)], check=True)
    (template / "root" / "work.sh").write_text(WORKLOAD)
    (template / "root" / "work.sh").chmod(0o755)
    daemon = Daemon(work / "soak")
    names = [f"s{i}" for i in range(args.guests)]
    kills: list[tuple[str, float]] = []
    exec_errors = 0
    execs = 0
    try:
        for name in names:
            daemon("create", name, "--from", str(template), "--init", f'/bin/sh -c "{INIT}"')
            daemon("start", name)
            daemon("exec", name, "--", "/bin/sh", "-c", "/root/work.sh >/dev/null 2>&1 &")
        began = time.monotonic()
        end = began + args.minutes * 60
        while time.monotonic() < end:
            time.sleep(args.kill_every)
            victim = rng.choice(names)
            pid = fuse_server(victim)
            if pid is not None:
                kills.append((victim, uptime()))
                os.kill(pid, signal.SIGKILL)
            other = rng.choice(names)
            execs += 1
            if daemon("exec", other, "--", "/bin/cat", "/root/soak/f0", check=False).returncode:
                exec_errors += 1
        for name in names:
            daemon("exec", name, "--", "/bin/touch", "/root/soak.stop", check=False)
        time.sleep(2)
        statuses = {name: daemon.status(name) for name in names}
        results = {name: check_guest(daemon, name) for name in names}
        seen, gaps = pauses(daemon, kills)
        for name in names:
            daemon("stop", name, check=False)
    finally:
        daemon.close()
    running = sum(1 for s in statuses.values() if s["state"] == "running")
    replaced = sum(int(str(s["root_server_replacements"])) for s in statuses.values())
    total = {k: sum(r[k] for r in results.values()) for k in next(iter(results.values()))}
    left = [line for line in Path("/proc/mounts").read_text().splitlines() if "/soak/" in line]
    report = {
        "guests": args.guests,
        "minutes": args.minutes,
        "kills": len(kills),
        "replacements": replaced,
        "running_at_end": running,
        **total,
        "execs": execs,
        "exec_errors": exec_errors,
        "pause_median_s": round(statistics.median(seen), 3) if seen else None,
        "pause_max_s": round(max(seen), 3) if seen else None,
        "loop_period_median_s": round(statistics.median(gaps), 3) if gaps else None,
        "mounts_left": len(left),
    }
    if args.markdown:
        print("| " + " | ".join(report) + " |")
        print("|" + "---|" * len(report))
        print("| " + " | ".join(str(v) for v in report.values()) + " |")
    else:
        print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
