"""The daemon's side of an OCI container: its cowfs root, from the image's layers.

An engine hands the runtime its image's layers only as an overlay mounted on
root.path (podman: storage/overlay/ID/merged; containerd: BUNDLE/rootfs), read
here from the mount table. Hard links cannot be made from an overlay (EXDEV),
and cowfs must not mark the engine's own layer files (a clone sets the COW mark
on its template's inodes), so the layers are copied once per image into a
template of contextd's own, ``guests/oci-image-HASH`` (the merged view of the
lower layers, a read-only overlay: whiteouts applied), and every container of
that image is a ``cowfs clone`` of it: 100 containers of one image share their
unchanged files, and with passthrough their page cache. `cowfs hashify` can
share templates with the content store like any guest tree. A template stays
for the image's next container until its engine has removed the image (a layer
it was made from is gone) and no container uses it: then the next release
removes it.

The container's root is then mounted by a FUSE server forked by contextd's fork
server (as a guest's root is), kept in contextd/NAME/cowfs, outside the
engine's process tree: conmon or containerd-shim is the parent of the
container's init and of nothing of contextd's. A record of each container is
kept in /run/contextd/oci/NAME.json until `delete` releases it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import select
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from contextd import procfs
from contextd.cgroups import Cgroup
from contextd.config import GuestConfig, Limits, Security, Size
from contextd.forkserver import ForkServerError
from contextd.paths import run_dir
from contextd.runtime import (
    GuestError,
    Runtime,
    Status,
    apply_disk_limits,
    kill_and_remove,
    root_only_dir,
    unmount_root,
)
from contextd.runtime import status as guest_status
from cowfs.atomicfile import write_atomically
from cowfs.errors import CowfsError
from cowfs.host.paths import state_root
from cowfs.host.treelock import remove_tree
from cowfs.unify.clone import clone
from cowfs.units import parse_size
from native import syscalls as sc

log = logging.getLogger(__name__)

FIRST_XID = 60000  # OCI containers' xids: 60000-65535, apart from configured guests'
DISK_LIMIT_ANNOTATION = "org.contextd.cowfs.disk-space"  # bytes, or with K/M/G/T
# "own" (the default) or "shared": the root served by the shared cowfs process
# (contextd's fuse_server; docs/contextd.md, FUSE SERVERS).
FUSE_SERVER_ANNOTATION = "org.contextd.cowfs.fuse-server"


@dataclass
class OciRecord:
    """What the daemon keeps of an OCI container."""

    name: str
    id: str
    bundle: str
    engine: str
    xid: int
    root: str  # its cowfs tree (a clone of the image's template)
    mountpoint: str
    template: str
    fuse_server_pid: int = 0  # the first; the daemon's child (its successors: the keeper's)
    fuse_server_start: int = 0
    keeper_pid: int = 0  # contextd.oci.keeper, a job of the fork server
    fuse_server: str = "own"  # or "shared" (FUSE_SERVER_ANNOTATION)
    init_pid: int = 0
    init_start: int = 0
    created: float = 0.0

    def config(self) -> GuestConfig:
        """The container as a guest configuration (what the mount and `status` need)."""
        return GuestConfig(
            name=self.name,
            xid=self.xid,
            root=self.root,
            path=_records() / f"{self.name}.json",
            hostname=self.id[:12],
            security=Security(userns=False),
            fuse_server="shared" if self.fuse_server == "shared" else "own",
        )

    def is_running(self) -> bool:
        return procfs.is_running(self.init_pid, self.init_start)


def _records() -> Path:
    return run_dir() / "oci"


def load(name: str) -> OciRecord | None:
    try:
        return OciRecord(**json.loads((_records() / f"{name}.json").read_text()))
    except (FileNotFoundError, ValueError, TypeError):
        return None


def save(record: OciRecord) -> None:
    write_atomically(_records() / f"{record.name}.json", json.dumps(asdict(record)))


def recorded() -> list[OciRecord]:
    """Every OCI container the daemon keeps a root for."""
    directory = _records()
    if not directory.is_dir():
        return []
    found = (load(p.stem) for p in sorted(directory.glob("*.json")))
    return [r for r in found if r is not None]


def layers_of(root_path: str) -> list[str]:
    """The directories whose merged view root_path shows: an overlay's lower layers (top
    first), or root_path itself if it is a plain directory."""
    real = os.path.realpath(root_path)
    if not os.path.isdir(real):
        raise GuestError(f"root.path {root_path} is not a directory")
    with open("/proc/self/mountinfo") as f:
        entries = [line.split() for line in f]
    for fields in reversed(entries):  # the last mount on a point is the one seen
        separator = fields.index("-")
        point = _unescape(fields[4])
        if point != real:
            continue
        if fields[separator + 1] != "overlay":
            break
        options = _unescape(fields[separator + 3]).split(",")
        lower = next((o[len("lowerdir=") :] for o in options if o.startswith("lowerdir=")), "")
        if not lower:
            break
        return [os.path.realpath(layer) for layer in lower.replace("\\:", "\0").split(":")]
    return [real]


def _unescape(text: str) -> str:
    """mountinfo's octal escapes (\\040 for a space) undone."""
    return text.encode().decode("unicode_escape") if "\\" in text else text


