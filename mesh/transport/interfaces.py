"""This machine's interface addresses, read from the operating system (psutil owns it)."""

from __future__ import annotations

import ipaddress
import socket

import psutil

from ..addresses import LocalInterface


def local_interfaces() -> list[LocalInterface]:
    """Every IPv4 and IPv6 address of every interface that is up, with its prefix length."""
    try:
        stats = psutil.net_if_stats()
        addresses = psutil.net_if_addrs()
    except OSError:
        return []
    found = []
    for name, entries in addresses.items():
        if name in stats and not stats[name].isup:
            continue
        for entry in entries:
            if entry.family not in (socket.AF_INET, socket.AF_INET6):
                continue
            address = entry.address.split("%", 1)[0]
            prefix = _prefix_len(entry.netmask, 32 if entry.family == socket.AF_INET else 128)
            found.append(LocalInterface(name, address, prefix))
    return found


def _prefix_len(netmask: str | None, full: int) -> int:
    if not netmask:
        return full
    zero = "0.0.0.0" if full == 32 else "::"
    try:
        return ipaddress.ip_network(f"{zero}/{netmask}").prefixlen
    except ValueError:  # a mask that is not a prefix (or not an address at all)
        return full
