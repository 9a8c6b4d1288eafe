"""Guest networking against the real kernel: isolated namespaces, veth pairs, a bridge.

Each test's daemon runs in a network namespace the test made (contextd_harness),
so its bridge, its guests' addresses and every packet sent stay inside it.
"""

from __future__ import annotations

import json
import sys
import tomllib
from pathlib import Path

import pytest
import tomli_w
from contextd_harness import SLEEPER, Contextd


def host_links(ctx: Contextd) -> set[str]:
    """Interface names on the daemon's side."""
    out = ctx.on_host("ip", "-j", "link", "show").stdout
    return {link["ifname"] for link in json.loads(out)}


def guest_links(ctx: Contextd, name: str) -> set[str]:
    """Interface names a guest sees, from /proc/net/dev and /sys/class/net."""
    dev = ctx("exec", name, "--", "cat", "/proc/net/dev").stdout.splitlines()[2:]
    from_proc = {line.split(":")[0].strip() for line in dev}
    from_sys = set(ctx("exec", name, "--", "ls", "/sys/class/net").stdout.split())
    assert from_proc == from_sys
    return from_proc


def fetch(ctx: Contextd, url: str) -> str:
    """GET a URL from the daemon's side of the network."""
    script = (
        "import sys, urllib.request;"
        "sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())"
    )
    return ctx.on_host(sys.executable, "-c", script, url).stdout


def set_net(ctx: Contextd, name: str, net: str) -> None:
    """Replace a guest's [net] section."""
    path = ctx.base / "etc" / f"{name}.toml"
    data = tomllib.loads(path.read_text())
    data["net"] = tomllib.loads(net)
    path.write_text(tomli_w.dumps(data))


def test_isolated_guest_serves_at_its_addresses_and_nothing_is_left(
    netctx: Contextd, guest_tree: Path
) -> None:
    ctx = netctx
    assert host_links(ctx) == {"lo"}
    ctx("create", "a", "--from", str(guest_tree), "--init", SLEEPER,
        "--address", "10.77.0.11", "--address", "fd00:77::11")  # fmt: skip
    ctx("create", "b", "--from", str(guest_tree), "--init", SLEEPER, "--address", "10.77.0.12")
    ctx("start", "a")
    ctx("start", "b")
    assert host_links(ctx) == {"lo", "ctx0", "vctx101", "vctx102"}

    ctx("exec", "a", "--", "/bin/sh", "-c",
        "mkdir -p /www && echo served-by-a > /www/index.html && httpd -p 80 -h /www")  # fmt: skip
    for url in ("http://10.77.0.11/", "http://[fd00:77::11]/"):
        assert fetch(ctx, url) == "served-by-a\n"
    # b reaches a across the bridge, at a's address
    assert ctx("exec", "b", "--", "wget", "-q", "-O", "-", "http://10.77.0.11/").stdout == (
        "served-by-a\n"
    )

    # each guest sees loopback and its own eth0: not the host's interfaces, not the other's
    assert guest_links(ctx, "a") == {"lo", "eth0"}
    addresses = ctx("exec", "a", "--", "ip", "addr", "show", "eth0").stdout
    assert "inet 10.77.0.11/24" in addresses and "inet6 fd00:77::11/64" in addresses
    assert "10.77.0.12" not in addresses
    routes = ctx("exec", "a", "--", "ip", "route").stdout
    assert "default via 10.77.0.1 dev eth0" in routes

    status = json.loads(ctx("status", "a", "--json").stdout)
    assert status["addresses"] == ["10.77.0.11/24", "fd00:77::11/64"]
    assert status["bridge"] == "ctx0"
    assert status["traffic"]["rx_bytes"] > 0 and status["traffic"]["tx_bytes"] > 0
    assert status["traffic"]["tx_packets"] >= 4  # two HTTP answers, at least
    table = ctx("status").stdout
    assert "a: bridge ctx0, 10.77.0.11/24 fd00:77::11/64; received" in table

    ctx("stop", "a")
    assert host_links(ctx) == {"lo", "ctx0", "vctx102"}  # b still uses the bridge
    ctx("stop", "b")
    assert host_links(ctx) == {"lo"}


