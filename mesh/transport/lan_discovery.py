"""Finding a mesh's members on the LAN by mDNS: py-libp2p's announcer and listener (libp2p's
mDNS spec: a node's multiaddrs in `dnsaddr` TXT records) on a zeroconf instance bound to the
interfaces the mesh listens on only, under a service type derived from the mesh's public key.

A found address is only a hint for the dialer: every connection still proves membership in
the hello, so a stranger announcing itself gains nothing but a refused hello. What the LAN
tells is bounded: at most `MAX_FOUND` addresses are kept (the newest).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import warnings
from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import trio

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from libp2p.discovery.events.peerDiscovery import peerDiscovery
    from libp2p.discovery.mdns.broadcaster import PeerBroadcaster
    from libp2p.discovery.mdns.listener import PeerListener
    from zeroconf import IPVersion, Zeroconf

_log = logging.getLogger("sharedllm.mesh.mdns")
MAX_FOUND = 64
_MAX_ADDRESS_CHARS = 200


def service_type(mesh_public_key: bytes) -> str:
    """The mesh's mDNS service type: nodes of other meshes browse other types (a DNS-SD
    service name has at most 15 characters)."""
    return f"_sllm{hashlib.sha256(mesh_public_key).hexdigest()[:10]}._udp.local."


class LanDiscovery:
    """Announces our addresses and collects those that members of the same mesh announce."""

    def __init__(self, peer_id: str) -> None:
        self._peer_id = peer_id
        self._found: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()  # zeroconf reports from its own thread

    def found(self) -> list[str]:
        """Announced multiaddrs (with /p2p/ ids), newest first."""
        with self._lock:
            return list(reversed(self._found))

    def on_found(self, peer_info: Any) -> None:
        peer = str(peer_info.peer_id)
        if peer == self._peer_id:
            return
        with self._lock:
            for address in peer_info.addrs[:8]:
                text = f"{address}/p2p/{peer}"
                if len(text) > _MAX_ADDRESS_CHARS:
                    continue
                self._found.pop(text, None)
                self._found[text] = None
                while len(self._found) > MAX_FOUND:
                    self._found.popitem(last=False)


@asynccontextmanager
async def lan_discovery(
    peer_id: str, mesh_public_key: bytes, addresses: Sequence[str], interface_ips: Sequence[str]
) -> AsyncIterator[LanDiscovery]:
    """Runs mDNS on `interface_ips` (never on others) while the block runs."""
    discovery = LanDiscovery(peer_id)
    kind = service_type(mesh_public_key)
    version = IPVersion.V4Only if all(":" not in ip for ip in interface_ips) else IPVersion.All
    zeroconf = await trio.to_thread.run_sync(
        lambda: Zeroconf(interfaces=list(interface_ips), ip_version=version)
    )
    name = f"{peer_id[-20:]}.{kind}"
    broadcaster = PeerBroadcaster(zeroconf, kind, name, peer_id, 0, list(addresses))
    peerDiscovery.register_peer_discovered_handler(discovery.on_found)
    listener = None
    try:
        await trio.to_thread.run_sync(broadcaster.register)
        listener = PeerListener(_NoPeerstore(), zeroconf, kind, name)  # type: ignore[arg-type]
        _log.info("looking for members on the LAN by mDNS (%s)", ", ".join(interface_ips))
        yield discovery
    finally:
        peerDiscovery.unregister_peer_discovered_handler(discovery.on_found)
        with trio.CancelScope(shield=True):
            if listener is not None:
                listener.stop()
            await trio.to_thread.run_sync(broadcaster.unregister)
            await trio.to_thread.run_sync(zeroconf.close)


class _NoPeerstore:
    """The listener also fills a libp2p peerstore; our host must not dial from it (only the
    mesh dials, after choosing), so its notes go nowhere."""

    def add_addrs(self, *_args: object) -> None:
        return

    def clear_addrs(self, *_args: object) -> None:
        return
