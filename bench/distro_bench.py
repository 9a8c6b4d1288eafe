#!/usr/bin/env python3
"""A Debian guest booting its own systemd: contextd beside systemd-nspawn -b, same tree, one run.

The guest is tools/mkguest-debian.sh --init systemd --packages "openssh-server
cron nginx-light" (bookworm). contextd runs twice: each guest's root served by a
cowfs process of its own, and all of them by one shared one (fuse_server =
"shared"). Another contender, nspawn booting a cowfs mount
of the same tree (mounted afresh for each boot, as contextd's are), shows what
the filesystem costs apart from the runtime. For each contender, alternating
which goes first: the time from the start command to systemd's "Reached target
multi-user.target" on the console, and from the stop command to nothing left
(all halt through systemd: contextd sends SIGRTMIN+3, nspawn on SIGTERM does);
then memory per idle guest with several booted at once (proportional set size
of every process a guest costs: for contextd its processes, its cowfs FUSE
server and its supervisor, and the fork server once for all; for nspawn its
own process and the container's, and the FUSE server on cowfs). nspawn runs
with --register=no --keep-unit: this host's PID 1 is not systemd. Run as root:
    .venv/bin/python bench/distro_bench.py [--repeat N] [--guests N] [--markdown]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import time
import tomllib
from pathlib import Path
from typing import Protocol

import tomli_w
from contextd_bench import BIN, ROOT, Contextd, descendants, holding_open, pss_kib

# systemd's console line once multi-user.target is reached (with its colours).
BOOTED = re.compile(rb"Reached target .{0,16}multi-user\.target")


class Guests(Protocol):
    """What each contender does with its guests."""

    name: str

    def prepare(self, key: str) -> None: ...
    def start(self, key: str) -> float: ...
    def stop(self, key: str) -> float: ...
    def pids(self, key: str) -> list[int]: ...
    def shared_pids(self) -> list[int]: ...
    def close(self) -> None: ...


class ContextdGuests(Contextd):
    """contextd with a daemon of its own (contextd_bench's), guests created from the template."""

    def prepare(self, key: str) -> None:
        self.cmd("create", key, "--from", str(self.template))
        if self.shared:
            path = self.work / "etc" / f"{key}.toml"
            config = tomllib.loads(path.read_text())
            config["fuse_server"] = "shared"
            path.write_text(tomli_w.dumps(config))

    def start(self, key: str) -> float:
        log = self.work / "log" / f"{key}.console.log"
        before = log.stat().st_size if log.exists() else 0
        began = time.perf_counter()
        command = subprocess.Popen(
            [str(BIN / "contextd"), "start", key], env=self.env, stdout=subprocess.DEVNULL
        )
        while not log.exists() or not BOOTED.search(log.read_bytes()[before:]):
            time.sleep(0.002)
        booted = time.perf_counter() - began
        if command.wait() != 0:
            raise RuntimeError(f"contextd start {key} failed")
        return booted

    def stop(self, key: str) -> float:
        began = time.perf_counter()
        self.cmd("stop", key)
        took = time.perf_counter() - began
        ended = json.loads(self.cmd("status", key, "--json"))["last_end"] or ""
        if "init asked for a halt" not in ended:  # "stopped by contextd (init asked ...)"
            raise RuntimeError(f"{key} did not halt cleanly: {ended}")
        return took

    def pids(self, key: str) -> list[int]:
        guest = Path(f"/sys/fs/cgroup/pids/contextd/{key}/guest/cgroup.procs")
        procs = {int(p) for p in guest.read_text().split()}
        for record in Path("/run/cowfs/mounts").glob("*.json"):
            mount = json.loads(record.read_text())
            if mount["mountpoint"].endswith(f"/roots/{key}") and not mount.get("shared"):
                procs.add(mount["pid"])  # a shared server is counted once, in shared_pids
        procs |= set(holding_open(self.work / "log" / f"{key}.console.log"))  # its supervisor
        return sorted(procs)

    def shared_pids(self) -> list[int]:
        """The fork server, and the shared cowfs server if guests share one."""
        return super().shared_pids()

    def close(self) -> None:
        self.daemon.send_signal(signal.SIGTERM)
        self.daemon.wait()


class NspawnGuests:
    """systemd-nspawn -b on copies of the template."""

    name = "systemd-nspawn -b"

    def __init__(self, work: Path, template: Path):
        self.work = work
        self.template = template
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.logs: dict[str, Path] = {}

    def prepare(self, key: str) -> None:
        subprocess.run(["cp", "-a", str(self.template), str(self.work / key)], check=True)

    def start(self, key: str) -> float:
        log = self.work / f"{key}.console"
        log.unlink(missing_ok=True)  # the last boot's, until script truncates it
        began = time.perf_counter()
        nspawn = ["systemd-nspawn", "--register=no", "--keep-unit", "--link-journal=no",
                  "-D", str(self.work / key), "-b"]  # fmt: skip
        # On a terminal, as contextd's guests are: systemd shows its boot only there
        # (with --console=pipe or passive this host's nspawn showed nothing).
        self.procs[key] = subprocess.Popen(
            ["script", "-qfc", shlex.join(nspawn), str(log)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        self.logs[key] = log
        while not log.exists() or not BOOTED.search(log.read_bytes()):
            if self.procs[key].poll() is not None:
                raise RuntimeError(f"nspawn ended: {log.read_text()[-2000:]}")
            time.sleep(0.002)
        return time.perf_counter() - began

    def stop(self, key: str) -> float:
        proc = self.procs.pop(key)
        left = descendants(proc.pid)
        nspawn = next(
            pid
            for pid in left
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"systemd-nspawn")
        )
        began = time.perf_counter()
        os.kill(nspawn, signal.SIGTERM)  # nspawn halts the container through its systemd
        proc.wait(timeout=30)
        while any(Path(f"/proc/{pid}").exists() for pid in left):
            time.sleep(0.001)
        return time.perf_counter() - began

    def pids(self, key: str) -> list[int]:
        return descendants(self.procs[key].pid)[1:]  # not `script`, the bench's terminal

    def shared_pids(self) -> list[int]:
        return []

    def close(self) -> None:
        for key in list(self.procs):
            self.stop(key)


class NspawnOnCowfsGuests(NspawnGuests):
    """systemd-nspawn -b on a cowfs mount of a clone of the template, mounted afresh for
    each boot as contextd's are: what the filesystem costs, apart from the runtime."""

    name = "nspawn on cowfs"

    def prepare(self, key: str) -> None:
        subprocess.run(
            [str(BIN / "cowfs"), "clone", str(self.template), str(self.work / f"{key}.tree")],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        (self.work / key).mkdir()

    def start(self, key: str) -> float:
        began = time.perf_counter()
        subprocess.run(
            [str(BIN / "cowfs"), "mount", str(self.work / f"{key}.tree"), str(self.work / key)],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        return time.perf_counter() - began + super().start(key)

    def stop(self, key: str) -> float:
        took = super().stop(key)
        began = time.perf_counter()
        # Not checked: with several containers up, the others' mount namespaces hold
        # copies of this mount (nspawn's propagation), and its server runs on until
        # they end; the mount is gone from the host's all the same.
        subprocess.run(
            [str(BIN / "cowfs"), "umount", "--timeout", "1", str(self.work / key)],
            check=False,
            stderr=subprocess.DEVNULL,
        )
        return took + time.perf_counter() - began

    def pids(self, key: str) -> list[int]:
        server = [
            int(json.loads(record.read_text())["pid"])
            for record in Path("/run/cowfs/mounts").glob("*.json")
            if json.loads(record.read_text())["mountpoint"] == str(self.work / key)
        ]
        return super().pids(key) + server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp/distro-bench"))
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--guests", type=int, default=5)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    work: Path = args.workdir
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    work.chmod(0o700)  # root-only: cowfs refuses trees host users can reach
    template = work / "template"
    subprocess.run(
        [str(ROOT / "tools" / "mkguest-debian.sh"), "--init", "systemd", "--packages",
         "openssh-server cron nginx-light", str(template)],
        check=True,
    )  # fmt: skip
    for contender in ("contextd", "contextd-shared", "nspawn", "nspawn-cowfs"):
        (work / contender).mkdir()
    contenders: list[Guests] = [
        ContextdGuests(work / "contextd", template),
        ContextdGuests(work / "contextd-shared", template, shared=True),
        NspawnGuests(work / "nspawn", template),
        NspawnOnCowfsGuests(work / "nspawn-cowfs", template),
    ]
    boots: dict[str, list[float]] = {c.name: [] for c in contenders}
    stops: dict[str, list[float]] = {c.name: [] for c in contenders}
    memory: dict[str, float] = {}
    try:
        for c in contenders:
            c.prepare("one")
            c.start("one")  # warm-up: caches
            c.stop("one")
        for round_ in range(args.repeat):
            for c in contenders if round_ % 2 == 0 else reversed(contenders):
                boots[c.name].append(c.start("one"))
                stops[c.name].append(c.stop("one"))
        for c in contenders:
            keys = [f"g{i}" for i in range(args.guests)]
            for key in keys:
                c.prepare(key)
                c.start(key)
            time.sleep(3)  # idle
            memory[c.name] = (
                pss_kib([p for k in keys for p in c.pids(k)] + c.shared_pids()) / args.guests
            )
            for key in keys:
                c.stop(key)
    finally:
        for c in contenders:
            c.close()
    base = contenders[2].name
    rows = [
        ("boot to multi-user (median)", {n: statistics.median(v) for n, v in boots.items()}, "s"),
        ("stop, clean halt (median)", {n: statistics.median(v) for n, v in stops.items()}, "s"),
        (f"memory per idle guest ({args.guests} booted)", memory, "KiB"),
    ]
    spread = {n: f"{min(v):.3f}-{max(v):.3f}" for n, v in [*boots.items()]}
    if args.markdown:  # each figure with its ratio to nspawn's on the native tree
        print("| | " + " | ".join(c.name for c in contenders) + " |")
        print("|---|" + "---|" * len(contenders))
        for label, values, unit in rows:
            theirs = values[base]
            fmt = (lambda v: f"{v:.3f} s") if unit == "s" else (lambda v: f"{v:.0f} KiB")
            cells = [
                fmt(values[c.name])
                + ("" if c.name == base else f" ({values[c.name] / theirs:.2f}x)")
                for c in contenders
            ]
            print(f"| {label} | " + " | ".join(cells) + " |")
        print(
            f"\nboot spread over {args.repeat} runs: "
            + ", ".join(f"{n} {s}" for n, s in spread.items())
        )
    else:
        for label, values, unit in rows:
            print(label, {n: round(v, 3) for n, v in values.items()}, unit)
        print("boot spread", spread)


if __name__ == "__main__":
    main()
