"""Guest configuration files (contextd/config.py): every key read as documented, written
back unchanged whatever its strings hold, and every bad value refused in one line that
names the file and the key. Pure: no daemon, no root features."""

from __future__ import annotations

import ipaddress
import json
import signal
from pathlib import Path

import msgspec
import pytest
import tomli_w
from contextd_harness import Contextd

from contextd.config import (
    ConfigError,
    GuestConfig,
    NetConfig,
    check_name,
    guest_addresses,
    load_all,
    parse,
    write,
)

# Every key, none at its default; strings as a hand would write them (see docs/contextd.md).
FULL = r"""
name = "web1"
xid = 101
root = "/var/lib/cowfs/guests/web1/"
hostname = "www.example"
init = ["/bin/sh", "-c", "exec httpd"]
environment = { TERM = "xterm", LANG = "C.UTF-8" }
stop_signal = "hup"
stop_timeout = 2
restart = "on-failure"
restart_delay = 0.5
restart_limit = 3
restart_interval = 30
capabilities = ["cap_chown", "KILL"]
autostart = true
passthrough = false

[limits]
memory = "256M"
cpu_weight = 50
cpu_quota = 0.5
pids = 200
disk_space = "1.5G"
disk_inodes = 100000

[net]
mode = "isolated"
bridge = "br-test"
bridge_addresses = ["10.88.0.1/24", "fd00:88::1/64"]
addresses = ["10.88.0.11", "fd00:88::11/64"]
"""

MINIMAL = 'xid = 7\nroot = "/srv/g"\n'


def config_file(directory: Path, text: str, name: str = "guest") -> Path:
    path = directory / f"{name}.toml"
    path.write_text(text)
    return path


def test_every_key_is_read_as_documented(tmp_path: Path) -> None:
    config = parse(config_file(tmp_path, FULL))
    assert config.name == "web1"
    assert config.xid == 101
    assert config.root == "/var/lib/cowfs/guests/web1"
    assert config.path == tmp_path / "guest.toml"
    assert config.hostname == "www.example"
    assert config.init == ["/bin/sh", "-c", "exec httpd"]
    assert config.environment == {"TERM": "xterm", "LANG": "C.UTF-8"}
    assert config.stop_signal == signal.SIGHUP == 1
    assert config.stop_timeout == 2.0 and isinstance(config.stop_timeout, float)
    assert (config.restart, config.restart_delay, config.restart_limit) == ("on-failure", 0.5, 3)
    assert config.restart_interval == 30.0
    assert config.capabilities == ["CHOWN", "KILL"]
    assert config.autostart is True
    assert config.passthrough is False
    limits = config.limits
    assert (limits.memory, limits.cpu_weight, limits.cpu_quota, limits.pids) == (
        256 * 2**20,
        50,
        0.5,
        200,
    )
    assert (limits.disk_space, limits.disk_inodes) == (3 * 2**29, 100000)
    net = config.net
    assert (net.mode, net.bridge) == ("isolated", "br-test")
    assert net.bridge_addresses == [
        ipaddress.IPv4Interface("10.88.0.1/24"),
        ipaddress.IPv6Interface("fd00:88::1/64"),
    ]
    # a guest's address takes its bridge's prefix length
    assert net.addresses == [
        ipaddress.IPv4Interface("10.88.0.11/24"),
        ipaddress.IPv6Interface("fd00:88::11/64"),
    ]
    assert net.gateway(net.addresses[1]) == ipaddress.IPv6Interface("fd00:88::1/64")


