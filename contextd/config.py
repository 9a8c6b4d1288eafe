"""Guest configuration: one TOML file per guest, validated before anything starts.

``/etc/contextd/NAME.toml`` (the directory is overridable)::

    name = "web1"                 # defaults to the file's name
    xid = 101                     # unique among guests
    root = "/var/lib/cowfs/guests/web1"
    hostname = "web1"
    init = "plain"                # the guest's /sbin/init as PID 1, or a command list
    environment = { TERM = "xterm" }
    stop_signal = "auto"          # or a signal: "SIGRTMIN+3", "SIGINT", 15 ...
    stop_timeout = 5.0            # then SIGKILL to every process of the guest
    boot_check = 0.5              # seconds start watches init: an end within is a failed start
    restart = "no"                # "on-failure": after a fault; "always": after any end but a halt
    restart_delay = 1.0           # seconds before an automatic restart, doubled each time (max 60)
    restart_limit = 5             # automatic restarts within restart_interval; then it stays failed
    restart_interval = 60.0
    capabilities = ["CHOWN", ...] # kept; all others dropped (default: the mode's set)
    autostart = false
    passthrough = true            # shared files read from the shared inode: one page cache
    fuse_server = "own"           # "shared": one cowfs process serves every such guest's root

    [security]
    userns = true                 # a user namespace of its own (false: guest root is host root)
    id_base = 7667712             # host id of its id 0 (default (xid + 16) * 65536)

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

The Structs below are the file's schema: msgspec checks each key's type and range and
refuses unknown keys. Values the project reads its own way (sizes, signals, capability
names, init, environment, IP interfaces) are classes with a ``from_toml`` that msgspec
calls for them. A bad file gets one line, ``FILE: KEY: PROBLEM``. Files are written
with tomli-w, which escapes every control character and quotes keys where TOML needs it.
"""

from __future__ import annotations

import ipaddress
import itertools
import os
import re
import signal
import tomllib
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeAlias

import msgspec
import tomli_w

from contextd.capabilities import CAPABILITIES, DEFAULT_KEEP, USERNS_KEEP
from cowfs.atomicfile import write_atomically
from cowfs.errors import CowfsError
from cowfs.units import parse_size


class ConfigError(CowfsError):
    """A guest configuration that cannot be used; the message names file and key."""


class _Problem(ValueError):
    """What is wrong with a value, from a from_toml or a __post_init__ (msgspec adds where);
    key: the part of that value at fault (an environment variable, one of net's keys)."""

    def __init__(self, problem: str, key: str | None = None) -> None:
        super().__init__(problem)
        self.key = key


def _fail(path: Path, key: str, problem: str) -> ConfigError:
    """PATH: KEY: PROBLEM, on one line even if a key of the file's has a newline."""
    return ConfigError(f"{path}: {key if key.isprintable() else repr(key)}: {problem}")


# Texts checked by a pattern; \Z, not $, which would let a trailing newline through.
_GUEST_NAME = r"^[a-z0-9][a-z0-9_.-]{0,62}\Z"
_HOST_NAME = r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9-]{1,63})*\Z"
_INTERFACE_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,14}\Z"
_ABSOLUTE_PATH = r"^/[^\x00]*\Z"
_NET_MODE = r"^(host|isolated)\Z"

_NAME_RULE = (
    "{!r}: use lower-case letters, digits, '.', '_' and '-' (at most 63, first a letter or digit)"
)
# What a value that does not match each pattern is told ({!r}: the value).
_PATTERN_PROBLEMS = {
    _GUEST_NAME: _NAME_RULE,
    _HOST_NAME: "{!r} is not a valid host name",
    _INTERFACE_NAME: "{!r} is not an interface name",
    _ABSOLUTE_PATH: "{!r} is not an absolute path",
    _NET_MODE: '{!r}: expected "host" or "isolated"',
}

