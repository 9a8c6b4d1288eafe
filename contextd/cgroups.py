"""A guest's cgroup: limits, accounting, device access, freezing and killing everything in it.

Cgroup v1 (one hierarchy per controller, as on this project's machines) and
v2 (one unified hierarchy) where its controllers are enabled. Each guest gets
``contextd/NAME`` in every hierarchy used, with two children:

    contextd/NAME          memory and CPU limits, the accounting `status` shows
    contextd/NAME/guest    the guest's processes: pids limit, device list, freezer
    contextd/NAME/cowfs    the guest's FUSE server

so that what a guest makes its FUSE server do (memory for its directories,
CPU for its requests) is charged to the guest and bounded by its limits, while
the guest's pids limit, device list and freezer never touch the server that
answers for its root. On v1 the guest's processes are the union of
``guest/cgroup.procs`` there, which fork cannot escape.

On v2 the guest's processes are in one more level,

    contextd/NAME/guest/delegated    the root of the guest's cgroup namespace

the subtree the guest's own init manages (a distribution's systemd makes its
units' cgroups there, with the memory, cpu and pids controllers): every limit
is above it, out of its sight and reach, whatever the guest writes in its own
tree and whether or not the hierarchy is mounted with nsdelegate. The guest's
processes are those of ``guest`` and every cgroup below it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from contextd import devices, procfs
from contextd.config import Limits

CGROUP_ROOT = Path(os.environ.get("CONTEXTD_CGROUP_ROOT", "/sys/fs/cgroup"))
PARENT = "contextd"
GUEST = "guest"
DELEGATED = "delegated"
V2_CONTROLLERS = "+memory +cpu +pids"
FUSE_SERVER = "cowfs"
# "systemd" is the named hierarchy (name=systemd) a distribution's systemd keeps
# its units in: the guest's init gets its own part of it (see mount_for_guest).
V1_CONTROLLERS = ("memory", "cpu", "cpuacct", "pids", "freezer", "devices", "systemd")
_CFS_PERIOD_US = 100_000


@dataclass
class Stats:
    """What a guest's cgroup accounts (None where no controller tells)."""

    processes: int
    memory_bytes: int | None
    cpu_user_seconds: float | None
    cpu_system_seconds: float | None
    pids_limit_hits: int | None
    memory_limit_hits: int | None


def _v2_delegated_files() -> tuple[str, ...]:
    """The files of a v2 cgroup whose owner may manage its subtree (cgroup-v2.rst)."""
    try:
        return tuple(Path("/sys/kernel/cgroup/delegate").read_text().split())
    except OSError:
        return ("cgroup.procs", "cgroup.threads", "cgroup.subtree_control")


def _v2_controllers() -> set[str]:
    try:
        text = (CGROUP_ROOT / "cgroup.controllers").read_text()
    except OSError:
        return set()
    return set(text.split())


