#!/usr/bin/env python3
"""FUSE over io_uring against /dev/fuse (libfuse 3.18's passthrough_hp), native and cowfs.

Measures fs_bench.py's metadata rows (cold find, cold stat of every file, warm
tar, create+delete of 10,000 files) on: the native tree; libfuse 3.18's example
server passthrough_hp serving it single-threaded (--single) and multi-threaded,
each once reading /dev/fuse and once over io_uring (-o io_uring); and cowfs
serving a clone of it. Every contender runs once per round, in turn (in reverse
every other round); medians and min-max over the rounds are reported, with each
server's CPU time. A last pass runs every workload once more under the kernel's
fuse tracepoints (fuse_request_send, fuse_request_end) to count its requests and
time each one from the kernel's queueing to the server's reply, so that the
time a server adds can be divided by its requests.

passthrough_hp is built from Debian's fuse3 3.18.3 source (the upstream tarball;
Debian's revision 3.18.3-1 carries no patches), checked against its SHA-256,
into --cache, never over the project's libfuse: pass --build the first time
(it apt-installs meson, g++, liburing-dev and libnuma-dev if missing). io_uring
needs the fuse module's parameter enable_uring: the run sets it to Y and puts
back the value it found. Run as root:

    .venv/bin/python bench/uring_bench.py --build --rounds 5 --markdown

Everything runs in a fresh ext4 of its own (bench/scratch.py, image
/var/tmp/uring-bench-scratch.img, kept for the next run) mounted at --workdir.
The tree has 8,000 files, not fs_bench's 50,000: passthrough_hp keeps an fd for
every inode the kernel knows and cannot raise its hard fd limit. passthrough_hp
splices requests through a pipe by default (hp-1-nosplice reads them into memory,
as cowfs does). --app-cpu N keeps the workloads on CPU N and KEY@M pins a
server to CPU M, to tell the transport's cost from the cost of a wake-up on
another CPU. bench/RESULTS.md ("FUSE over io_uring: measured") has the commands
and figures of 2026-12-01.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from fs_bench import COWFS, create_delete, drop_caches, find, make_tree, sh, tar_wc, timed
from scratch import add_scratch_option, work_directory

from cowfs.host import registry

LIBFUSE_VERSION = "3.18.3"
LIBFUSE_TARBALL = f"fuse3_{LIBFUSE_VERSION}.orig.tar.gz"
LIBFUSE_SHA256 = "bcd19582c5e30f7fe45dd86a5540e998590aa01903afc7ebcbeea6c8ac5421ee"
DEBIAN_POOL = os.environ.get("DEBIAN_POOL", "http://deb.debian.org/debian/pool/main/f/fuse3")
BUILD_PACKAGES = ("meson", "ninja-build", "pkgconf", "g++", "curl", "liburing-dev", "libnuma-dev")
DEFAULT_CACHE = Path(f"/var/cache/cowfs-bench/libfuse-{LIBFUSE_VERSION}")
SCRATCH_IMAGE = Path("/var/tmp/uring-bench-scratch.img")

ENABLE_URING = Path("/sys/module/fuse/parameters/enable_uring")
TRACING = Path("/sys/kernel/tracing")
RING_THREAD = "fuse-ring-"  # libfuse names its io_uring queue threads fuse-ring-<cpu>
CLOCK_TICK = os.sysconf("SC_CLK_TCK")


def build_passthrough_hp(cache: Path) -> Path:
    """libfuse 3.18's passthrough_hp, built with io_uring into cache (once)."""
    binary = cache / "build/example/passthrough_hp"
    if binary.exists():
        return binary
    missing = [
        p
        for p in BUILD_PACKAGES
        if "install ok installed"
        not in subprocess.run(
            ["dpkg-query", "-W", "-f=${Status}", p], capture_output=True, text=True, check=False
        ).stdout
    ]
    if missing:
        sh(
            "apt-get",
            "install",
            "-y",
            "--no-install-recommends",
            *missing,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        )
    cache.mkdir(parents=True, exist_ok=True)
    tarball = cache / LIBFUSE_TARBALL
    sh("curl", "-fsSL", "-o", tarball, f"{DEBIAN_POOL}/{LIBFUSE_TARBALL}")
    if hashlib.sha256(tarball.read_bytes()).hexdigest() != LIBFUSE_SHA256:
        tarball.unlink()
        sys.exit(f"uring_bench.py: {LIBFUSE_TARBALL} does not have the expected SHA-256")
    source = cache / f"fuse-{LIBFUSE_VERSION}"
    build = cache / "build"
    sh("rm", "-rf", source, build)
    sh("tar", "-xzf", tarball, "-C", cache)
    sh(
        "meson",
        "setup",
        build,
        source,
        "--buildtype=release",
        "-Dexamples=true",
        "-Dutils=false",
        "-Dtests=false",
        "-Duseroot=false",
        "-Dinitscriptdir=",
        "-Ddisable-mtab=true",
        stdout=subprocess.DEVNULL,
    )
    if "#define HAVE_URING" not in (build / "fuse_config.h").read_text():
        sys.exit("uring_bench.py: libfuse configured without io_uring (needs liburing, libnuma)")
    sh("ninja", "-C", build, "example/passthrough_hp", stdout=subprocess.DEVNULL)
    return binary