GuestName = Annotated[str, msgspec.Meta(pattern=_GUEST_NAME)]
HostName = Annotated[str, msgspec.Meta(pattern=_HOST_NAME)]
# When contextd starts a guest again by itself (contextd.restarts).
RestartPolicy = Literal["no", "on-failure", "always"]
_ENUMS = {"restart": typing.get_args(RestartPolicy)}  # for the one-line refusal
InterfaceName = Annotated[str, msgspec.Meta(pattern=_INTERFACE_NAME)]
AbsolutePath = Annotated[str, msgspec.Meta(pattern=_ABSOLUTE_PATH)]
NetMode = Annotated[str, msgspec.Meta(pattern=_NET_MODE)]
Positive = Annotated[int, msgspec.Meta(gt=0)]

# Keys that have no default, and what to give.
_REQUIRED = {"xid": "a unique number from 2 to 65535", "root": "the guest's backing tree"}


def _without_nul(text: str, key: str | None = None) -> str:
    if "\0" in text:
        raise _Problem(f"{text!r} contains a NUL character, which no program can be given", key)
    return text


class Size(int):
    """Bytes: a positive integer, or a number with K, M, G or T ("256M")."""

    @classmethod
    def from_toml(cls, value: object) -> Size:
        if isinstance(value, str):
            try:
                value = parse_size(value, "size")
            except CowfsError:
                raise _Problem(f"{value!r} is not a size (a number with K, M, G or T)") from None
        elif not isinstance(value, int) or isinstance(value, bool):
            raise _Problem(f"expected a size, got {value!r}")
        if value <= 0:
            raise _Problem("must be positive")
        return cls(value)


class Signal(int):
    """A signal by name ("SIGTERM", "term", "SIGRTMIN+3") or number; 0 is "auto"."""

    @classmethod
    def from_toml(cls, value: object) -> Signal:
        if isinstance(value, int) and not isinstance(value, bool) and 0 < value < signal.NSIG:
            return cls(value)
        if isinstance(value, str):
            if value == "auto":
                return AUTO_SIGNAL
            name = value.upper()
            name = name if name.startswith("SIG") else "SIG" + name
            if name in signal.Signals.__members__:
                return cls(signal.Signals[name])
            base, plus, offset = name.partition("+")
            if base == "SIGRTMIN" and plus and offset.isdigit():
                number = signal.SIGRTMIN + int(offset)
                if number <= signal.SIGRTMAX:
                    return cls(number)
        raise _Problem(f"{value!r} is not a signal")


# stop_signal "auto": chosen by the guest's init (contextd.runtime.stop_signal_for).
AUTO_SIGNAL = Signal(0)


def _signal_text(number: int) -> str | int:
    """A signal as the file names it: by name if it has one."""
    if number == AUTO_SIGNAL:
        return "auto"
    if signal.SIGRTMIN < number <= signal.SIGRTMAX:
        return f"SIGRTMIN+{number - signal.SIGRTMIN}"
    try:
        return signal.Signals(number).name
    except ValueError:
        return number


class Capability(str):
    """A capability's name, upper case and without CAP_ ("cap_chown" is "CHOWN")."""

    @classmethod
    def from_toml(cls, value: object) -> Capability:
        name = value.upper().removeprefix("CAP_") if isinstance(value, str) else None
        if name not in CAPABILITIES:
            raise _Problem(f"{value!r} is not a capability")
        return cls(name)


PLAIN_INIT = ("/sbin/init",)


class Command(list[str]):
    """A program (an absolute path) and its arguments; "plain" is the guest's /sbin/init."""

    @classmethod
    def from_toml(cls, value: object) -> Command:
        if value == "plain":
            return cls(PLAIN_INIT)
        if isinstance(value, str):
            raise _Problem('expected "plain" or a command as a list of strings')
        arguments = value if isinstance(value, list) else []
        if not arguments or not all(isinstance(a, str) and a for a in arguments):
            raise _Problem("expected a non-empty list of strings")
        if not arguments[0].startswith("/"):
            raise _Problem(f"{arguments[0]!r}: the program must be an absolute path")
        return cls(_without_nul(argument) for argument in arguments)


