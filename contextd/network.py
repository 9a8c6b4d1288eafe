"""A guest's own network: a veth pair from its namespace to a host bridge, over netlink.

For a guest with ``net.mode = "isolated"``, the spawn helper gives PID 1 a new
network namespace; before init runs, contextd (``plug``):

1. makes the bridge if it is missing (marked with the interface alias
   ``contextd``, so that only bridges contextd made are ever removed), with its
   addresses (the guests' gateway), and brings it up;
2. makes a veth pair: ``vctxXID`` on the host, a port of the bridge, and
   ``eth0`` created straight inside the guest's namespace;
3. inside the namespace: loopback up, the guest's addresses on eth0 (IPv6
   without duplicate address detection, so services are reachable at once),
   eth0 up, a default route per IP version through the bridge's address.

``unplug`` (stop, failed starts, guests found dead) deletes the host end, which
takes the guest's end with it, and the bridge once no port is left on it.
The guest keeps no CAP_NET_ADMIN (not in the default capability set), so it
cannot change any of this. Netlink is spoken by pyroute2.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from contextd.config import GuestConfig, Interface, NetConfig
from cowfs.errors import CowfsError
from native import syscalls as sc

BRIDGE_ALIAS = "contextd"
GUEST_INTERFACE = "eth0"
_IFA_F_NODAD = 0x02
# Bridges are shared between guests: make, fill and remove them one guest at a time.
_bridge_lock = threading.Lock()


class NetworkError(CowfsError):
    """A guest's network could not be set up."""


@dataclass
class Traffic:
    """A guest's traffic counters, as the guest sees them (received = sent by the host end)."""

    rx_bytes: int
    tx_bytes: int
    rx_packets: int
    tx_packets: int


def host_interface(config: GuestConfig) -> str:
    """The host end of a guest's veth pair."""
    return f"vctx{config.xid}"


def plug(config: GuestConfig, pid: int) -> None:
    """Connect the network namespace of the guest's PID 1 to its bridge, with its addresses."""
    net = config.net
    name = host_interface(config)
    try:
        if not net.addresses:  # loopback only
            with _netlink_in(pid) as guest:
                guest.link("set", index=_index(guest, "lo"), state="up")
            return
        with _bridge_lock, IPRoute() as host:
            bridge = _ensure_bridge(host, net)
            _delete_link(host, name)  # left by a crash: its guest is gone
            host.link(
                "add",
                ifname=name,
                kind="veth",
                peer={"ifname": GUEST_INTERFACE, "net_ns_pid": pid},
            )
            host.link("set", index=_index(host, name), master=bridge, state="up")
        with _netlink_in(pid) as guest:
            guest.link("set", index=_index(guest, "lo"), state="up")
            eth = _index(guest, GUEST_INTERFACE)
            for address in net.addresses:
                _add_address(guest, eth, address)
            guest.link("set", index=eth, state="up")
            routed: set[int] = set()
            for address in net.addresses:
                if address.version in routed:
                    continue
                routed.add(address.version)
                guest.route(
                    "add",
                    dst="0.0.0.0/0" if address.version == 4 else "::/0",
                    gateway=str(net.gateway(address).ip),
                    family=socket.AF_INET if address.version == 4 else socket.AF_INET6,
                )
    except NetlinkError as e:
        raise NetworkError(f"guest {config.name}: network: {os.strerror(e.code)}") from None


def unplug(config: GuestConfig) -> None:
    """Remove a guest's veth pair, and its bridge if contextd made it and no port is left."""
    if config.net.mode != "isolated":
        return
    with _bridge_lock, IPRoute() as host:
        _delete_link(host, host_interface(config))
        found = host.link_lookup(ifname=config.net.bridge)
        if not found:
            return
        bridge = host.get_links(found[0])[0]
        if bridge.get_attr("IFLA_IFALIAS") != BRIDGE_ALIAS:
            return  # the admin's bridge: never ours to remove
        if not any(link.get_attr("IFLA_MASTER") == found[0] for link in host.get_links()):
            with contextlib.suppress(NetlinkError):
                host.link("del", index=found[0])


def traffic(config: GuestConfig) -> Traffic | None:
    """A running isolated guest's traffic counters (None if it has no interface)."""
    if config.net.mode != "isolated":
        return None
    with IPRoute() as host:
        found = host.link_lookup(ifname=host_interface(config))
        if not found:
            return None
        stats = host.get_links(found[0])[0].get_attr("IFLA_STATS64")
    return Traffic(
        rx_bytes=stats["tx_bytes"],
        tx_bytes=stats["rx_bytes"],
        rx_packets=stats["tx_packets"],
        tx_packets=stats["rx_packets"],
    )


def _ensure_bridge(host: IPRoute, net: NetConfig) -> int:
    found = host.link_lookup(ifname=net.bridge)
    if found:
        index = found[0]
        link = host.get_links(index)[0]
        if link.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND") != "bridge":
            raise NetworkError(f"{net.bridge} exists and is not a bridge")
        ours = link.get_attr("IFLA_IFALIAS") == BRIDGE_ALIAS
    else:
        host.link("add", ifname=net.bridge, kind="bridge")
        index = _index(host, net.bridge)
        host.link("set", index=index, ifalias=BRIDGE_ALIAS)
        ours = True
    present = {(a.get_attr("IFA_ADDRESS"), a["prefixlen"]) for a in host.get_addr(index=index)}
    for address in net.bridge_addresses:
        if (str(address.ip), address.network.prefixlen) in present:
            continue
        if not ours:
            raise NetworkError(
                f"bridge {net.bridge} (not made by contextd) lacks the address {address}"
            )
        _add_address(host, index, address)
    host.link("set", index=index, state="up")
    return index


def _add_address(ipr: IPRoute, index: int, address: Interface) -> None:
    # IPv6 without duplicate address detection: usable at once, not "tentative".
    ipr.addr(
        "add",
        index=index,
        address=str(address.ip),
        prefixlen=address.network.prefixlen,
        flags=_IFA_F_NODAD if address.version == 6 else 0,
    )


def _index(ipr: IPRoute, name: str) -> int:
    found = ipr.link_lookup(ifname=name)
    if not found:
        raise NetworkError(f"interface {name} vanished")
    return int(found[0])


def _delete_link(host: IPRoute, name: str) -> None:
    found = host.link_lookup(ifname=name)
    if found:
        with contextlib.suppress(NetlinkError):  # gone with its namespace meanwhile
            host.link("del", index=found[0])


@contextlib.contextmanager
def _netlink_in(pid: int) -> Iterator[IPRoute]:
    """A netlink socket inside the network namespace of a process.

    Only this thread enters the namespace, and only to open the socket (a socket
    stays in the namespace it was made in): no fork of the threaded daemon.
    """
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        target = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            sc.setns(target, sc.CLONE_NEWNET)
            try:
                sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, socket.NETLINK_ROUTE)
            finally:
                sc.setns(own, sc.CLONE_NEWNET)
        finally:
            os.close(target)
    finally:
        os.close(own)
    with IPRoute(use_socket=sock) as ipr:
        yield ipr
