"""Guest configuration: one TOML file per guest, validated before anything starts.

``/etc/contextd/NAME.toml`` (the directory is overridable)::

    name = "web1"                 # defaults to the file's name
    xid = 101                     # unique among guests
    root = "/var/lib/cowfs/guests/web1"
    hostname = "web1"
    init = "plain"                # the guest's /sbin/init as PID 1, or a command list
    environment = { TERM = "xterm" }
    stop_signal = "SIGTERM"
    stop_timeout = 5.0            # then SIGKILL to every process of the guest
    capabilities = ["CHOWN", ...] # kept; all others dropped (default: util-vserver's set)
    autostart = false

    [limits]
    memory = "256M"               # cgroup memory limit
    cpu_weight = 100              # relative CPU share (cgroup v1 cpu.shares = weight * 1024 / 100)
    cpu_quota = 0.5               # CPUs' worth of time (cfs quota/period)
    pids = 200                    # processes and threads
    disk_space = "1G"             # passed to cowfs (cowfs limit)
    disk_inodes = 100000

    [net]
    mode = "isolated"             # "host": the host's network stack (plain Linux-VServer)
    bridge = "ctx0"               # the host bridge the guest's veth is a port of
    bridge_addresses = ["10.77.0.1/24", "fd00:77::1/64"]  # the bridge's (the guests' gateway)
    addresses = ["10.77.0.11", "fd00:77::11"]            # the guest's, in the bridge's subnets

A bad file gets an error naming the file, the key and what is wrong.
"""

from __future__ import annotations

import ipaddress
import os
import re
import signal
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from contextd.capabilities import CAPABILITIES, DEFAULT_KEEP
from cowfs.errors import CowfsError
from cowfs.units import parse_size

_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")
_IFNAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,14}$")
_HOSTNAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9-]{1,63})*$")


class ConfigError(CowfsError):
    """A guest configuration that cannot be used; the message names file and key."""


@dataclass
class Limits:
    """Resource limits of a guest's cgroup, and disk limits handed to cowfs."""

    memory: int | None = None
    cpu_weight: int | None = None
    cpu_quota: float | None = None
    pids: int | None = None
    disk_space: int | None = None
    disk_inodes: int | None = None


Interface = ipaddress.IPv4Interface | ipaddress.IPv6Interface

DEFAULT_BRIDGE = "ctx0"
DEFAULT_BRIDGE_ADDRESSES = ("10.77.0.1/24", "fd00:77::1/64")


@dataclass
class NetConfig:
    """A guest's network: the host's stack, or its own namespace on a host bridge."""

    mode: str = "host"
    bridge: str = DEFAULT_BRIDGE
    bridge_addresses: list[Interface] = field(
        default_factory=lambda: [ipaddress.ip_interface(a) for a in DEFAULT_BRIDGE_ADDRESSES]
    )
    addresses: list[Interface] = field(default_factory=list)

    def gateway(self, address: Interface) -> Interface:
        """The bridge's address in the same subnet as one of the guest's."""
        return next(b for b in self.bridge_addresses if address in b.network)


@dataclass
class GuestConfig:
    """Everything contextd needs to run one guest."""

    name: str
    xid: int
    root: str
    path: Path
    hostname: str = ""
    init: list[str] = field(default_factory=lambda: ["/sbin/init"])
    environment: dict[str, str] = field(default_factory=dict)
    stop_signal: int = signal.SIGTERM
    stop_timeout: float = 5.0
    capabilities: list[str] = field(default_factory=lambda: list(DEFAULT_KEEP))
    autostart: bool = False
    limits: Limits = field(default_factory=Limits)
    net: NetConfig = field(default_factory=NetConfig)


def config_dir() -> Path:
    """Where guest configurations live (CONTEXTD_CONFIG_DIR overrides /etc/contextd)."""
    return Path(os.environ.get("CONTEXTD_CONFIG_DIR", "/etc/contextd"))


def _fail(path: Path, key: str, problem: str) -> ConfigError:
    return ConfigError(f"{path}: {key}: {problem}")