class Environment(dict[str, str]):
    """Variables for the guest's init: NAME = "value", a name without '='."""

    @classmethod
    def from_toml(cls, value: object) -> Environment:
        if not isinstance(value, dict):
            raise _Problem(f"expected a table, got {value!r}")
        for name, text in value.items():
            if not isinstance(text, str) or "=" in name or not name:
                raise _Problem('expected NAME = "value" strings', name)
            _without_nul(name, name)
            _without_nul(text, name)
        return cls(value)


Interface: TypeAlias = ipaddress.IPv4Interface | ipaddress.IPv6Interface

DEFAULT_BRIDGE = "ctx0"
DEFAULT_BRIDGE_ADDRESSES = ("10.77.0.1/24", "fd00:77::1/64")


def _interface(value: object) -> Interface:
    if not isinstance(value, str):
        raise _Problem(f"expected addresses as strings, got {value!r}")
    try:
        return ipaddress.ip_interface(value)
    except ValueError:
        raise _Problem(f"{value!r} is not an IPv4 or IPv6 address") from None


def _bridge_address(value: object) -> Interface:
    address = _interface(value)
    if "/" not in str(value):
        raise _Problem(f"{value!r}: give the prefix length")
    return address


def _guest_address(value: object) -> Interface:
    """A guest's address as given; the longest prefix length (/32, /128) stands for none
    until it takes its bridge's, so it cannot be given."""
    address = _interface(value)
    if "/" in str(value) and address.network.prefixlen == address.max_prefixlen:
        raise _Problem(f"{value!r}: give the bridge's prefix length, or none")
    return address


if TYPE_CHECKING:
    BridgeAddress: TypeAlias = Interface
    GuestAddress: TypeAlias = Interface
else:
    # msgspec decodes into no union of two classes it does not know: each kind of
    # address is one class whose instances are IPv4Interface and IPv6Interface objects.
    class _AnInterface(type):
        def __instancecheck__(cls, value: object) -> bool:
            return isinstance(value, ipaddress.IPv4Interface | ipaddress.IPv6Interface)

    class BridgeAddress(metaclass=_AnInterface):
        from_toml = staticmethod(_bridge_address)

    class GuestAddress(metaclass=_AnInterface):
        from_toml = staticmethod(_guest_address)


def _shown(address: Interface) -> str:
    """An address as the user gave it: without a prefix length if it had none."""
    return str(address.ip) if address.network.prefixlen == address.max_prefixlen else str(address)


class Limits(msgspec.Struct, forbid_unknown_fields=True):
    """Resource limits of a guest's cgroup, and disk limits handed to cowfs."""

    memory: Size | None = None
    cpu_weight: Annotated[int, msgspec.Meta(ge=1, le=10000)] | None = None
    cpu_quota: Annotated[float, msgspec.Meta(gt=0)] | None = None
    pids: Positive | None = None
    disk_space: Size | None = None
    disk_inodes: Positive | None = None


class NetConfig(msgspec.Struct, forbid_unknown_fields=True):
    """A guest's network: the host's stack, or its own namespace on a host bridge."""

    mode: NetMode = "host"
    bridge: InterfaceName = DEFAULT_BRIDGE
    bridge_addresses: list[BridgeAddress] = msgspec.field(
        default_factory=lambda: [ipaddress.ip_interface(a) for a in DEFAULT_BRIDGE_ADDRESSES]
    )
    addresses: list[GuestAddress] = msgspec.field(default_factory=list)

    def __post_init__(self) -> None:
        versions: set[int] = set()
        for bridge_address in self.bridge_addresses:
            if bridge_address.version in versions:
                problem = f"{str(bridge_address)!r}: one address per IP version"
                raise _Problem(problem, "bridge_addresses")
            versions.add(bridge_address.version)
        self.addresses = _in_bridge_subnets(self, self.addresses)
        if self.addresses and self.mode != "isolated":
            raise _Problem('a guest\'s own addresses need mode = "isolated"', "addresses")

    def gateway(self, address: Interface) -> Interface:
        """The bridge's address in the same subnet as one of the guest's."""
        return next(b for b in self.bridge_addresses if address in b.network)