@pytest.mark.parametrize(
    "attempt",
    [
        "ip addr add 10.77.0.99/24 dev eth0",
        "ip addr del 10.77.0.21/24 dev eth0",
        "ip link set eth0 down",
        "ip route del default",
        "ip route add 10.99.0.0/16 via 10.77.0.1",
        "ip link add dummy0 type dummy",
    ],
)
def test_guest_cannot_change_its_network(netctx: Contextd, guest_tree: Path, attempt: str) -> None:
    ctx = netctx
    ctx("create", "g", "--from", str(guest_tree), "--init", SLEEPER, "--address", "10.77.0.21")
    ctx("start", "g")
    before = network_of(ctx, "g")
    out = ctx("exec", "g", "--", "/bin/sh", "-c", attempt, check=False)
    assert out.returncode != 0
    assert "Operation not permitted" in out.stderr
    assert network_of(ctx, "g") == before


def network_of(ctx: Contextd, name: str) -> str:
    """A guest's addresses, routes and links as `ip` shows them, without the flag of an
    IPv6 address whose duplicate detection is still under way (it ends by itself)."""
    shown = ctx("exec", name, "--", "/bin/sh", "-c", "ip addr; ip route; ip link").stdout
    return shown.replace(" tentative ", " ")


@pytest.mark.parametrize(
    ("addresses", "problem"),
    [
        (["10.77.0.300"], "'10.77.0.300' is not an IPv4 or IPv6 address"),
        (["banana"], "'banana' is not an IPv4 or IPv6 address"),
        (["10.78.0.5"], "'10.78.0.5' is outside the bridge's subnet 10.77.0.0/24"),
        (["10.77.0.5/16"], "'10.77.0.5/16' is outside the bridge's subnet 10.77.0.0/24"),
        (["10.77.0.1"], "'10.77.0.1' is the bridge's own address"),
        (["10.77.0.255"], "'10.77.0.255' is the subnet's network or broadcast address"),
        (["fd00:78::5"], "'fd00:78::5' is outside the bridge's subnet fd00:77::/64"),
        (["10.77.0.5", "10.77.0.5"], "'10.77.0.5' is given twice"),
    ],
)
def test_bad_addresses_are_refused_and_nothing_is_created(
    netctx: Contextd, guest_tree: Path, addresses: list[str], problem: str
) -> None:
    ctx = netctx
    args = [arg for address in addresses for arg in ("--address", address)]
    out = ctx("create", "bad", "--from", str(guest_tree), *args, check=False)
    assert out.returncode == 1
    assert out.stderr.strip().endswith(f"net.addresses: {problem}"), out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert not (ctx.base / "etc" / "bad.toml").exists()
    assert not (ctx.base / "cowfs" / "guests" / "bad").exists()


def test_duplicate_and_misconfigured_addresses_stop_the_start(
    netctx: Contextd, guest_tree: Path
) -> None:
    ctx = netctx
    ctx("create", "one", "--from", str(guest_tree), "--init", SLEEPER, "--address", "10.77.0.31")
    out = ctx("create", "two", "--from", str(guest_tree), "--address", "10.77.0.31", check=False)
    assert out.returncode == 1 and "10.77.0.31 is also guest one's" in out.stderr
    assert not (ctx.base / "etc" / "two.toml").exists()

    # a hand-edited file: same address as guest one
    ctx("create", "two", "--from", str(guest_tree), "--init", SLEEPER, "--address", "10.77.0.32")
    set_net(ctx, "two", 'mode = "isolated"\naddresses = ["10.77.0.31"]')
    out = ctx("start", "one", check=False)
    assert out.returncode == 1
    assert "two.toml: net.addresses: 10.77.0.31 is also guest one's" in out.stderr
    # another bridge on an overlapping subnet
    set_net(ctx, "two", 'mode = "isolated"\nbridge = "ctx1"\nbridge_addresses = ["10.77.0.129/25"]')
    out = ctx("start", "two", check=False)
    assert out.returncode == 1
    assert "net.bridge_addresses: 10.77.0.128/25 overlaps bridge ctx0's 10.77.0.0/24" in out.stderr
    # an address of a family the bridge has none of
    set_net(ctx, "two", 'mode = "isolated"\nbridge_addresses = ["10.77.0.1/24"]\n'
            'addresses = ["fd00:77::5"]')  # fmt: skip
    out = ctx("start", "two", check=False)
    assert out.returncode == 1 and "the bridge has no IPv6 address" in out.stderr
    set_net(ctx, "two", 'mode = "bridged"')
    out = ctx("start", "two", check=False)
    assert out.returncode == 1
    assert 'net.mode: \'bridged\': expected "host" or "isolated"' in out.stderr
    set_net(ctx, "two", 'mode = "host"\naddresses = ["10.77.0.40"]')
    out = ctx("start", "two", check=False)
    assert out.returncode == 1 and 'need mode = "isolated"' in out.stderr
    assert host_links(ctx) == {"lo"}  # nothing was made for any of them
    set_net(ctx, "two", 'mode = "isolated"\naddresses = ["10.77.0.32"]')
    assert ctx("list").stdout == "one stopped\ntwo stopped\n"