def test_defaults(tmp_path: Path) -> None:
    config = parse(config_file(tmp_path, MINIMAL, name="g1"))
    assert (config.name, config.hostname, config.xid, config.root) == ("g1", "g1", 7, "/srv/g")
    assert config.init == ["/sbin/init"]
    assert config.environment == {}
    assert config.stop_signal == 0  # "auto": chosen by the guest's init
    assert config.stop_timeout == 5.0 and config.boot_check == 0.5
    assert (config.restart, config.restart_delay, config.restart_limit) == ("no", 1.0, 5)
    assert config.restart_interval == 60.0
    # A user namespace of its own: guest root is no one on the host.
    assert config.security.userns is True
    assert config.idmap() == {"base": (7 + 16) * 65536, "count": 65536}
    assert "SYS_ADMIN" in config.capabilities and "SYS_RAWIO" not in config.capabilities
    assert config.autostart is False
    assert config.passthrough is True
    limits = config.limits
    assert [limits.memory, limits.cpu_weight, limits.cpu_quota] == [None, None, None]
    assert [limits.pids, limits.disk_space, limits.disk_inodes] == [None, None, None]
    assert (config.net.mode, config.net.bridge, config.net.addresses) == ("host", "ctx0", [])
    assert [str(a) for a in config.net.bridge_addresses] == ["10.77.0.1/24", "fd00:77::1/64"]


def test_write_then_parse_gives_every_key_back(tmp_path: Path) -> None:
    config = parse(config_file(tmp_path, FULL))
    write(config)
    again = parse(config.path)
    assert again == config
    text = config.path.read_text()
    write(again)
    assert config.path.read_text() == text  # nothing drifts from one write to the next


@pytest.mark.parametrize("stop_signal", [9, "SIGUSR1", "term", 33, "SIGRTMIN+3", "auto"])
def test_signals_by_name_or_number_are_written_back(tmp_path: Path, stop_signal: object) -> None:
    """33 is a real-time signal without a name: the file keeps its number."""
    path = config_file(tmp_path, MINIMAL + f"stop_signal = {json.dumps(stop_signal)}\n")
    number = parse(path).stop_signal
    write(parse(path))
    assert parse(path).stop_signal == number
    assert number == {
        9: 9, "SIGUSR1": signal.SIGUSR1, "term": signal.SIGTERM, 33: 33,
        "SIGRTMIN+3": signal.SIGRTMIN + 3, "auto": 0,
    }[stop_signal]  # fmt: skip


# Strings the old hand-written writer put between quotes as they were: a newline or any
# other control character made a file that TOML cannot read back.
AWKWARD = [
    "two\nlines",
    "carriage\rreturn",
    "tab\there",
    "bell\x07 escape\x1b[31m delete\x7f",
    "\x01\x02\x1f",
    'a "quoted" word',
    "back\\slash and trailing\\",
    "''' and \"\"\"",
    "non-ASCII: é ü ß 漢字 😀 \u2028 \x85",
    "\\n is not a newline",
]


@pytest.mark.parametrize("text", AWKWARD)
def test_strings_survive_write_and_parse(tmp_path: Path, text: str) -> None:
    path = tmp_path / "g.toml"
    path.write_text(
        tomli_w.dumps(
            {"xid": 7, "root": "/srv/g", "init": ["/bin/echo", text], "environment": {"V": text}}
        )
    )
    config = parse(path)
    assert config.init == ["/bin/echo", text] and config.environment == {"V": text}
    write(config)
    again = parse(path)
    assert again.init == ["/bin/echo", text]
    assert again.environment == {"V": text}


def test_environment_names_that_need_quotes_survive(tmp_path: Path) -> None:
    """The old writer wrote names bare: "A B" broke the file, "LC.ALL" became a table."""
    names = {"A B": "1", "LC.ALL": "2", 'Q"': "3", "É": "4", "x-y": "5"}
    path = tmp_path / "g.toml"
    path.write_text(tomli_w.dumps({"xid": 7, "root": "/srv/g", "environment": names}))
    write(parse(path))
    assert parse(path).environment == {"A B": "1", "LC.ALL": "2", 'Q"': "3", "É": "4", "x-y": "5"}


