"""Port mappings on the home router by UPnP (py-libp2p's `UpnpManager`, over miniupnpc): where
the router offers it, the mesh port and the data port are forwarded to this node, and the
router's public address joins the addresses it advertises, so members elsewhere dial it
directly instead of through a relay. Where no gateway answers, nothing changes.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import warnings
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

import trio

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from libp2p.discovery.upnp.upnp import UpnpManager

_log = logging.getLogger("sharedllm.mesh.upnp")
# py-libp2p logs a traceback for a gateway that is simply not there; we say it in one line.
logging.getLogger("libp2p.discovery.upnp").setLevel(logging.CRITICAL)
DISCOVERY_TIMEOUT_S = 15.0


@dataclass(frozen=True)
class PortMapping:
    """The router's public address and the ports it forwards to us (the same numbers)."""

    external_ip: str
    ports: tuple[int, ...]


def usable_external_ip(text: str | None) -> str | None:
    """The gateway's answer, if it is an address members elsewhere could dial."""
    try:
        address = ipaddress.ip_address(text or "")
    except ValueError:
        return None
    return str(address) if address.is_global else None


@asynccontextmanager
async def mapped_ports(ports: Sequence[int]) -> AsyncIterator[PortMapping | None]:
    """Maps `ports` (TCP) for as long as the block runs, where a gateway allows it; yields
    None when there is no gateway, it refuses, or it is itself behind another NAT."""
    manager = UpnpManager()
    mapping: PortMapping | None = None
    try:
        with trio.move_on_after(DISCOVERY_TIMEOUT_S):
            mapping = await _map(manager, ports)
        yield mapping
    finally:
        if mapping is not None:
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                for port in mapping.ports:
                    with contextlib.suppress(Exception):
                        await manager.remove_port_mapping(port)


async def _map(manager: UpnpManager, ports: Sequence[int]) -> PortMapping | None:
    if not await manager.discover():
        _log.info("no UPnP gateway offers port mappings here")
        return None
    external = usable_external_ip(manager.get_external_ip())
    if external is None:
        _log.info("the UPnP gateway has no public address (another NAT is upstream)")
        return None
    mapped: list[int] = []
    for port in ports:
        if await manager.add_port_mapping(port):
            mapped.append(port)
    if not mapped:
        _log.warning("the UPnP gateway at %s refused to map ports %s", external, list(ports))
        return None
    _log.info("UPnP: ports %s forwarded from %s", list(mapped), external)
    return PortMapping(external, tuple(mapped))
