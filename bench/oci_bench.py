#!/usr/bin/env python3
"""contextd-oci beside runc under podman, on the same imported busybox image, one run.

Rows: wall time of `podman run --rm IMAGE true` (create, start, the container's
end and delete: four runtime calls), interleaved between the runtimes; memory
per idle container (PSS of what each container costs: its conmon, its
processes and, for contextd-oci, its cowfs FUSE server and root keeper; with
the shared FUSE server, that server once for all) with N detached `sleep`
containers. Podman has storage of its own; contextd-oci talks to a
contextd daemon of the bench's own. Run as root:
    .venv/bin/python bench/oci_bench.py [--rounds 10] [--containers 5]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from contextd_bench import pss_kib

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
IMAGE = "localhost/bench-busybox:1"
ULIMITS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]
SHARED = ("--annotation", "org.contextd.cowfs.fuse-server=shared")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--containers", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="oci-bench-") as scratch:
        base = Path(scratch)
        env = {
            "CONTEXTD_CONFIG_DIR": str(base / "etc"),
            "CONTEXTD_RUN_DIR": str(base / "run"),
            "CONTEXTD_LOG_DIR": str(base / "log"),
            "CONTEXTD_SOCKET": str(base / "run" / "contextd.sock"),
            "COWFS_ROOT": str(base / "cowfs"),
        }
        (base / "etc").mkdir()
        daemon = subprocess.Popen(
            [BIN / "contextd", "serve", "--log", str(base / "daemon.log")],
            env={**os.environ, **env},
        )
        wrapper = base / "contextd-oci"
        exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
        wrapper.write_text(
            f'#!/bin/sh\nexport {exports}\nexec {BIN / "contextd-oci"} --root {base}/state "$@"\n'
        )
        wrapper.chmod(0o755)
        podman = ["podman", "--root", str(base / "storage"), "--runroot", str(base / "runroot"),
                  "--cgroup-manager", "cgroupfs", "--events-backend", "file"]  # fmt: skip
        try:
            time.sleep(1)
            tree = base / "tree"
            subprocess.run([ROOT / "tools" / "mkguest-busybox.sh", tree], check=True)
            subprocess.run(["tar", "-C", tree, "-cf", base / "image.tar", "."], check=True)
            subprocess.run([*podman, "import", base / "image.tar", IMAGE], check=True,
                           capture_output=True)  # fmt: skip
            runtimes = {"contextd-oci": str(wrapper), "runc": "/usr/sbin/runc"}
            times: dict[str, list[float]] = {name: [] for name in runtimes}
            for path in runtimes.values():  # warm: the image template, caches
                _run_once(podman, path)
            for _ in range(args.rounds):
                for name, path in runtimes.items():
                    times[name].append(_run_once(podman, path))
            memory = {name: _idle_pss(podman, path, args.containers)
                      for name, path in runtimes.items()}  # fmt: skip
            memory["contextd-oci, shared server"] = _idle_pss(
                podman, str(wrapper), args.containers, SHARED
            )
        finally:
            subprocess.run([*podman, "rm", "--all", "--force", "--time", "0"],
                           capture_output=True, check=False)  # fmt: skip
            subprocess.run([*podman, "system", "reset", "--force"], capture_output=True,
                           check=False)  # fmt: skip
            daemon.terminate()
            daemon.wait(timeout=30)
    ours, runc = statistics.median(times["contextd-oci"]), statistics.median(times["runc"])
    print(f"podman run --rm IMAGE true, {args.rounds} rounds interleaved (median, min-max):")
    for name, values in times.items():
        spread = f"{min(values):.3f}-{max(values):.3f}"
        print(f"  {name:13} {statistics.median(values):6.3f} s  ({spread})")
    print(f"  ratio contextd-oci/runc: {ours / runc:.2f}x")
    print(f"memory per idle container, {args.containers} detached sleep containers (PSS):")
    for name, kib in memory.items():
        print(f"  {name:13} {kib / 1024:6.1f} MiB")
    print(f"  ratio contextd-oci/runc: {memory['contextd-oci'] / memory['runc']:.2f}x")
    shared = memory["contextd-oci, shared server"] / memory["runc"]
    print(f"  ratio contextd-oci with the shared server/runc: {shared:.2f}x")


def _run_once(podman: list[str], runtime: str) -> float:
    started = time.monotonic()
    subprocess.run([*podman, "--runtime", runtime, "run", "--rm", *ULIMITS, "--network", "none",
                    IMAGE, "true"], check=True, capture_output=True)  # fmt: skip
    return time.monotonic() - started


def _idle_pss(podman: list[str], runtime: str, count: int, extra: tuple[str, ...] = ()) -> float:
    """KiB of PSS per container: conmon, the container's processes, its FUSE server and
    root keeper (a shared FUSE server counted once for all)."""
    names = [f"idle{i}" for i in range(count)]
    for name in names:
        subprocess.run([*podman, "--runtime", runtime, "run", "-d", *ULIMITS, "--network", "none",
                        *extra, "--name", name, IMAGE, "sleep", "100000"],
                       check=True, capture_output=True)  # fmt: skip
    time.sleep(2)
    pids: list[int] = []
    for name in names:
        inspect = subprocess.run(
            [*podman, "inspect", "--format", "{{.State.Pid}} {{.State.ConmonPid}} {{.Id}}", name],
            check=True, capture_output=True, text=True,
        ).stdout.split()  # fmt: skip
        pids += [int(inspect[0]), int(inspect[1])]
        pids += _fuse_servers(inspect[2][:12])
    pids += sorted(_shared_servers())
    kib = pss_kib(pids) / count
    subprocess.run([*podman, "rm", "--force", "--time", "0", *names], check=True,
                   capture_output=True)  # fmt: skip
    return kib


def _shared_servers() -> set[int]:
    """The shared cowfs server serving containers' roots, if any."""
    found = set()
    for record in Path("/run/cowfs/mounts").glob("*.json"):
        mount = json.loads(record.read_text())
        if mount.get("shared") and "/roots/oci-" in mount["mountpoint"]:
            found.add(int(mount["pid"]))
    return found


def _fuse_servers(short_id: str) -> list[int]:
    found = []
    for procs in Path("/sys/fs/cgroup/pids/contextd").glob(f"oci-{short_id}/cowfs/cgroup.procs"):
        found += [int(p) for p in procs.read_text().split()]
    return found


if __name__ == "__main__":
    main()