BAD = [
    ('xid = "many"\nroot = "/x"\n', "xid: expected an integer, got 'many'"),
    ('xid = true\nroot = "/x"\n', "xid: expected an integer, got True"),
    ('xid = 1\nroot = "/x"\n', "xid: expected an integer >= 2, got 1"),
    ('xid = 65536\nroot = "/x"\n', "xid: expected an integer <= 65535, got 65536"),
    ('root = "/x"\n', "xid: missing (a unique number from 2 to 65535)"),
    ("xid = 5\n", "root: missing (the guest's backing tree)"),
    ('xid = 5\nroot = "x"\n', "root: 'x' is not an absolute path"),
    ('xid = 5\nroot = "/x\\u0000"\n', "root: '/x\\x00' is not an absolute path"),
    (
        'name = "Web"\n' + MINIMAL,
        "name: 'Web': use lower-case letters, digits, '.', '_' and "
        "'-' (at most 63, first a letter or digit)",
    ),
    ("name = 5\n" + MINIMAL, "name: expected a string, got 5"),
    ('hostname = "a_b"\n' + MINIMAL, "hostname: 'a_b' is not a valid host name"),
    ('hostname = "web\\n"\n' + MINIMAL, "hostname: 'web\\n' is not a valid host name"),
    ('init = "fancy"\n' + MINIMAL, 'init: expected "plain" or a command as a list of strings'),
    ("init = []\n" + MINIMAL, "init: expected a non-empty list of strings"),
    ('init = ["/bin/sh", 5]\n' + MINIMAL, "init: expected a non-empty list of strings"),
    ('init = ["sh"]\n' + MINIMAL, "init: 'sh': the program must be an absolute path"),
    (
        'init = ["/bin/echo", "a\\u0000b"]\n' + MINIMAL,
        "init: 'a\\x00b' contains a NUL character, which no program can be given",
    ),
    (
        'environment = { "A=B" = "c" }\n' + MINIMAL,
        'environment.A=B: expected NAME = "value" strings',
    ),
    ("environment = { A = 5 }\n" + MINIMAL, 'environment.A: expected NAME = "value" strings'),
    ('environment = { "" = "x" }\n' + MINIMAL, 'environment.: expected NAME = "value" strings'),
    (
        'environment = { A = "x\\u0000" }\n' + MINIMAL,
        "environment.A: 'x\\x00' contains a NUL character, which no program can be given",
    ),
    ('environment = "A=B"\n' + MINIMAL, "environment: expected a table, got 'A=B'"),
    ('stop_signal = "SIGFOO"\n' + MINIMAL, "stop_signal: 'SIGFOO' is not a signal"),
    ("stop_signal = 0\n" + MINIMAL, "stop_signal: 0 is not a signal"),
    ("stop_signal = true\n" + MINIMAL, "stop_signal: True is not a signal"),
    ("stop_timeout = -1\n" + MINIMAL, "stop_timeout: expected a number >= 0.0, got -1"),
    (
        'restart = "sometimes"\n' + MINIMAL,
        "restart: 'sometimes' is not one of 'no', 'on-failure', 'always'",
    ),
    ("restart_limit = -1\n" + MINIMAL, "restart_limit: expected an integer >= 0, got -1"),
    ("restart_interval = 0\n" + MINIMAL, "restart_interval: expected a number > 0.0, got 0"),
    ('stop_timeout = "5s"\n' + MINIMAL, "stop_timeout: expected a number, got '5s'"),
    ('capabilities = ["CHOWN", "FLY"]\n' + MINIMAL, "capabilities: 'FLY' is not a capability"),
    ('capabilities = "CHOWN"\n' + MINIMAL, "capabilities: expected a list, got 'CHOWN'"),
    ('autostart = "yes"\n' + MINIMAL, "autostart: expected true or false, got 'yes'"),
    (MINIMAL + "limits = 5\n", "limits: expected a table, got 5"),
    (
        MINIMAL + '[limits]\nmemory = "lots"\n',
        "limits.memory: 'lots' is not a size (a number with K, M, G or T)",
    ),
    (MINIMAL + "[limits]\nmemory = 0\n", "limits.memory: must be positive"),
    (MINIMAL + '[limits]\ndisk_space = "0"\n', "limits.disk_space: must be positive"),
    (MINIMAL + "[limits]\ndisk_space = 1.5\n", "limits.disk_space: expected a size, got 1.5"),
    (MINIMAL + "[limits]\ncpu_weight = 0\n", "limits.cpu_weight: expected an integer >= 1, got 0"),
    (
        MINIMAL + "[limits]\ncpu_weight = 10001\n",
        "limits.cpu_weight: expected an integer <= 10000, got 10001",
    ),
    (MINIMAL + "[limits]\ncpu_quota = 0\n", "limits.cpu_quota: expected a number > 0.0, got 0"),
    (MINIMAL + "[limits]\npids = -3\n", "limits.pids: expected an integer >= 1, got -3"),
    (
        MINIMAL + "[limits]\ndisk_inodes = 1.0\n",
        "limits.disk_inodes: expected an integer, got 1.0",
    ),
    (MINIMAL + "net = 5\n", "net: expected a table, got 5"),
    (MINIMAL + '[net]\nmode = "bridged"\n', 'net.mode: \'bridged\': expected "host" or "isolated"'),
    (
        MINIMAL + '[net]\nbridge = "a-name-far-too-long"\n',
        "net.bridge: 'a-name-far-too-long' is not an interface name",
    ),
    (
        MINIMAL + '[net]\nbridge_addresses = ["10.77.0.1"]\n',
        "net.bridge_addresses: '10.77.0.1': give the prefix length",
    ),
    (
        MINIMAL + '[net]\nbridge_addresses = ["10.77.0.1/24", "10.78.0.1/24"]\n',
        "net.bridge_addresses: '10.78.0.1/24': one address per IP version",
    ),
    (
        MINIMAL + "[net]\nbridge_addresses = [1]\n",
        "net.bridge_addresses: expected addresses as strings, got 1",
    ),
    (
        MINIMAL + '[net]\nmode = "isolated"\naddresses = ["banana"]\n',
        "net.addresses: 'banana' is not an IPv4 or IPv6 address",
    ),
    (
        MINIMAL + '[net]\nmode = "isolated"\naddresses = ["10.77.0.5/16"]\n',
        "net.addresses: '10.77.0.5/16' is outside the bridge's subnet 10.77.0.0/24",
    ),
    (
        MINIMAL + '[net]\nmode = "isolated"\naddresses = ["10.77.0.5/32"]\n',
        "net.addresses: '10.77.0.5/32': give the bridge's prefix length, or none",
    ),
    (
        MINIMAL + '[net]\nmode = "isolated"\naddresses = ["fd00:77::5/128"]\n',
        "net.addresses: 'fd00:77::5/128': give the bridge's prefix length, or none",
    ),
    (
        MINIMAL + '[net]\nmode = "isolated"\naddresses = ["10.77.0.1"]\n',
        "net.addresses: '10.77.0.1' is the bridge's own address",
    ),
    (
        MINIMAL + '[net]\nmode = "isolated"\naddresses = ["10.77.0.5", "10.77.0.5/24"]\n',
        "net.addresses: '10.77.0.5/24' is given twice",
    ),
    (
        MINIMAL + '[net]\nbridge_addresses = ["10.77.0.1/24"]\nmode = "isolated"\n'
        'addresses = ["fd00:77::5"]\n',
        "net.addresses: 'fd00:77::5': the bridge has no IPv6 address",
    ),
    (
        MINIMAL + '[net]\naddresses = ["10.77.0.5"]\n',
        'net.addresses: a guest\'s own addresses need mode = "isolated"',
    ),
    ("xid = \n", "not valid TOML: "),
]


