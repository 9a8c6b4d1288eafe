"""A bundle's config.json (the OCI runtime specification): what contextd honours.

Decoded into typed structures (msgspec), then checked: what contextd cannot
honour is refused with one line, never half done. Refused: user namespaces and
id mappings, hooks, device nodes, the host's PID, mount, IPC or UTS namespace
(a container shares nothing of the host's but, when the engine gives it one by
path, a network namespace), sysctls other than the container's own
namespaces', and `process.terminal` without a console socket.

Replaced by contextd's own: the seccomp filter (contextd.seccomp: the spec's
profile is not translated; ours is always loaded), the device list
(contextd.devices), the cgroup (contextd/oci-ID in every hierarchy, not
linux.cgroupsPath), and /proc's masks (contextd.namespace's, with the spec's
maskedPaths and readonlyPaths on top).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TypeVar

import msgspec

from contextd.capabilities import CAPABILITIES

_T = TypeVar("_T")
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class SpecError(Exception):
    """config.json asks for what contextd cannot or will not do; one line."""


class User(msgspec.Struct, rename="camel"):
    uid: int = 0
    gid: int = 0
    umask: int | None = None
    additional_gids: list[int] = msgspec.field(default_factory=list)


class Capabilities(msgspec.Struct):
    bounding: list[str] = msgspec.field(default_factory=list)
    effective: list[str] = msgspec.field(default_factory=list)
    permitted: list[str] = msgspec.field(default_factory=list)
    inheritable: list[str] = msgspec.field(default_factory=list)
    ambient: list[str] = msgspec.field(default_factory=list)


class Rlimit(msgspec.Struct):
    type: str
    hard: int
    soft: int


class ConsoleSize(msgspec.Struct):
    height: int = 0
    width: int = 0


class Process(msgspec.Struct, rename="camel"):
    args: list[str]
    cwd: str = "/"
    env: list[str] = msgspec.field(default_factory=list)
    terminal: bool = False
    console_size: ConsoleSize | None = None
    user: User = msgspec.field(default_factory=User)
    capabilities: Capabilities | None = None
    rlimits: list[Rlimit] = msgspec.field(default_factory=list)
    no_new_privileges: bool = False
    oom_score_adj: int | None = None
    apparmor_profile: str = ""
    selinux_label: str = ""

    def environment(self) -> dict[str, str]:
        """process.env as a mapping (the last of a name wins, as in runc)."""
        result: dict[str, str] = {}
        for entry in self.env:
            name, _, value = entry.partition("=")
            result[name] = value
        return result

    def capability_names(self) -> list[str]:
        """The bounding set, as contextd.capabilities names (no CAP_ prefix)."""
        bounding = (self.capabilities or Capabilities()).bounding
        return [name.removeprefix("CAP_") for name in bounding]


class Root(msgspec.Struct):
    path: str
    readonly: bool = False


class Mount(msgspec.Struct):
    destination: str
    type: str = "bind"
    source: str = ""
    options: list[str] = msgspec.field(default_factory=list)


class Namespace(msgspec.Struct):
    type: str
    path: str = ""


class Memory(msgspec.Struct):
    limit: int | None = None


class Pids(msgspec.Struct):
    limit: int | None = None


class Cpu(msgspec.Struct):
    shares: int | None = None
    quota: int | None = None
    period: int | None = None


class Resources(msgspec.Struct):
    memory: Memory | None = None
    pids: Pids | None = None
    cpu: Cpu | None = None


class Linux(msgspec.Struct, rename="camel"):
    namespaces: list[Namespace] = msgspec.field(default_factory=list)
    uid_mappings: list[dict[str, int]] = msgspec.field(default_factory=list)
    gid_mappings: list[dict[str, int]] = msgspec.field(default_factory=list)
    devices: list[dict[str, object]] = msgspec.field(default_factory=list)
    sysctl: dict[str, str] = msgspec.field(default_factory=dict)
    resources: Resources | None = None
    cgroups_path: str = ""
    masked_paths: list[str] = msgspec.field(default_factory=list)
    readonly_paths: list[str] = msgspec.field(default_factory=list)


class Spec(msgspec.Struct, rename="camel"):
    oci_version: str
    process: Process
    root: Root
    hostname: str = ""
    mounts: list[Mount] = msgspec.field(default_factory=list)
    hooks: dict[str, object] = msgspec.field(default_factory=dict)
    annotations: dict[str, str] = msgspec.field(default_factory=dict)
    linux: Linux = msgspec.field(default_factory=Linux)

    def namespace_path(self, kind: str) -> str | None:
        """The path of a namespace to join, "" for a new one, None if not asked for."""
        for namespace in self.linux.namespaces:
            if namespace.type == kind:
                return namespace.path
        return None


# Namespaces the container always has: those of these the spec leaves out would be
# the host's own. network may be joined by path (the engine's); the others are new.
REQUIRED_NAMESPACES = ("pid", "mount", "ipc", "uts", "network")
KNOWN_NAMESPACES = (*REQUIRED_NAMESPACES, "cgroup")
# Sysctls a container may set: those its own IPC and network namespaces own.
_SYSCTL = re.compile(
    r"(net\.[a-z0-9_.\-]+|kernel\.(shm[a-z_]+|msg[a-z_]+|sem)|fs\.mqueue\.[a-z_]+)"
)
MOUNT_TYPES = ("proc", "sysfs", "tmpfs", "devpts", "mqueue", "cgroup", "bind")


def load(bundle: Path) -> Spec:
    """The bundle's config.json, checked (check); SpecError if unreadable or refused."""
    spec = _decode(bundle / "config.json", Spec)
    check(spec)
    return spec