def _take(
    data: dict[str, object], key: str, kind: type | tuple[type, ...], path: Path, prefix: str = ""
) -> object:
    value = data.pop(key)
    if (
        isinstance(value, bool)
        and kind is not bool
        and bool not in (kind if isinstance(kind, tuple) else (kind,))
    ):
        raise _fail(path, prefix + key, f"expected {_kind_name(kind)}, got {value!r}")
    if not isinstance(value, kind):
        raise _fail(path, prefix + key, f"expected {_kind_name(kind)}, got {value!r}")
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {
        str: "a string",
        int: "an integer",
        float: "a number",
        bool: "true or false",
        list: "a list",
        dict: "a table",
    }
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _size(value: object, path: Path, key: str) -> int:
    if isinstance(value, bool):
        raise _fail(path, key, f"expected a size, got {value!r}")
    if isinstance(value, int):
        if value <= 0:
            raise _fail(path, key, "must be positive")
        return value
    if isinstance(value, str):
        try:
            return parse_size(value, key)
        except CowfsError:
            raise _fail(
                path, key, f"{value!r} is not a size (a number with K, M, G or T)"
            ) from None
    raise _fail(path, key, f"expected a size, got {value!r}")


def _signal(value: object, path: Path, key: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value < signal.NSIG:
        return value
    if isinstance(value, str):
        name = value.upper()
        name = name if name.startswith("SIG") else "SIG" + name
        number = getattr(signal.Signals, name, None) if name in signal.Signals.__members__ else None
        if number is not None:
            return int(number)
    raise _fail(path, key, f"{value!r} is not a signal")


_NAME_RULE = (
    "{name!r}: use lower-case letters, digits, '.', '_' and '-' (at most 63, first a letter"
    " or digit)"
)


def check_name(name: object) -> str:
    """name, if it can name a guest (it becomes a file, a directory and a cgroup name)."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(f"bad guest name {_NAME_RULE.format(name=name)}")
    return name


def parse(path: Path) -> GuestConfig:
    """Read and validate one guest configuration file."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"{path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    name = str(_take(data, "name", str, path)) if "name" in data else path.stem
    if not _NAME.match(name):
        raise _fail(path, "name", _NAME_RULE.format(name=name))
    if "xid" not in data:
        raise _fail(path, "xid", "missing (a unique number from 2 to 65535)")
    xid = _take(data, "xid", int, path)
    assert isinstance(xid, int)
    if not 2 <= xid <= 65535:
        raise _fail(path, "xid", f"{xid} is not from 2 to 65535")
    if "root" not in data:
        raise _fail(path, "root", "missing (the guest's backing tree)")
    root = str(_take(data, "root", str, path))
    if not os.path.isabs(root):
        raise _fail(path, "root", f"{root!r} is not an absolute path")
    config = GuestConfig(name=name, xid=xid, root=os.path.normpath(root), path=path)
    config.hostname = str(_take(data, "hostname", str, path)) if "hostname" in data else name
    if not _HOSTNAME.match(config.hostname):
        raise _fail(path, "hostname", f"{config.hostname!r} is not a valid host name")
    if "init" in data:
        init = _take(data, "init", (str, list), path)
        if init == "plain":
            config.init = ["/sbin/init"]
        elif isinstance(init, str):
            raise _fail(path, "init", 'expected "plain" or a command as a list of strings')
        else:
            assert isinstance(init, list)
            if not init or not all(isinstance(a, str) and a for a in init):
                raise _fail(path, "init", "expected a non-empty list of strings")
            if not init[0].startswith("/"):
                raise _fail(path, "init", f"{init[0]!r}: the program must be an absolute path")
            config.init = list(init)
    if "environment" in data:
        env = _take(data, "environment", dict, path)
        assert isinstance(env, dict)
        for key, value in env.items():
            if not isinstance(value, str) or "=" in key or not key:
                raise _fail(path, f"environment.{key}", 'expected NAME = "value" strings')
        config.environment = dict(env)
    if "stop_signal" in data:
        config.stop_signal = _signal(data.pop("stop_signal"), path, "stop_signal")
    if "stop_timeout" in data:
        timeout = _take(data, "stop_timeout", (int, float), path)
        assert isinstance(timeout, (int, float))
        if timeout < 0:
            raise _fail(path, "stop_timeout", "must not be negative")
        config.stop_timeout = float(timeout)
    if "capabilities" in data:
        caps = _take(data, "capabilities", list, path)
        assert isinstance(caps, list)
        kept = []
        for cap in caps:
            name_ = str(cap).upper().removeprefix("CAP_")
            if name_ not in CAPABILITIES:
                raise _fail(path, "capabilities", f"{cap!r} is not a capability")
            kept.append(name_)
        config.capabilities = kept
    if "autostart" in data:
        config.autostart = bool(_take(data, "autostart", bool, path))
    if "limits" in data:
        config.limits = _limits(_take(data, "limits", dict, path), path)  # type: ignore[arg-type]
    if "net" in data:
        config.net = _net(_take(data, "net", dict, path), path)  # type: ignore[arg-type]
    if data:
        raise _fail(path, next(iter(data)), "unknown key")
    return config


def _limits(data: dict[str, object], path: Path) -> Limits:
    limits = Limits()
    for key in ("memory", "disk_space"):
        if key in data:
            setattr(limits, key, _size(data.pop(key), path, f"limits.{key}"))
    for key in ("pids", "disk_inodes", "cpu_weight"):
        if key in data:
            value = data.pop(key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise _fail(path, f"limits.{key}", f"expected a positive integer, got {value!r}")
            setattr(limits, key, value)
    if limits.cpu_weight is not None and not 1 <= limits.cpu_weight <= 10000:
        raise _fail(path, "limits.cpu_weight", "must be from 1 to 10000")
    if "cpu_quota" in data:
        value = data.pop("cpu_quota")
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            raise _fail(
                path, "limits.cpu_quota", f"expected a positive number of CPUs, got {value!r}"
            )
        limits.cpu_quota = float(value)
    if data:
        raise _fail(path, f"limits.{next(iter(data))}", "unknown key")
    return limits


def _net(data: dict[str, object], path: Path) -> NetConfig:
    net = NetConfig()
    net.mode = str(_take(data, "mode", str, path, "net.")) if "mode" in data else "host"
    if net.mode not in ("host", "isolated"):
        raise _fail(path, "net.mode", f'{net.mode!r}: expected "host" or "isolated"')
    if "bridge" in data:
        net.bridge = str(_take(data, "bridge", str, path, "net."))
        if not _IFNAME.match(net.bridge):
            raise _fail(path, "net.bridge", f"{net.bridge!r} is not an interface name")
    if "bridge_addresses" in data:
        given = _take(data, "bridge_addresses", list, path, "net.")
        assert isinstance(given, list)
        net.bridge_addresses = []
        for text in given:
            bridge_address = _interface(text, path, "net.bridge_addresses")
            if "/" not in str(text):
                raise _fail(path, "net.bridge_addresses", f"{text!r}: give the prefix length")
            if any(b.version == bridge_address.version for b in net.bridge_addresses):
                raise _fail(path, "net.bridge_addresses", f"{text!r}: one address per IP version")
            net.bridge_addresses.append(bridge_address)
    if "addresses" in data:
        given = _take(data, "addresses", list, path, "net.")
        assert isinstance(given, list)
        net.addresses = guest_addresses(net, given, path)
    if net.addresses and net.mode != "isolated":
        raise _fail(path, "net.addresses", 'a guest\'s own addresses need mode = "isolated"')
    if data:
        raise _fail(path, f"net.{next(iter(data))}", "unknown key")
    return net


def _interface(text: object, path: Path, key: str) -> Interface:
    if not isinstance(text, str):
        raise _fail(path, key, f"expected addresses as strings, got {text!r}")
    try:
        return ipaddress.ip_interface(text)
    except ValueError:
        raise _fail(path, key, f"{text!r} is not an IPv4 or IPv6 address") from None


def guest_addresses(net: NetConfig, texts: list[object], path: Path) -> list[Interface]:
    """A guest's addresses, each checked against the bridge's subnet, whose prefix it takes."""
    addresses: list[Interface] = []
    for text in texts:
        address = _guest_address(text, net, path)
        if address in addresses:
            raise _fail(path, "net.addresses", f"{text!r} is given twice")
        addresses.append(address)
    return addresses


def _guest_address(text: object, net: NetConfig, path: Path) -> Interface:
    key = "net.addresses"
    given = _interface(text, path, key)
    subnet = next((b for b in net.bridge_addresses if b.version == given.version), None)
    if subnet is None:
        raise _fail(path, key, f"{text!r}: the bridge has no IPv{given.version} address")
    if given.ip not in subnet.network or (
        "/" in str(text) and given.network.prefixlen != subnet.network.prefixlen
    ):
        raise _fail(path, key, f"{text!r} is outside the bridge's subnet {subnet.network}")
    if given.ip == subnet.ip:
        raise _fail(path, key, f"{text!r} is the bridge's own address")
    if given.version == 4 and given.ip in (
        subnet.network.network_address,
        subnet.network.broadcast_address,
    ):
        raise _fail(path, key, f"{text!r} is the subnet's network or broadcast address")
    return ipaddress.ip_interface(f"{given.ip}/{subnet.network.prefixlen}")


def check_networks(configs: dict[str, GuestConfig]) -> None:
    """Addresses unique among guests; guests on one bridge agree on its addresses."""
    owners: dict[object, GuestConfig] = {}
    bridges: dict[str, GuestConfig] = {}
    for config in configs.values():
        net = config.net
        if net.mode != "isolated":
            continue
        first = bridges.setdefault(net.bridge, config)
        if first.net.bridge_addresses != net.bridge_addresses:
            raise _fail(
                config.path,
                "net.bridge_addresses",
                f"differ from guest {first.name}'s for bridge {net.bridge}",
            )
        for other_bridge, other in bridges.items():
            if other_bridge == net.bridge:
                continue
            for mine in net.bridge_addresses:
                for theirs in other.net.bridge_addresses:
                    if mine.version == theirs.version and mine.network.overlaps(theirs.network):
                        raise _fail(
                            config.path,
                            "net.bridge_addresses",
                            f"{mine.network} overlaps bridge {other_bridge}'s {theirs.network}",
                        )
        for address in net.addresses:
            if address.ip in owners and owners[address.ip] is not config:
                raise _fail(
                    config.path,
                    "net.addresses",
                    f"{address.ip} is also guest {owners[address.ip].name}'s",
                )
            owners[address.ip] = config


def load_all(directory: Path | None = None) -> dict[str, GuestConfig]:
    """Every guest configuration, checked together (unique names and xids)."""
    directory = directory or config_dir()
    configs: dict[str, GuestConfig] = {}
    xids: dict[int, str] = {}
    if not directory.is_dir():
        return configs
    for path in sorted(directory.glob("*.toml")):
        config = parse(path)
        if config.name in configs:
            raise _fail(
                path, "name", f"{config.name!r} is also used by {configs[config.name].path}"
            )
        if config.xid in xids:
            raise _fail(path, "xid", f"{config.xid} is also used by guest {xids[config.xid]}")
        configs[config.name] = config
        xids[config.xid] = config.name
    check_networks(configs)
    return configs


def write(config: GuestConfig) -> None:
    """Write a guest's configuration file (atomically)."""
    lines = [
        f"name = {_quote(config.name)}",
        f"xid = {config.xid}",
        f"root = {_quote(config.root)}",
        f"hostname = {_quote(config.hostname)}",
        "init = "
        + (
            '"plain"'
            if config.init == ["/sbin/init"]
            else "[" + ", ".join(_quote(a) for a in config.init) + "]"
        ),
        f"stop_signal = {_quote(signal.Signals(config.stop_signal).name)}",
        f"stop_timeout = {config.stop_timeout}",
        "capabilities = [" + ", ".join(_quote(c) for c in config.capabilities) + "]",
        f"autostart = {'true' if config.autostart else 'false'}",
    ]
    if config.environment:
        lines.append(
            "environment = { "
            + ", ".join(f"{k} = {_quote(v)}" for k, v in config.environment.items())
            + " }"
        )
    limit_lines = [f"{k} = {v!r}" for k, v in vars(config.limits).items() if v is not None]
    if limit_lines:
        lines += ["", "[limits]", *limit_lines]
    net = config.net
    lines += ["", "[net]", f"mode = {_quote(net.mode)}"]
    if net.mode == "isolated":
        lines += [
            f"bridge = {_quote(net.bridge)}",
            "bridge_addresses = [" + ", ".join(_quote(str(a)) for a in net.bridge_addresses) + "]",
            "addresses = [" + ", ".join(_quote(str(a.ip)) for a in net.addresses) + "]",
        ]
    config.path.parent.mkdir(parents=True, exist_ok=True)
    tmp = config.path.with_suffix(".toml.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, config.path)


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