@contextlib.contextmanager
def uring_enabled() -> Iterator[None]:
    """The fuse module's enable_uring set to Y meanwhile, then put back as it was."""
    if not ENABLE_URING.exists():
        sys.exit(f"uring_bench.py: {ENABLE_URING} missing (kernel without FUSE_IO_URING)")
    before = ENABLE_URING.read_text().strip()
    ENABLE_URING.write_text("Y\n")
    try:
        yield
    finally:
        ENABLE_URING.write_text(before + "\n")
        print(f"enable_uring put back to {ENABLE_URING.read_text().strip()}", file=sys.stderr)


def process_cpu(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of a process, its ended threads included."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLOCK_TICK, int(fields[12]) / CLOCK_TICK


def ring_thread_share(pid: int) -> float:
    """The part of a process's live threads' CPU time spent in libfuse's io_uring threads."""
    ring = total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):
            ns = int((task / "schedstat").read_text().split()[0])
            total += ns
            if (task / "comm").read_text().startswith(RING_THREAD):
                ring += ns
    return ring / total if total else 0.0


class Contender:
    """A view of the tree, and the process serving it (none for native)."""

    name = ""
    server_cpu: int | None = None  # every thread of the server pinned there once it serves

    def __init__(self, root: Path):
        self.root = root

    def start(self) -> None:
        pass

    def pin_server(self) -> None:
        pid = self.server_pid()
        if pid is None or self.server_cpu is None:
            return
        for task in Path(f"/proc/{pid}/task").iterdir():
            os.sched_setaffinity(int(task.name), {self.server_cpu})

    def stop(self) -> None:
        pass

    def server_pid(self) -> int | None:
        return None


class Native(Contender):
    name = "native"


class PassthroughHp(Contender):
    """libfuse's example server passing every request through to the tree."""

    def __init__(
        self,
        binary: Path,
        tree: Path,
        mountpoint: Path,
        single: bool,
        uring: bool,
        splice: bool = True,
    ):
        super().__init__(mountpoint)
        self.name = (
            f"hp {'1 thread' if single else 'mt'}{' uring' if uring else ''}"
            f"{'' if splice else ' nosplice'}"
        )
        self.uring = uring
        self.command = [
            str(binary),
            "--foreground",
            *(["--single"] if single else []),
            *([] if splice else ["--nosplice"]),
            *(["-o", "io_uring"] if uring else []),
            str(tree),
            str(mountpoint),
        ]
        self.log = mountpoint.parent / f"{mountpoint.name}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.ring_shares: list[float] = []

    def start(self) -> None:
        self.root.mkdir(exist_ok=True)
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=log)
        deadline = time.monotonic() + 10
        while not self.root.is_mount():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                sys.exit(f"uring_bench.py: {self.name} did not mount (see {self.log})")
            time.sleep(0.01)
        self.root.stat()  # INIT is answered (and the ring threads started) by then
        rings = [
            t
            for t in Path(f"/proc/{self.process.pid}/task").iterdir()
            if (t / "comm").read_text().startswith(RING_THREAD)
        ]
        if bool(rings) != self.uring:
            self.stop()
            sys.exit(
                f"uring_bench.py: {self.name} has {len(rings)} io_uring threads (see {self.log})"
            )

    def stop(self) -> None:
        if self.process is None:
            return
        if self.uring and self.process.poll() is None:
            self.ring_shares.append(ring_thread_share(self.process.pid))
        if self.root.is_mount():
            sh("umount", self.root)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    def server_pid(self) -> int | None:
        return self.process.pid if self.process else None