def _in_bridge_subnets(net: NetConfig, given: list[Interface]) -> list[Interface]:
    """A guest's addresses, each checked against the bridge's subnet, whose prefix it takes."""
    addresses: list[Interface] = []
    for address in given:
        text = _shown(address)
        subnet = next((b for b in net.bridge_addresses if b.version == address.version), None)
        if subnet is None:
            raise _Problem(f"{text!r}: the bridge has no IPv{address.version} address", "addresses")
        prefix = address.network.prefixlen
        if address.ip not in subnet.network or prefix not in (
            address.max_prefixlen,
            subnet.network.prefixlen,
        ):
            raise _Problem(f"{text!r} is outside the bridge's subnet {subnet.network}", "addresses")
        if address.ip == subnet.ip:
            raise _Problem(f"{text!r} is the bridge's own address", "addresses")
        if address.version == 4 and address.ip in (
            subnet.network.network_address,
            subnet.network.broadcast_address,
        ):
            raise _Problem(f"{text!r} is the subnet's network or broadcast address", "addresses")
        resolved = ipaddress.ip_interface(f"{address.ip}/{subnet.network.prefixlen}")
        if resolved in addresses:
            raise _Problem(f"{text!r} is given twice", "addresses")
        addresses.append(resolved)
    return addresses


ID_RANGE = 65536  # ids a user-namespaced guest has: 0..65535 inside
# Not given in the file: the kept set of the guest's mode (replaced in __post_init__).
_MODE_DEFAULT = Capability("default of the mode")
_FIRST_RANGE = 16  # ranges below 16 * 65536 (1048576) are left to the host's own ids


class Security(msgspec.Struct, forbid_unknown_fields=True):
    """How much of the host a guest's root is (docs/contextd.md, "Security model").

    userns (the default): the guest gets a user namespace of its own, its ids
    0..65535 being host ids id_base..id_base+65535, so that its root is an
    unprivileged id on the host; cowfs maps those ids back to the backing tree's
    own. Otherwise (false) guest root is host root with a reduced capability
    set (Linux-VServer's way, less isolated).
    id_base: by default (xid + 16) * 65536, so that guests' ranges, like their
    xids, never overlap, and none overlaps the host's ids below 1048576.
    """

    userns: bool = True
    id_base: Annotated[int, msgspec.Meta(ge=_FIRST_RANGE * ID_RANGE)] | None = None