@pytest.mark.parametrize(("text", "problem"), BAD)
def test_each_bad_value_is_refused_in_one_line_naming_file_and_key(
    tmp_path: Path, text: str, problem: str
) -> None:
    path = config_file(tmp_path, text)
    with pytest.raises(ConfigError) as refused:
        parse(path)
    message = str(refused.value)
    assert message.startswith(f"{path}: {problem}"), message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("text", "key"),
    [
        (MINIMAL + "memroy = 1\n", "memroy"),
        (MINIMAL + '"a.b" = 1\n', "a.b"),
        (MINIMAL + 'path = "/etc/passwd"\n', "path"),
        (MINIMAL + "[limits]\nmemroy = 1\n", "limits.memroy"),
        (MINIMAL + "[limits.more]\npids = 1\n", "limits.more"),
        (MINIMAL + "[net]\nbrigde = 1\n", "net.brigde"),
        (MINIMAL + "[net.more]\nmode = 1\n", "net.more"),
        (MINIMAL + "[extra]\nx = 1\n", "extra"),
    ],
)
def test_unknown_keys_are_refused_at_every_level(tmp_path: Path, text: str, key: str) -> None:
    path = config_file(tmp_path, text)
    with pytest.raises(ConfigError) as refused:
        parse(path)
    assert str(refused.value) == f"{path}: {key}: unknown key"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (MINIMAL + '"a\\nb" = 1\n', "'a\\nb': unknown key"),
        ('environment = { "A\\nB" = 5 }\n' + MINIMAL,
         "'environment.A\\nB': expected NAME = \"value\" strings"),
        (MINIMAL + '"x - at `$.xid`" = 1\n', "x - at `$.xid`: unknown key"),
        ('capabilities = ["x - at `$.xid`"]\n' + MINIMAL,
         "capabilities: 'x - at `$.xid`' is not a capability"),
    ],
)  # fmt: skip
def test_keys_and_values_the_file_makes_up_stay_on_one_line(
    tmp_path: Path, text: str, problem: str
) -> None:
    path = config_file(tmp_path, text)
    with pytest.raises(ConfigError) as refused:
        parse(path)
    assert str(refused.value) == f"{path}: {problem}"