class Cowfs(Contender):
    name = "cowfs"

    def __init__(self, guest: Path, mountpoint: Path):
        super().__init__(mountpoint)
        self.guest = guest

    def start(self) -> None:
        self.root.mkdir(exist_ok=True)
        sh(COWFS, "mount", self.guest, self.root, stdout=subprocess.DEVNULL)

    def stop(self) -> None:
        if self.root.is_mount():
            sh(COWFS, "umount", self.root)

    def server_pid(self) -> int | None:
        record = registry.read_record(str(self.root))
        return record.pid if record else None


@dataclass
class Workload:
    name: str
    prepare: Callable[[Path], object]
    run: Callable[[Path], object]


WORKLOADS = [
    Workload("find, cold", lambda _: drop_caches(), lambda root: find(root, False)),
    Workload("find -printf %s, cold", lambda _: drop_caches(), lambda root: find(root, True)),
    Workload("tar c | wc -c, warm", tar_wc, tar_wc),
    Workload("create+delete 10k files", lambda _: None, lambda root: create_delete(root, 10000)),
]


@dataclass
class Sample:
    wall: float
    user: float  # the server's CPU seconds (0 for native)
    system: float


@contextlib.contextmanager
def workloads_on(cpu: int | None) -> Iterator[None]:
    """This process, and so the workloads' commands, kept on cpu meanwhile (if not None)."""
    if cpu is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def measure(c: Contender, app_cpu: int | None) -> dict[str, Sample]:
    samples = {}
    pid = c.server_pid()
    with workloads_on(app_cpu):
        for w in WORKLOADS:
            w.prepare(c.root)
            before = process_cpu(pid) if pid else (0.0, 0.0)
            wall = timed(lambda w=w: w.run(c.root))  # type: ignore[misc]
            after = process_cpu(pid) if pid else (0.0, 0.0)
            samples[w.name] = Sample(wall, after[0] - before[0], after[1] - before[1])
    return samples


@dataclass
class RequestTrace:
    """What the kernel's fuse tracepoints saw of one connection during one workload."""

    sent: Counter[str] = field(default_factory=Counter)  # by opcode
    ended: int = 0
    latencies: list[float] = field(default_factory=list)  # send to end, seconds
    lost: int = 0  # events the trace buffer overwrote

    @property
    def median_latency_us(self) -> float:
        return statistics.median(self.latencies) * 1e6 if self.latencies else float("nan")


_EVENT = re.compile(
    r"\s(\d+\.\d+): fuse_request_(send|end): connection \d+ req (\d+)(?: opcode \d+ \((\w+)\))?"
)


@contextlib.contextmanager
def traced(mountpoint: Path) -> Iterator[RequestTrace]:
    """Record the requests of mountpoint's FUSE connection meanwhile (a tracefs instance)."""
    dev = mountpoint.stat().st_dev
    connection = (os.major(dev) << 20) | os.minor(dev)  # the kernel's dev_t
    instance = TRACING / "instances" / f"uring-bench-{os.getpid()}"
    instance.mkdir()
    result = RequestTrace()
    try:
        (instance / "buffer_size_kb").write_text("65536\n")
        for event in ("fuse_request_send", "fuse_request_end"):
            (instance / f"events/fuse/{event}/filter").write_text(f"connection == {connection}\n")
            (instance / f"events/fuse/{event}/enable").write_text("1\n")
        yield result
        (instance / "tracing_on").write_text("0\n")
        for stats in (instance / "per_cpu").glob("cpu*/stats"):
            result.lost += int(re.search(r"overrun: (\d+)", stats.read_text())[1])  # type: ignore[index]
        sent_at: dict[str, float] = {}
        with (instance / "trace").open() as trace:
            for line in trace:
                m = _EVENT.search(line)
                if not m:
                    continue
                stamp, kind, unique, opcode = float(m[1]), m[2], m[3], m[4]
                if kind == "send":
                    result.sent[opcode.removeprefix("FUSE_")] += 1
                    sent_at[unique] = stamp
                else:
                    result.ended += 1
                    if unique in sent_at:
                        result.latencies.append(stamp - sent_at.pop(unique))
    finally:
        for event in ("fuse_request_send", "fuse_request_end"):
            with contextlib.suppress(OSError):
                (instance / f"events/fuse/{event}/enable").write_text("0\n")
        instance.rmdir()