def _write(path: Path, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


# contextd's own helpers (its fork server and what it forks: guests' supervisors, the
# shared FUSE server): not a guest's name (those start with a letter or digit).
HELPERS = "_helpers"


def move_to_helpers(pid: int) -> None:
    """Move pid (the fork server) into contextd/_helpers in every hierarchy contextd uses.

    Out of the cgroup contextd was started in: under a systemd unit that is the unit's,
    whose processes `systemctl kill` signals and whose stop counts as left over; the
    guests' supervisors and the shared FUSE server, forked from it, live longer than
    the daemon and belong to no unit, as the guests themselves do."""
    if {"memory", "cpu", "pids"} <= _v2_controllers():
        directories = [CGROUP_ROOT / PARENT / HELPERS]
    else:
        directories = [
            CGROUP_ROOT / c / PARENT / HELPERS
            for c in V1_CONTROLLERS
            if (CGROUP_ROOT / c / "cgroup.procs").exists()
        ]
    for directory in directories:
        directory.mkdir(parents=True, exist_ok=True)
        _write(directory / "cgroup.procs", str(pid))


def join(directories: list[Path]) -> None:
    """Move the calling process into each of these cgroup directories."""
    for directory in directories:
        _write(directory / "cgroup.procs", "0")


class Cgroup:
    """The cgroup(s) of one guest."""

    def __init__(self, name: str):
        self.name = name
        self.unified = {"memory", "cpu", "pids"} <= _v2_controllers()
        if self.unified:
            self.dirs = {"unified": CGROUP_ROOT / PARENT / name}
        else:
            self.dirs = {
                c: CGROUP_ROOT / c / PARENT / name
                for c in V1_CONTROLLERS
                if (CGROUP_ROOT / c / "cgroup.procs").exists()
            }

    def _children_of(self, controller: str) -> list[Path]:
        return [self.dirs[controller] / GUEST, self.dirs[controller] / FUSE_SERVER]

    def _children(self, child: str) -> dict[str, Path]:
        return {controller: d / child for controller, d in self.dirs.items()}

    @property
    def guest_dirs(self) -> list[Path]:
        """Where the guest's processes go (one directory per hierarchy; on v2 the root of
        its cgroup namespace, below its limits)."""
        if self.unified:
            return [self.dirs["unified"] / GUEST / DELEGATED]
        return list(self._children(GUEST).values())

    def join_dirs(self, init_pid: int) -> list[Path]:
        """Where a process that joins the running guest (contextd exec, enter) goes.

        Cgroup v1: the guest's directories. Cgroup v2: the cgroup its init is in,
        within the guest's subtree (a guest's systemd moves itself to init.scope and
        enables controllers for the subtree, after which the subtree's root may hold no
        process: cgroup v2's no-internal-process rule)."""
        if not self.unified:
            return self.guest_dirs
        (delegated,) = self.guest_dirs
        path = _unified_cgroup_of(init_pid)
        if path is not None:
            directory = CGROUP_ROOT / path.lstrip("/")
            if directory == delegated or delegated in directory.parents:
                return [directory]
        return [delegated]

    @property
    def fuse_server_dirs(self) -> list[Path]:
        """Where the guest's FUSE server goes (one directory per hierarchy)."""
        return list(self._children(FUSE_SERVER).values())

    def exists(self) -> bool:
        """True if the guest's cgroup is there."""
        return any(d.is_dir() for d in self.dirs.values())

    def create(self, limits: Limits) -> None:
        """Make the cgroup(s) and apply limits; undone by remove()."""
        if self.unified:
            parent = CGROUP_ROOT / PARENT
            parent.mkdir(exist_ok=True)
            with contextlib.suppress(OSError):
                _write(parent / "cgroup.subtree_control", V2_CONTROLLERS)
        for directory in self.dirs.values():
            directory.mkdir(parents=True, exist_ok=True)
        try:
            if self.unified:
                guest = self.dirs["unified"] / GUEST
                _write(self.dirs["unified"] / "cgroup.subtree_control", V2_CONTROLLERS)
                guest.mkdir(exist_ok=True)
                _write(guest / "cgroup.subtree_control", V2_CONTROLLERS)
            for directory in self.guest_dirs + self.fuse_server_dirs:
                directory.mkdir(exist_ok=True)
            self._restrict_devices()
            self.apply(limits)
        except BaseException:
            self.remove()
            raise

    def _restrict_devices(self) -> None:
        """Only the devices of contextd.devices.ALLOWED for the guest's processes."""
        if self.unified:
            devices.attach_v2(str(self.dirs["unified"] / GUEST))
            return
        if "devices" not in self.dirs:
            raise OSError(errno.ENOENT, "no cgroup v1 devices hierarchy: cannot limit devices")
        guest = self.dirs["devices"] / GUEST
        _write(guest / "devices.deny", "a")
        for rule in devices.v1_rules():
            _write(guest / "devices.allow", rule)

    def apply(self, limits: Limits) -> None:
        """Set the guest's limits: memory and CPU for the guest and its FUSE server together,
        pids for the guest's own processes."""
        if self.unified:
            d = self.dirs["unified"]
            if limits.memory is not None:
                _write(d / "memory.max", str(limits.memory))
                with contextlib.suppress(OSError):
                    _write(d / "memory.swap.max", "0")
            if limits.pids is not None:
                _write(d / GUEST / "pids.max", str(limits.pids))
            if limits.cpu_weight is not None:
                _write(d / "cpu.weight", str(limits.cpu_weight))
            if limits.cpu_quota is not None:
                _write(d / "cpu.max", f"{int(limits.cpu_quota * _CFS_PERIOD_US)} {_CFS_PERIOD_US}")
            return
        if limits.memory is not None and "memory" in self.dirs:
            d = self.dirs["memory"]
            _write(d / "memory.limit_in_bytes", str(limits.memory))
            with contextlib.suppress(OSError):  # without swap accounting there is no memsw
                _write(d / "memory.memsw.limit_in_bytes", str(limits.memory))
            with contextlib.suppress(OSError):
                _write(d / "memory.swappiness", "0")
        if limits.pids is not None and "pids" in self.dirs:
            _write(self.dirs["pids"] / GUEST / "pids.max", str(limits.pids))
        if "cpu" in self.dirs:
            if limits.cpu_weight is not None:
                _write(
                    self.dirs["cpu"] / "cpu.shares", str(max(2, limits.cpu_weight * 1024 // 100))
                )
            if limits.cpu_quota is not None:
                _write(self.dirs["cpu"] / "cpu.cfs_period_us", str(_CFS_PERIOD_US))
                _write(
                    self.dirs["cpu"] / "cpu.cfs_quota_us",
                    str(int(limits.cpu_quota * _CFS_PERIOD_US)),
                )

    def add(self, pid: int) -> None:
        """Move a process into the guest's cgroup(s)."""
        for directory in self.guest_dirs:
            _write(directory / "cgroup.procs", str(pid))

    def add_fuse_server(self, pid: int) -> None:
        """Move the guest's FUSE server (every thread of it) into contextd/NAME/cowfs."""
        for directory in self.fuse_server_dirs:
            _write(directory / "cgroup.procs", str(pid))

    def pids(self) -> set[int]:
        """Every live process of the guest (zombies waiting to be reaped are dead): on
        cgroup v2 those of the cgroups the guest made below its own too."""
        if self.unified:
            return _live_pids(_subtree(self.dirs["unified"] / GUEST))
        return _live_pids(self.guest_dirs)

    def fuse_server_pids(self) -> set[int]:
        """The guest's FUSE server, while it runs."""
        return _live_pids(self.fuse_server_dirs)

    def _freeze(self, frozen: bool) -> None:
        if self.unified:
            with contextlib.suppress(OSError):
                _write(self.dirs["unified"] / GUEST / "cgroup.freeze", "1" if frozen else "0")
        elif "freezer" in self.dirs:
            with contextlib.suppress(OSError):
                _write(
                    self.dirs["freezer"] / GUEST / "freezer.state",
                    "FROZEN" if frozen else "THAWED",
                )

    def kill_all(self, timeout: float = 10.0) -> None:
        """SIGKILL every process of the guest, frozen first so that none forks away (cgroup
        v2: cgroup.kill, which kills the whole subtree at once, forks included)."""
        deadline = time.monotonic() + timeout
        kill_file = self.dirs["unified"] / GUEST / "cgroup.kill" if self.unified else None
        while True:
            pids = self.pids()
            if not pids:
                return
            if kill_file is not None and kill_file.exists():
                _write(kill_file, "1")
                time.sleep(0.02)
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"processes of {self.name} survive cgroup.kill: {sorted(self.pids())}"
                    )
                continue
            self._freeze(True)
            for pid in self.pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self._freeze(False)  # killed tasks die only once thawed
            time.sleep(0.02)
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"processes of {self.name} survive SIGKILL: {sorted(self.pids())}"
                )

    def delegate(self, uid: int, gid: int) -> None:
        """Give the guest's part of the systemd hierarchy (cgroup v1) or of the unified
        one (v2: contextd/NAME/guest/delegated, its directory and the files the kernel
        lists in /sys/kernel/cgroup/delegate) to the guest's root (a user namespace's),
        so that its init can make and fill cgroups of its own there."""
        for kind, files, below in (
            (
                "systemd",
                ("cgroup.procs", "tasks", "cgroup.clone_children", "notify_on_release"),
                Path(GUEST),
            ),
            ("unified", _v2_delegated_files(), Path(GUEST, DELEGATED)),
        ):
            directory = self.dirs.get(kind)
            if directory is None:
                continue
            guest = directory / below
            for path in [guest, *(guest / f for f in files)]:
                with contextlib.suppress(FileNotFoundError):
                    os.chown(path, uid, gid)

    def remove(self) -> None:
        """Remove the (empty) cgroup(s), children first (a guest's systemd makes its own)."""
        nested: list[Path] = []
        for directory in self.dirs.values():
            if directory.is_dir():
                nested += sorted(
                    (Path(d) for d, _subdirs, _files in os.walk(directory)),
                    key=lambda p: len(p.parts),
                    reverse=True,
                )
        for directory in nested:
            for _ in range(50):
                try:
                    directory.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError as e:
                    if e.errno != errno.EBUSY:
                        raise
                    time.sleep(0.02)

    def stats(self) -> Stats:
        """Processes, memory, CPU time and limit hits (memory and CPU: the FUSE server's too)."""
        memory = cpu_user = cpu_sys = pids_hits = mem_hits = None
        if self.unified:
            d = self.dirs["unified"]
            text = _read(d / "memory.current")
            memory = int(text) if text else None
            for line in (_read(d / "cpu.stat") or "").splitlines():
                key, _, value = line.partition(" ")
                if key == "user_usec":
                    cpu_user = int(value) / 1e6
                elif key == "system_usec":
                    cpu_sys = int(value) / 1e6
            pids_hits = _event(d / GUEST / "pids.events", "max")
            mem_hits = max(
                _event(d / "memory.events", "max") or 0,
                _event(d / "memory.events", "oom_kill") or 0,
            )
        else:
            if "memory" in self.dirs:
                text = _read(self.dirs["memory"] / "memory.usage_in_bytes")
                memory = int(text) if text else None
                # Hits: allocations refused at the limit, or processes the OOM killer took
                # (v1 counts a kill in the victim's own cgroup only: the guest's or cowfs's).
                text = _read(self.dirs["memory"] / "memory.failcnt")
                failed = int(text) if text else 0
                killed = sum(
                    _event(d / "memory.oom_control", "oom_kill") or 0
                    for d in (self.dirs["memory"], *self._children_of("memory"))
                )
                mem_hits = max(failed, killed)
            if "cpuacct" in self.dirs:
                hz = os.sysconf("SC_CLK_TCK")
                for line in (_read(self.dirs["cpuacct"] / "cpuacct.stat") or "").splitlines():
                    key, _, value = line.partition(" ")
                    if key == "user":
                        cpu_user = int(value) / hz
                    elif key == "system":
                        cpu_sys = int(value) / hz
            if "pids" in self.dirs:
                pids_hits = _event(self.dirs["pids"] / GUEST / "pids.events", "max")
        return Stats(len(self.pids()), memory, cpu_user, cpu_sys, pids_hits, mem_hits)


def _subtree(directory: Path) -> list[Path]:
    """A cgroup directory and every cgroup below it."""
    return [Path(d) for d, _subdirs, _files in os.walk(directory)]


def _unified_cgroup_of(pid: int) -> str | None:
    """The cgroup v2 path of a process ("/contextd/NAME/guest/..."), None if it is gone."""
    text = _read(Path(f"/proc/{pid}/cgroup"))
    for line in (text or "").splitlines():
        if line.startswith("0::"):
            return line[3:]
    return None


def _live_pids(directories: list[Path]) -> set[int]:
    result: set[int] = set()
    for directory in directories:
        text = _read(directory / "cgroup.procs")
        if text:
            result.update(int(p) for p in text.split())
    return {pid for pid in result if procfs.is_alive(pid)}


def _event(path: Path, key: str) -> int | None:
    for line in (_read(path) or "").splitlines():
        name, _, value = line.partition(" ")
        if name == key:
            return int(value)
    return None
