"""Which way each member is reached (direct, relayed, hole-punched), relay slots kept at relay
members, ports forwarded by the router (UPnP), and the status warning for a placement whose
layers cross a relayed link."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import trio

from ..mesh.service import MeshService
from ..mesh.transport.data_plane import DataPlane
from ..mesh.transport.libp2p_adapter import Libp2pTransport
from ..mesh.transport.port_mapping import mapped_ports

_log = logging.getLogger("sharedllm.node")
GOSSIPED_RELAYED = 32  # peers reached through a relay, listed in our state at most
RELAY_CHECK_S = 10.0


def relay_facts(transport: Libp2pTransport, serves_relay: bool) -> dict[str, Any]:
    """What our gossiped state says of relaying: whether we relay for members, and the peers
    we reach only through a relay (so that every node can warn of a split across one)."""
    relayed = [
        peer
        for peer in sorted(transport.connected_peers())
        if transport.path_to(peer)[0] == "relayed"
    ]
    return {"relay": serves_relay, "relayed": relayed[:GOSSIPED_RELAYED]}


def relay_members(states: Mapping[str, Mapping[str, Any]], me: str) -> list[str]:
    """Members that gossip they relay, by peer id (the same order on every node)."""
    return sorted(p for p, content in states.items() if p != me and content.get("relay") is True)


async def keep_relay_slots(service: MeshService, transport: Libp2pTransport) -> None:
    """Keeps reservations at relay members we are connected to, so that members who cannot
    dial us directly reach us through them; republishes our addresses when they change."""
    known: list[str] = []
    while True:
        await trio.sleep(RELAY_CHECK_S)
        relays = [
            p
            for p in relay_members(service.member_states(), service.identity.peer_id)
            if p in service.admitted
        ]
        circuits = await transport.relay.keep_reservations(relays)
        if circuits != known:
            known = circuits
            await service.publish_now()


def with_paths(
    rows: list[dict[str, Any]], transport: Libp2pTransport, data_plane: DataPlane
) -> list[dict[str, Any]]:
    """`peers` rows with the path in use to each member and its address, control and data."""
    me = transport.local_peer_id
    for row in rows:
        peer = row.get("peer_id")
        if not isinstance(peer, str) or peer == me:
            continue
        row["path"], row["path_address"] = transport.path_to(peer)
        row["data_path"] = data_plane.path_to(peer)
    return rows


def warn_relayed_links(
    models: dict[str, Any], states: Mapping[str, Mapping[str, Any]]
) -> dict[str, Any]:
    """Adds `relayed_links` [[primary, worker], ...] to each model whose placement has a worker
    its primary reaches only through a relay (as the primary gossips it)."""
    for entry in models.values():
        primary = entry.get("primary")
        content = states.get(primary) if isinstance(primary, str) else None
        relayed = content.get("relayed") if content is not None else None
        if not isinstance(relayed, list):
            continue
        workers = [a.get("node") for a in entry.get("assignments", ())]
        entry["relayed_links"] = [[primary, w] for w in workers if w in relayed and w != primary]
    return models


async def forward_ports(
    service: MeshService,
    transport: Libp2pTransport,
    data_plane: DataPlane,
    mesh_port: int,
) -> None:
    """Asks the router (UPnP) to forward the mesh and data ports for as long as the node runs,
    and advertises its public address where it does."""
    data_port = data_plane.address[1] if data_plane.address else 0
    ports = [port for port in (mesh_port, data_port) if port]
    async with mapped_ports(ports) as mapping:
        if mapping is not None:
            if mesh_port in mapping.ports:
                transport.public.append(f"/ip4/{mapping.external_ip}/tcp/{mesh_port}")
            if data_port in mapping.ports:
                data_plane.advertise_public(mapping.external_ip, data_port)
            await service.publish_now()
        await trio.sleep_forever()