def count_requests(c: Contender, app_cpu: int | None) -> dict[str, RequestTrace]:
    traces = {}
    with workloads_on(app_cpu):
        for w in WORKLOADS:
            w.prepare(c.root)
            with traced(c.root) as trace:
                w.run(c.root)
            traces[w.name] = trace
    return traces


def fmt_spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3f}s ({min(values):.3f}-{max(values):.3f})"


def report(
    runs: dict[str, list[dict[str, Sample]]],
    traces: dict[str, dict[str, RequestTrace]],
    ring_shares: dict[str, list[float]],
    markdown: bool,
) -> str:
    names = list(runs)
    rows = [w.name for w in WORKLOADS]
    walls = {n: {r: [s[r].wall for s in runs[n]] for r in rows} for n in names}
    native = {r: statistics.median(walls["native"][r]) for r in rows}
    n_rounds = len(runs["native"])
    out: list[str] = []

    def table(title: str, header: list[str], body: list[list[str]]) -> None:
        out.append("")
        out.append(title)
        if markdown:
            out.append("")
            out.append("| " + " | ".join(header) + " |")
            out.append("|---" * len(header) + "|")
            out.extend("| " + " | ".join(cells) + " |" for cells in body)
        else:
            width = [max(len(x) for x in col) for col in zip(header, *body, strict=True)]
            for cells in [header, *body]:
                out.append("  ".join(x.ljust(w) for x, w in zip(cells, width, strict=True)))

    table(
        f"Wall time: median (min-max) over {n_rounds} rounds, x native",
        ["test", *names],
        [
            [r]
            + [
                fmt_spread(walls[n][r])
                + ("" if n == "native" else f" {statistics.median(walls[n][r]) / native[r]:.2f}x")
                for n in names
            ]
            for r in rows
        ],
    )
    fuse_names = [n for n in names if n in traces]
    table(
        "Requests per run (fuse_request_end; opcodes from fuse_request_send)",
        ["test", *fuse_names],
        [
            [r]
            + [
                f"{traces[n][r].ended:,}"
                + (f" (lost {traces[n][r].lost})" if traces[n][r].lost else "")
                for n in fuse_names
            ]
            for r in rows
        ],
    )
    table(
        "Requests by kind (fuse_request_send)",
        ["test", "server", "kinds"],
        [
            [r, n, ", ".join(f"{k} {v:,}" for k, v in traces[n][r].sent.most_common())]
            for r in rows
            for n in fuse_names
        ],
    )

    def per_request(n: str, r: str) -> str:
        requests = traces[n][r].ended
        if not requests:
            return "-"
        added = (statistics.median(walls[n][r]) - native[r]) / requests * 1e6
        user = statistics.median(s[r].user for s in runs[n]) / requests * 1e6
        system = statistics.median(s[r].system for s in runs[n]) / requests * 1e6
        return f"{added:.1f} / {user:.1f}+{system:.1f} / {traces[n][r].median_latency_us:.1f}"

    table(
        "Per request, µs: wall added over native / server CPU user+system / "
        "kernel send-to-end latency (median)",
        ["test", *fuse_names],
        [[r] + [per_request(n, r) for n in fuse_names] for r in rows],
    )
    if ring_shares:
        out.append("")
        out.append(
            "Share of the server's CPU time in libfuse's io_uring threads (fuse-ring-N), "
            "per mount: "
            + "; ".join(
                f"{n}: " + ", ".join(f"{s:.0%}" for s in shares)
                for n, shares in ring_shares.items()
            )
        )
    return "\n".join(out)


# hp: passthrough_hp; 1: --single, mt: its thread pool; nosplice: requests read(2) into
# memory as cowfs reads them, not spliced through a pipe (passthrough_hp's default).
CONTENDERS = ("hp-1", "hp-1-nosplice", "hp-1-uring", "hp-mt", "hp-mt-uring", "cowfs")