def test_load_all_checks_the_files_together(tmp_path: Path) -> None:
    config_file(tmp_path, MINIMAL, "a")
    config_file(tmp_path, 'xid = 8\nroot = "/srv/b"\n', "b")
    assert sorted(load_all(tmp_path)) == ["a", "b"]
    config_file(tmp_path, 'name = "a"\nxid = 9\nroot = "/srv/c"\n', "c")
    with pytest.raises(ConfigError, match=rf"^{tmp_path}/c.toml: name: 'a' is also used by "):
        load_all(tmp_path)
    config_file(tmp_path, 'xid = 7\nroot = "/srv/c"\n', "c")
    with pytest.raises(ConfigError, match=rf"^{tmp_path}/c.toml: xid: 7 is also used by guest a$"):
        load_all(tmp_path)
    isolated = '[net]\nmode = "isolated"\naddresses = ["10.77.0.9"]\n'
    config_file(tmp_path, MINIMAL + isolated, "a")
    config_file(tmp_path, 'xid = 9\nroot = "/srv/c"\n' + isolated, "c")
    with pytest.raises(ConfigError) as refused:
        load_all(tmp_path)
    assert str(refused.value) == f"{tmp_path}/c.toml: net.addresses: 10.77.0.9 is also guest a's"
    config_file(tmp_path, 'xid = 9\nroot = "/srv/c"\n[net]\nmode = "isolated"\n'
                'bridge = "ctx1"\nbridge_addresses = ["10.77.0.129/25"]\n', "c")  # fmt: skip
    with pytest.raises(ConfigError) as refused:
        load_all(tmp_path)
    assert str(refused.value) == (
        f"{tmp_path}/c.toml: net.bridge_addresses: 10.77.0.128/25 overlaps bridge ctx0's"
        " 10.77.0.0/24"
    )


def test_guest_addresses_from_the_command_line(tmp_path: Path) -> None:
    path = tmp_path / "g.toml"
    assert guest_addresses(NetConfig(), ["10.77.0.5", "fd00:77::5/64"], path) == [
        ipaddress.IPv4Interface("10.77.0.5/24"),
        ipaddress.IPv6Interface("fd00:77::5/64"),
    ]
    with pytest.raises(ConfigError) as refused:
        guest_addresses(NetConfig(), ["10.77.0.255"], path)
    assert str(refused.value) == (
        f"{path}: net.addresses: '10.77.0.255' is the subnet's network or broadcast address"
    )