def image_template(layers: list[str]) -> str:
    """The cowfs template of an image (its layers merged), made on its first use."""
    key = hashlib.sha256("\n".join(layers).encode()).hexdigest()[:16]
    guests = state_root() / "guests"
    template = guests / f"oci-image-{key}"
    if template.is_dir():
        return str(template)
    work = guests / f".oci-image-{key}.work{os.getpid()}"
    merged = root_only_dir(run_dir() / "oci-layers") / key
    merged.mkdir(exist_ok=True)
    empty = merged.with_name(f"{key}.empty")  # overlayfs wants two layers or more
    empty.mkdir(exist_ok=True)
    try:
        # A read-only overlay of the layers: their merged view, whiteouts applied.
        options = "lowerdir=" + ":".join([*layers, str(empty)])
        sc.mount("overlay", str(merged), "overlay", sc.MS_RDONLY, options)
        try:
            copy = subprocess.run(
                ["cp", "-a", "--", f"{merged}/.", str(work)],
                capture_output=True,
                text=True,
                check=False,
            )
        finally:
            sc.umount2(str(merged), sc.MNT_DETACH)
        if copy.returncode != 0:
            raise GuestError(f"the image's layers could not be copied: {copy.stderr.strip()}")
        os.chmod(work, 0o755)
        os.rename(work, template)
        write_atomically(_images() / f"{key}.json", json.dumps({"layers": layers}))
    finally:
        for directory in (merged, empty):
            with contextlib.suppress(OSError):
                directory.rmdir()
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    return str(template)


def _images() -> Path:
    """Where the layers each image template was made from are noted."""
    return root_only_dir(state_root() / "oci-images")


def prune_templates() -> list[str]:
    """Remove the templates of images their engine has removed (a layer of theirs is gone)
    that no container uses any more; the templates removed."""
    in_use = {r.template for r in recorded()}
    removed = []
    for note in sorted(_images().glob("*.json")):
        template = str(state_root() / "guests" / f"oci-image-{note.stem}")
        try:
            layers = json.loads(note.read_text())["layers"]
        except (OSError, ValueError, KeyError):
            continue
        if template in in_use or all(os.path.isdir(layer) for layer in layers):
            continue
        if os.path.isdir(template):
            remove_tree(template)
        note.unlink()
        removed.append(template)
    return removed


def _free_xid() -> int:
    used = {r.xid for r in recorded()}
    for xid in range(FIRST_XID, 65536):
        if xid not in used:
            return xid
    raise GuestError("no xid left for another OCI container (60000-65535 are in use)")


def limits_from(resources: dict[str, object], annotations: dict[str, str]) -> Limits:
    """The container's cgroup and disk limits: the spec's linux.resources (memory, pids,
    CPU quota) and the disk limit annotation."""
    memory = resources.get("memory") or {}
    pids = resources.get("pids") or {}
    cpu = resources.get("cpu") or {}
    assert isinstance(memory, dict) and isinstance(pids, dict) and isinstance(cpu, dict)
    quota = None
    if cpu.get("quota") and cpu.get("period") and int(cpu["quota"]) > 0:
        quota = int(cpu["quota"]) / int(cpu["period"])
    disk = annotations.get(DISK_LIMIT_ANNOTATION)
    return Limits(
        memory=Size(memory["limit"]) if memory.get("limit") else None,
        pids=int(pids["limit"]) if pids.get("limit") else None,
        cpu_quota=quota,
        disk_space=Size(parse_size(disk, f"annotation {DISK_LIMIT_ANNOTATION}")) if disk else None,
    )