def test_failed_start_removes_its_interfaces(netctx: Contextd, guest_tree: Path) -> None:
    ctx = netctx
    ctx("create", "broken", "--from", str(guest_tree), "--init", "/bin/no-such-init",
        "--address", "10.77.0.41")  # fmt: skip
    out = ctx("start", "broken", check=False)
    assert out.returncode == 1 and "no-such-init" in out.stderr
    assert host_links(ctx) == {"lo"}
    # and the guest starts once fixed, on the same address
    ctx.configure("broken", init=["/bin/sh", "-c", "exec sleep 1000000"])
    ctx("start", "broken")
    assert host_links(ctx) == {"lo", "ctx0", "vctx101"}


def test_an_admins_bridge_is_used_and_kept(netctx: Contextd, guest_tree: Path) -> None:
    ctx = netctx
    ctx.on_host("ip", "link", "add", "br-admin", "type", "bridge")
    ctx.on_host("ip", "addr", "add", "10.88.0.1/24", "dev", "br-admin")
    ctx("create", "g", "--from", str(guest_tree), "--init", SLEEPER)
    set_net(ctx, "g", 'mode = "isolated"\nbridge = "br-admin"\n'
            'bridge_addresses = ["10.88.0.1/24"]\naddresses = ["10.88.0.7"]')  # fmt: skip
    ctx("start", "g")
    ctx("exec", "g", "--", "/bin/sh", "-c", "echo hi > /index.html && httpd -p 8080 -h /")
    assert fetch(ctx, "http://10.88.0.7:8080/") == "hi\n"
    ctx("stop", "g")
    assert host_links(ctx) == {"lo", "br-admin"}  # not contextd's to remove
    # a bridge that lacks the configured address is not silently changed
    set_net(ctx, "g", 'mode = "isolated"\nbridge = "br-admin"\n'
            'bridge_addresses = ["10.89.0.1/24"]\naddresses = ["10.89.0.7"]')  # fmt: skip
    out = ctx("start", "g", check=False)
    assert out.returncode == 1
    assert "bridge br-admin (not made by contextd) lacks the address 10.89.0.1/24" in out.stderr
    assert host_links(ctx) == {"lo", "br-admin"}


def test_isolated_without_addresses_has_loopback_only(netctx: Contextd, guest_tree: Path) -> None:
    ctx = netctx
    ctx("create", "alone", "--from", str(guest_tree), "--init", SLEEPER)
    set_net(ctx, "alone", 'mode = "isolated"')
    ctx("start", "alone")
    assert guest_links(ctx, "alone") == {"lo"}
    assert host_links(ctx) == {"lo"}  # no bridge, no veth
    ctx("exec", "alone", "--", "/bin/sh", "-c",
        "echo local > /index.html && httpd -p 127.0.0.1:8080 -h /")  # fmt: skip
    out = ctx("exec", "alone", "--", "wget", "-q", "-O", "-", "http://127.0.0.1:8080/")
    assert out.stdout == "local\n"


def test_an_adopted_guests_network_works_and_is_removed_at_its_stop(
    netctx: Contextd, guest_tree: Path
) -> None:
    """After a restart of the daemon: the guest still serves at its address, its traffic
    is counted, and its stop removes its interfaces."""
    ctx = netctx
    ctx("create", "web", "--from", str(guest_tree), "--init", SLEEPER, "--address", "10.77.0.31")
    ctx("start", "web")
    ctx("exec", "web", "--", "/bin/sh", "-c",
        "mkdir -p /www && echo before > /www/index.html && httpd -p 80 -h /www")  # fmt: skip
    assert fetch(ctx, "http://10.77.0.31/") == "before\n"
    ctx.kill()
    ctx.serve()
    assert '"adopted"' in ctx.log()
    ctx("exec", "web", "--", "/bin/sh", "-c", "echo after > /www/index.html")
    assert fetch(ctx, "http://10.77.0.31/") == "after\n"
    status = json.loads(ctx("status", "web", "--json").stdout)
    assert status["addresses"] == ["10.77.0.31/24"]
    assert status["traffic"]["tx_packets"] >= 2  # two HTTP answers, at least
    assert host_links(ctx) == {"lo", "ctx0", "vctx101"}
    ctx("stop", "web")
    assert host_links(ctx) == {"lo"}