@pytest.mark.parametrize("name", ["../x", "a/b", "X", "_x", "...", "x" * 64, "x\n", "", 5])
def test_bad_guest_names_are_refused(name: object) -> None:
    with pytest.raises(ConfigError, match=r"^bad guest name "):
        check_name(name)


def test_a_config_built_as_create_builds_it_is_written_and_read(tmp_path: Path) -> None:
    """As the daemon's create: a GuestConfig built in code, written, then parsed."""
    path = tmp_path / "new.toml"
    config = GuestConfig(name="new", xid=300, root="/srv/new/", path=path, hostname="new")
    config.net.mode = "isolated"
    config.net.addresses = guest_addresses(config.net, ["10.77.0.30"], path)
    write(config)
    again = parse(path)
    assert again == config
    assert again.root == "/srv/new" and again.init == ["/sbin/init"]
    assert [str(a) for a in again.net.addresses] == ["10.77.0.30/24"]


def test_the_test_harness_can_rewrite_a_written_file(tmp_path: Path) -> None:
    """contextd_harness.Contextd.configure, which other contextd tests use, on this format."""
    ctx = Contextd(tmp_path)
    path = tmp_path / "etc" / "g.toml"
    config = GuestConfig(name="g", xid=300, root="/srv/g", path=path, hostname="g")
    write(config)
    ctx.configure(
        "g", init=["/bin/sh", "-c", "exec sleep 1\n"], autostart=True, limits={"pids": 40}
    )
    again = parse(path)
    assert again.init == ["/bin/sh", "-c", "exec sleep 1\n"]
    assert again.autostart is True and again.limits.pids == 40
    assert again.net.mode == "host"


def test_a_privileged_guest_keeps_util_vservers_capabilities(tmp_path: Path) -> None:
    config = parse(config_file(tmp_path, MINIMAL + "[security]\nuserns = false\n"))
    assert config.idmap() is None
    assert config.capabilities == [
        "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "SETUID", "SETGID", "SETPCAP",
        "NET_BIND_SERVICE", "SYS_CHROOT", "SYS_BOOT", "SYS_TTY_CONFIG", "LEASE", "SETFCAP",
        "AUDIT_WRITE",
    ]  # fmt: skip
    written = tmp_path / "out.toml"
    write(msgspec.structs.replace(config, path=written))
    assert "userns = false" in written.read_text() and parse(written).idmap() is None


def test_a_user_namespace_gets_a_range_of_host_ids_and_every_capability(tmp_path: Path) -> None:
    config = parse(config_file(tmp_path, MINIMAL + "[security]\nuserns = true\n"))
    assert config.idmap() == {"base": (7 + 16) * 65536, "count": 65536}
    assert "SYS_ADMIN" in config.capabilities and "MKNOD" in config.capabilities
    for dropped in ("NET_ADMIN", "NET_RAW", "SYS_RAWIO", "SYS_MODULE", "SYS_TIME", "MAC_ADMIN"):
        assert dropped not in config.capabilities
    written = tmp_path / "out.toml"
    write(msgspec.structs.replace(config, path=written))
    again = parse(written)
    assert again.idmap() == config.idmap() and again.capabilities == config.capabilities


def test_user_namespaces_of_two_guests_never_share_a_host_id(tmp_path: Path) -> None:
    config_file(tmp_path, MINIMAL + "[security]\nuserns = true\n", name="a")  # 1507328..
    config_file(
        tmp_path,
        'xid = 8\nroot = "/srv/b"\n[security]\nuserns = true\nid_base = 1540000\n',
        name="b",
    )
    with pytest.raises(ConfigError) as refused:
        load_all(tmp_path)
    assert str(refused.value) == (
        f"{tmp_path}/b.toml: security.id_base: host ids 1540000.. overlap guest a's (1507328..)"
    )


def test_an_xid_too_high_for_a_default_id_range(tmp_path: Path) -> None:
    path = config_file(tmp_path, 'xid = 65530\nroot = "/srv/g"\n[security]\nuserns = true\n')
    with pytest.raises(ConfigError, match="xid 65530 leaves no room for a user namespace's ids"):
        parse(path)