def prepare(runtime: Runtime, request: dict[str, object]) -> OciRecord:
    """A new container's cowfs root, mounted: the verb oci_prepare."""
    name = str(request["name"])
    if load(name) is not None:
        raise GuestError(f"container {name} has a root already")
    annotations = dict(request.get("annotations") or {})  # type: ignore[call-overload]
    limits = limits_from(dict(request.get("resources") or {}), annotations)  # type: ignore[call-overload]
    fuse_server = annotations.get(FUSE_SERVER_ANNOTATION, "own")
    if fuse_server not in ("own", "shared"):
        raise GuestError(
            f"annotation {FUSE_SERVER_ANNOTATION}: {fuse_server!r} is neither 'own' nor 'shared'"
        )
    layers = layers_of(str(request["root_path"]))
    template = image_template(layers)
    engine = annotations.get("io.container.manager") or (
        "containerd" if "/containerd/" in str(request["bundle"]) else "unknown"
    )
    record = OciRecord(
        name=name,
        id=str(request["id"]),
        bundle=str(request["bundle"]),
        engine=engine,
        xid=_free_xid(),
        root=str(state_root() / "guests" / name),
        mountpoint=str(root_only_dir(run_dir() / "roots") / name),
        template=template,
        created=time.time(),
        fuse_server=fuse_server,
    )
    if os.path.lexists(record.root):
        raise GuestError(f"container {name}: {record.root} exists already")
    config = record.config()
    config.limits = limits
    save(record)  # first: what is made below is found and released by delete
    try:
        clone(template, record.root)
        apply_disk_limits(config)
        cgroup = Cgroup(name)
        cgroup.create(limits)
        os.makedirs(record.mountpoint, exist_ok=True)
        record.fuse_server_pid = runtime.mount_root(config, record.mountpoint)
        record.fuse_server_start = procfs.start_time(record.fuse_server_pid) or 0
        if fuse_server == "own":  # the shared one is no container's
            cgroup.add_fuse_server(record.fuse_server_pid)
        save(record)
    except BaseException:
        release(record)
        raise
    return record


def status(record: OciRecord) -> Status:
    """What `contextd status` and `list` show of the container."""
    running = record.is_running()
    return dataclasses.replace(
        guest_status(record.config()),
        state="running" if running else "stopped",
        init_pid=record.init_pid if running else None,
        uptime_seconds=time.time() - record.created if running else None,
        engine=record.engine,
        container_id=record.id,
        bundle=record.bundle,
    )


def started(runtime: Runtime, name: str, pid: int, pid_start: int) -> None:
    """Note the container's init, and start the keeper of its root (contextd.oci.keeper)
    (verb oci_started)."""
    record = load(name)
    if record is None:
        raise GuestError(f"no OCI container {name}")
    record.init_pid, record.init_start = pid, pid_start
    cgroup = Cgroup(name)
    config = record.config()
    server = {
        "pid": record.fuse_server_pid,
        "start": procfs.start_time(record.fuse_server_pid) or 0,
        "mount": {
            **runtime.mount_args(config, record.mountpoint),
            "cgroup_dirs": [str(d) for d in cgroup.fuse_server_dirs],
        },
        "record": str(root_server_record_path(name)),
    }
    args = {"fuse_server": server, "init_pid": pid, "init_start": pid_start}
    null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    try:
        record.keeper_pid = runtime.helpers.run("keeper", args, [null, null, null])
    except ForkServerError as e:
        raise GuestError(f"container {name}: the keeper of its root did not start: {e}") from None
    finally:
        os.close(null)
    cgroup.add_fuse_server(record.keeper_pid)  # charged with the server it keeps
    save(record)


def _reap_first_server(record: OciRecord) -> None:
    """Reap the container's first FUSE server, the daemon's child, if it has ended: the
    daemon's reaper looks for it only every half second, and a container can come and
    go (its server killed) in less."""
    pidfd = procfs.pidfd_of(record.fuse_server_pid, record.fuse_server_start)
    if pidfd is None:
        return
    try:
        with contextlib.suppress(ChildProcessError):  # not ours, or reaped meanwhile
            os.waitid(os.P_PIDFD, pidfd, os.WEXITED | os.WNOHANG)
    finally:
        os.close(pidfd)


def root_server_record_path(name: str) -> Path:
    """Where the keeper notes the replacements of the container's FUSE server."""
    return _records() / f"{name}.rootserver"


def release(record: OciRecord) -> None:
    """Everything prepare made, undone (verb oci_release): the container's processes
    (there should be none left) killed, its root unmounted, its tree and cgroup removed."""
    cgroup = Cgroup(record.name)
    cgroup.kill_all()
    keeper = procfs.pidfd_of(record.keeper_pid)
    unmount_root(record.mountpoint)
    _reap_first_server(record)
    if keeper is not None:  # it reaps the server it started once the unmount ends it
        select.select([keeper], [], [], 5)
        os.close(keeper)
    kill_and_remove(cgroup)
    with contextlib.suppress(FileNotFoundError):
        os.rmdir(record.mountpoint)
    if os.path.isdir(record.root):
        remove_tree(record.root)
    (_records() / f"{record.name}.json").unlink(missing_ok=True)
    root_server_record_path(record.name).unlink(missing_ok=True)
    try:
        prune_templates()
    except CowfsError as e:  # the container is gone all the same; tried again next time
        log.warning("image templates not pruned: %s", e)