class GuestConfig(msgspec.Struct, forbid_unknown_fields=True):
    """Everything contextd needs to run one guest."""

    name: GuestName
    xid: Annotated[int, msgspec.Meta(ge=2, le=65535)]
    root: AbsolutePath
    path: Path  # the file's, not in it
    hostname: HostName = ""
    init: Command = msgspec.field(default_factory=lambda: Command(PLAIN_INIT))
    environment: Environment = msgspec.field(default_factory=Environment)
    stop_signal: Signal = AUTO_SIGNAL
    stop_timeout: Annotated[float, msgspec.Meta(ge=0)] = 5.0
    boot_check: Annotated[float, msgspec.Meta(ge=0)] = 0.5
    restart: RestartPolicy = "no"
    restart_delay: Annotated[float, msgspec.Meta(ge=0, le=3600)] = 1.0
    restart_limit: Annotated[int, msgspec.Meta(ge=0)] = 5
    restart_interval: Annotated[float, msgspec.Meta(gt=0)] = 60.0
    capabilities: list[Capability] = msgspec.field(default_factory=lambda: [_MODE_DEFAULT])
    autostart: bool = False
    # Read-only opens of shared files served by the kernel from the shared inode (one
    # page cache for every guest sharing it); cowfs(8) PAGE CACHE AND PASSTHROUGH.
    passthrough: bool = True
    # "own": the guest's root has a cowfs FUSE server of its own, in the guest's cgroup
    # (its CPU and memory are the guest's). "shared": one server serves the roots of
    # every guest so configured (cowfs.serve.host): ~8 MiB less per idle guest, but
    # that work is no guest's, and one guest's heavy file work slows the others'.
    fuse_server: Literal["own", "shared"] = "own"
    limits: Limits = msgspec.field(default_factory=Limits)
    net: NetConfig = msgspec.field(default_factory=NetConfig)
    security: Security = msgspec.field(default_factory=Security)

    def __post_init__(self) -> None:
        self.root = os.path.normpath(self.root)
        if self.capabilities == [_MODE_DEFAULT]:
            kept = USERNS_KEEP if self.security.userns else DEFAULT_KEEP
            self.capabilities = [Capability(c) for c in kept]
        if self.security.userns:
            base = self.id_base()
            if base + ID_RANGE > 2**32 - 1:
                raise _Problem(
                    f"xid {self.xid} leaves no room for a user namespace's ids:"
                    " give [security] id_base",
                    "security",
                )

    def id_base(self) -> int:
        """The host id of the guest's id 0 (user namespaces only)."""
        given = self.security.id_base
        return given if given is not None else (self.xid + _FIRST_RANGE) * ID_RANGE

    def idmap(self) -> dict[str, int] | None:
        """{"base": ..., "count": ...} if the guest has a user namespace, else None."""
        return {"base": self.id_base(), "count": ID_RANGE} if self.security.userns else None


def config_dir() -> Path:
    """Where guest configurations live (CONTEXTD_CONFIG_DIR overrides /etc/contextd)."""
    return Path(os.environ.get("CONTEXTD_CONFIG_DIR", "/etc/contextd"))


def check_name(name: object) -> str:
    """name, if it can name a guest (it becomes a file, a directory and a cgroup name)."""
    if not isinstance(name, str) or not re.match(_GUEST_NAME, name):
        raise ConfigError(f"bad guest name {_NAME_RULE.format(name)}")
    return name


def _decode(kind: type, value: object) -> object:
    """msgspec's dec_hook: the project's own types decode themselves."""
    if isinstance(value, kind):  # the file's path, given with the file's contents
        return value
    from_toml = getattr(kind, "from_toml", None)
    if from_toml is None:
        raise NotImplementedError(f"no decoder for {kind}")
    return from_toml(value)


def parse(path: Path) -> GuestConfig:
    """Read and validate one guest configuration file."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"{path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    if "path" in data:
        raise _fail(path, "path", "unknown key")
    data = {"name": path.stem, **data}
    data.setdefault("hostname", data["name"])
    try:
        return msgspec.convert({**data, "path": path}, GuestConfig, dec_hook=_decode)
    except msgspec.ValidationError as e:
        raise _refusal(path, data, e) from None


_KINDS = {
    "int": "an integer",
    "float": "a number",
    "str": "a string",
    "bool": "true or false",
    "array": "a list",
    "object": "a table",
}


# Where msgspec says the value is: the schema's keys and list indexes, at the end.
_WHERE = re.compile(r"(.*) - at `\$((?:\.\w+|\[\d+\])*)`", re.S)


def _refusal(path: Path, data: dict[str, Any], error: msgspec.ValidationError) -> ConfigError:
    """msgspec's "Expected `int`, got `str` - at `$.xid`" as "PATH: xid: expected an
    integer, got 'many'": the key dotted, the value as the file gave it."""
    said = str(error)
    where = _WHERE.fullmatch(said)
    message = where[1] if where else said
    steps: list[tuple[str, str]] = re.findall(r"\.(\w+)|\[(\d+)\]", where[2] if where else "")
    keys = [name for name, _ in steps if name]
    value: Any = data
    try:
        for name, index in steps:
            value = value[name] if name else value[int(index)]
    except (LookupError, TypeError):  # a key of the file's own that looks like a place
        value = None
    if match := re.fullmatch(r"Object contains unknown field `(.*)`", message, re.S):
        return _fail(path, ".".join([*keys, match[1]]), "unknown key")
    if match := re.fullmatch(r"Invalid enum value (.*)", message, re.S):
        allowed = ", ".join(repr(v) for v in _ENUMS.get(".".join(keys), ()))
        return _fail(path, ".".join(keys), f"{match[1]} is not one of {allowed}")
    if match := re.fullmatch(r"Object missing required field `(.*)`", message, re.S):
        key = ".".join([*keys, match[1]])
        return _fail(path, key, f"missing ({_REQUIRED[key]})" if key in _REQUIRED else "missing")
    problems = {f"Expected `str` matching regex {p!r}": t for p, t in _PATTERN_PROBLEMS.items()}
    if message in problems:
        problem = problems[message].format(value)
    elif match := re.fullmatch(r"Expected `([^`]*)`(.*?)(?:, got `[^`]*`)?", message, re.S):
        kinds = " or ".join(_KINDS.get(k, k) for k in match[1].split(" | ") if k != "null")
        problem = f"expected {kinds}{match[2]}, got {value!r}"
    else:  # the project's own words, from a from_toml or a __post_init__
        problem = message
        if isinstance(error.__cause__, _Problem) and error.__cause__.key is not None:
            keys.append(error.__cause__.key)
    return _fail(path, ".".join(keys), problem)