def load_process(path: Path) -> Process:
    """A process.json (what `exec --process` runs); SpecError if unreadable."""
    return _decode(path, Process)


def _decode(path: Path, kind: type[_T]) -> _T:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise SpecError(f"{path}: {e.strerror}") from None
    try:
        return msgspec.json.decode(raw, type=kind)
    except (msgspec.ValidationError, msgspec.DecodeError) as e:
        raise SpecError(f"{path}: {e}") from None


def check(spec: Spec) -> None:
    """Refuse what contextd does not honour (see the module docstring)."""
    if not spec.process.args:
        raise SpecError("process.args is empty: nothing to run")
    if spec.process.apparmor_profile or spec.process.selinux_label:
        raise SpecError("AppArmor profiles and SELinux labels are not supported")
    unknown = [c for c in spec.process.capability_names() if c not in CAPABILITIES]
    if unknown:
        raise SpecError(f"unknown capabilities: {', '.join(unknown)}")
    if spec.hooks and any(spec.hooks.values()):
        raise SpecError("hooks are not supported")
    kinds = [n.type for n in spec.linux.namespaces]
    if "user" in kinds or spec.linux.uid_mappings or spec.linux.gid_mappings:
        raise SpecError("user namespaces are not supported (contextd-oci runs rootful engines)")
    for kind in kinds:
        if kind not in KNOWN_NAMESPACES:
            raise SpecError(f"namespace {kind!r} is not supported")
    for kind in REQUIRED_NAMESPACES:
        if kind not in kinds:
            raise SpecError(f"the host's {kind} namespace is not shared with containers")
        path = spec.namespace_path(kind)
        if path and kind != "network":
            raise SpecError(f"joining a {kind} namespace by path is not supported")
    if spec.linux.devices:
        raise SpecError("devices: extra device nodes are not supported")
    for key in spec.linux.sysctl:
        if not _SYSCTL.fullmatch(key) or ".." in key:
            raise SpecError(f"sysctl {key!r} is not the container's own to set")
    for mount in spec.mounts:
        kind = "bind" if "bind" in mount.options or "rbind" in mount.options else mount.type
        if kind not in MOUNT_TYPES:
            raise SpecError(f"mount of type {mount.type!r} on {mount.destination} is not supported")
        if not mount.destination.startswith("/"):
            raise SpecError(f"mount destination {mount.destination!r} is not absolute")
    for path in [*spec.linux.masked_paths, *spec.linux.readonly_paths, spec.process.cwd]:
        if not path.startswith("/"):
            raise SpecError(f"{path!r} is not an absolute path")


def default_spec() -> str:
    """What `contextd-oci spec` writes: a minimal config.json contextd honours."""
    spec = {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": True,
            "user": {"uid": 0, "gid": 0},
            "args": ["sh"],
            "env": [f"PATH={PATH}", "TERM=xterm"],
            "cwd": "/",
            "capabilities": {
                key: ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]
                for key in ("bounding", "effective", "permitted")
            },
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
        },
        "root": {"path": "rootfs", "readonly": True},
        "hostname": "contextd",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {
                "destination": "/dev",
                "type": "tmpfs",
                "source": "tmpfs",
                "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
            },
            {
                "destination": "/dev/pts",
                "type": "devpts",
                "source": "devpts",
                "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"],
            },
            {
                "destination": "/sys",
                "type": "sysfs",
                "source": "sysfs",
                "options": ["nosuid", "noexec", "nodev", "ro"],
            },
        ],
        "linux": {
            "namespaces": [{"type": t} for t in ("pid", "network", "ipc", "uts", "mount")],
            "maskedPaths": ["/proc/kcore", "/proc/keys", "/sys/firmware"],
            "readonlyPaths": ["/proc/sys", "/proc/sysrq-trigger"],
        },
    }
    return json.dumps(spec, indent=2)