def make_contender(key: str, binary: Path, work: Path) -> Contender:
    """A contender by its --only key: one of CONTENDERS, @CPU to pin its server there."""
    base, _, cpu = key.partition("@")
    mountpoint = work / f"mnt-{key.replace('@', '-cpu')}"
    c: Contender
    if base == "cowfs":
        c = Cowfs(work / "guest", mountpoint)
    else:
        single, uring = base.startswith("hp-1"), base.endswith("-uring")
        splice = not base.endswith("-nosplice")
        c = PassthroughHp(binary, work / "tree", mountpoint, single, uring, splice)
    if cpu:
        c.server_cpu = int(cpu)
        c.name += f" @cpu{cpu}"
    return c


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0] if __doc__ else None,
        epilog=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--files", type=int, default=8000, help="tree size (default 8000)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of every contender")
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp/uring-bench"))
    add_scratch_option(parser)
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="libfuse 3.18 build")
    parser.add_argument("--build", action="store_true", help="build passthrough_hp if missing")
    parser.add_argument(
        "--only",
        nargs="*",
        default=[c for c in CONTENDERS if c != "hp-1-nosplice"],
        help="contenders to run (native always runs): "
        + ", ".join(CONTENDERS)
        + "; KEY@CPU pins every thread of its server to CPU once it serves",
    )
    parser.add_argument(
        "--app-cpu", type=int, help="run the workloads on this CPU only (default: any)"
    )
    parser.add_argument("--no-count", action="store_true", help="skip the tracepoint pass")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("uring_bench.py: run as root (it mounts filesystems)")
    cpus = os.sched_getaffinity(0)
    for key in args.only:
        base, _, cpu = key.partition("@")
        if base not in CONTENDERS or (cpu and (not cpu.isdigit() or int(cpu) not in cpus)):
            sys.exit(f"uring_bench.py: unknown contender {key!r} (see --help)")
    # passthrough_hp keeps an fd for every inode the kernel knows (the tree and the
    # 10,000 files created), up to the hard limit (it raises its soft limit to it).
    fd_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if args.files * 102 // 100 + 10000 + 1000 > fd_limit:
        sys.exit(f"uring_bench.py: --files {args.files} needs more fds than the limit {fd_limit}")
    if args.app_cpu is not None and args.app_cpu not in cpus:
        sys.exit(f"uring_bench.py: no CPU {args.app_cpu} here")
    binary = args.cache / "build/example/passthrough_hp"
    if args.build:
        binary = build_passthrough_hp(args.cache)
    elif not binary.exists():
        sys.exit(f"uring_bench.py: {binary} missing: pass --build to build libfuse 3.18 there")

    with uring_enabled(), work_directory(args.workdir, 2, not args.no_scratch, SCRATCH_IMAGE):
        work: Path = args.workdir
        tree = work / "tree"
        print(f"building a {args.files}-file tree in {tree}", file=sys.stderr, flush=True)
        make_tree(tree, args.files)
        sh(COWFS, "clone", tree, work / "guest", stdout=subprocess.DEVNULL)
        contenders = [Native(tree)] + [make_contender(key, binary, work) for key in args.only]
        runs: dict[str, list[dict[str, Sample]]] = {c.name: [] for c in contenders}
        for round_number in range(args.rounds):
            for c in contenders if round_number % 2 == 0 else contenders[::-1]:
                print(f"--- {c.name} (round {round_number + 1})", file=sys.stderr, flush=True)
                c.start()
                try:
                    c.pin_server()
                    runs[c.name].append(measure(c, args.app_cpu))
                finally:
                    c.stop()
        traces: dict[str, dict[str, RequestTrace]] = {}
        if not args.no_count:
            for c in contenders[1:]:
                print(f"--- {c.name} (counting requests)", file=sys.stderr, flush=True)
                c.start()
                try:
                    c.pin_server()
                    traces[c.name] = count_requests(c, args.app_cpu)
                finally:
                    c.stop()
        ring_shares = {
            c.name: c.ring_shares for c in contenders if isinstance(c, PassthroughHp) and c.uring
        }
        print(report(runs, traces, ring_shares, args.markdown))


if __name__ == "__main__":
    main()