def guest_addresses(net: NetConfig, texts: list[object], path: Path) -> list[Interface]:
    """A guest's addresses, each checked against the bridge's subnet, whose prefix it takes."""
    try:
        return _in_bridge_subnets(net, [_guest_address(text) for text in texts])
    except _Problem as e:
        raise _fail(path, "net.addresses", str(e)) from None


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
    check_id_ranges(configs)
    return configs


def check_id_ranges(configs: dict[str, GuestConfig]) -> None:
    """No two user-namespaced guests share a host id."""
    ranges = sorted(
        ((c.id_base(), c) for c in configs.values() if c.security.userns), key=lambda r: r[0]
    )
    for (base, config), (next_base, other) in itertools.pairwise(ranges):
        if base + ID_RANGE > next_base:
            raise _fail(
                other.path,
                "security.id_base",
                f"host ids {next_base}.. overlap guest {config.name}'s ({base}..)",
            )


def write(config: GuestConfig) -> None:
    """Write a guest's configuration file (atomically), as parse() reads it."""
    write_atomically(config.path, tomli_w.dumps(_file_contents(config)), durable=True)


def _file_contents(config: GuestConfig) -> dict[str, Any]:
    data: dict[str, Any] = {
        "name": config.name,
        "xid": config.xid,
        "root": config.root,
        "hostname": config.hostname,
        "init": "plain" if tuple(config.init) == PLAIN_INIT else list(config.init),
        "stop_signal": _signal_text(config.stop_signal),
        "stop_timeout": float(config.stop_timeout),
        "boot_check": float(config.boot_check),
        "restart": config.restart,
        "restart_delay": float(config.restart_delay),
        "restart_limit": config.restart_limit,
        "restart_interval": float(config.restart_interval),
        "capabilities": list(config.capabilities),
        "autostart": config.autostart,
        "passthrough": config.passthrough,
        "fuse_server": config.fuse_server,
    }
    data["security"] = {"userns": config.security.userns}
    if config.security.userns and config.security.id_base is not None:
        data["security"]["id_base"] = config.security.id_base
    if config.environment:
        data["environment"] = dict(config.environment)
    limits = {k: v for k, v in msgspec.structs.asdict(config.limits).items() if v is not None}
    if limits:
        data["limits"] = limits
    net = config.net
    data["net"] = {"mode": net.mode}
    if net.mode == "isolated":
        data["net"] |= {
            "bridge": net.bridge,
            "bridge_addresses": [str(a) for a in net.bridge_addresses],
            "addresses": [str(a.ip) for a in net.addresses],
        }
    return data
