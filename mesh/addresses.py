"""Which of a host's addresses a node advertises, and in which order it tries a peer's (pure).

A machine has many addresses and most of them reach nothing from elsewhere: loopback, a
container bridge (docker0's 172.17.0.1 is the same on every host, so dialing it reaches the
dialer itself), a VPN that only some peers share. A node advertises all of them, the likely
useful ones first, and a dialer tries a peer's addresses in its own order: the peer's
addresses in one of its own subnets first, then other routable ones, then addresses that are
its own (reached only when the peer is on the same machine). Reachability is then measured by
racing the attempts (happy eyeballs), and the winner is remembered.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

MAX_ADVERTISED = 8  # addresses per plane in a node's state (its size is bounded)
# Interface names of container bridges, virtual machines' networks and veth ends: their
# addresses rarely reach another machine.
_BRIDGE_PREFIXES = (
    "docker", "br-", "virbr", "veth", "cni", "flannel", "lxc", "lxd", "podman", "vmnet",
    "vboxnet", "kube", "cali", "weave",
)  # fmt: skip
_VPN_PREFIXES = ("tun", "tap", "wg", "tailscale", "utun", "zt", "ppp")


@dataclass(frozen=True)
class LocalInterface:
    """One address of one of this machine's interfaces."""

    name: str
    address: str  # an IPv4 or IPv6 address, without a zone
    prefix_len: int

    @property
    def network(self) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
        return ipaddress.ip_network(f"{self.address}/{self.prefix_len}", strict=False)


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _advertise_rank(interface: LocalInterface) -> int:
    """0: a LAN or public address, 1: a VPN's, 2: a bridge's, 3: loopback."""
    ip = _ip(interface.address)
    if ip is None or ip.is_loopback:
        return 3
    if interface.name.startswith(_BRIDGE_PREFIXES):
        return 2
    if interface.name.startswith(_VPN_PREFIXES):
        return 1
    return 0


def advertised_hosts(listen_host: str, interfaces: Sequence[LocalInterface]) -> list[str]:
    """The addresses a listener on `listen_host` is reachable at, likely useful ones first:
    itself when it is one address, else every address of its family (link-local ones need a
    zone a peer cannot know, so they are left out)."""
    listen_ip = _ip(listen_host)
    if listen_ip is None or not listen_ip.is_unspecified:
        return [listen_host]
    usable = []
    for interface in interfaces:
        ip = _ip(interface.address)
        if ip is not None and ip.version == listen_ip.version and not ip.is_link_local:
            usable.append(interface)
    usable.sort(key=lambda i: (_advertise_rank(i), i.address))
    hosts = list(dict.fromkeys(i.address for i in usable))
    return hosts[:MAX_ADVERTISED] or [listen_host]


def only_this_machine(hosts: Sequence[str]) -> bool:
    """True when every address is a loopback one: an invite made of them works only here."""
    ips = [_ip(host) for host in hosts]
    return bool(ips) and all(ip is not None and ip.is_loopback for ip in ips)


def dial_order(
    candidates: Sequence[str],
    interfaces: Sequence[LocalInterface],
    remembered: str | None = None,
) -> list[str]:
    """A peer's addresses in the order to try them: the one that worked last, then those in
    one of our subnets, then other routable ones, then our own and loopback ones (they reach
    the peer only when it runs on this machine). Ties keep the peer's own order."""
    own = {i.address for i in interfaces}
    networks = [i.network for i in interfaces if not i.network.network_address.is_loopback]

    def rank(host: str) -> int:
        if host == remembered:
            return 0
        ip = _ip(host)
        if ip is None:
            return 4
        if ip.is_loopback or host in own:
            return 3
        if any(ip in network for network in networks if network.version == ip.version):
            return 1
        return 2

    unique = list(dict.fromkeys(candidates))
    return sorted(unique, key=rank)


def beyond_this_machine(
    addresses: Sequence[str], interfaces: Sequence[LocalInterface]
) -> list[str]:
    """The multiaddrs to dial a peer at, racing them: its loopback ones and those that are
    this machine's own addresses only if it has no other. Such an address reaches the peer only
    when it runs here, where its other addresses reach it too; raced, it dials ourselves."""
    own = {i.address for i in interfaces}

    def here(address: str) -> bool:
        host = host_of_multiaddr(address)
        ip = None if host is None else _ip(host)
        return ip is not None and (ip.is_loopback or host in own)

    elsewhere = [a for a in addresses if not here(a)]
    return elsewhere or list(addresses)


def host_of_multiaddr(address: str) -> str | None:
    """The IP of an /ip4/... or /ip6/... multiaddr, else None."""
    parts = address.strip("/").split("/")
    if len(parts) > 1 and parts[0] in ("ip4", "ip6") and _ip(parts[1]) is not None:
        return parts[1]
    return None


def order_multiaddrs(
    addresses: Sequence[str], interfaces: Sequence[LocalInterface], remembered: str | None = None
) -> list[str]:
    """Multiaddrs in `dial_order` of their hosts (those without an IP, e.g. DNS, after)."""
    hosts = [host_of_multiaddr(a) for a in addresses]
    order = dial_order([h for h in hosts if h is not None], interfaces, remembered)
    position = {host: index for index, host in enumerate(order)}
    indexed = sorted(
        range(len(addresses)),
        key=lambda i: position.get(hosts[i] or "", len(order)),
    )
    return list(dict.fromkeys(addresses[i] for i in indexed))
