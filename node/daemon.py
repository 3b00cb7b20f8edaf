"""`sharedllm-node up`: the node's tasks wired together.

The mesh (libp2p control plane, TLS data plane, gossip), this node's part in serving the mesh's
models, and the OpenAI-compatible API that any client can call, all in one trio run.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import signal
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import trio

from ..mesh.addresses import host_of_multiaddr, only_this_machine
from ..mesh.atomic_file import write_atomic
from ..mesh.containment import HandlerFaults, contained
from ..mesh.membership import Revocation
from ..mesh.membership_state import MembershipState
from ..mesh.mesh_store import (
    MeshStoreError,
    load_known_peers,
    load_revocations,
    save_addresses,
    save_known_peers,
    save_mesh,
    save_revocation,
)
from ..mesh.service import MeshService
from ..mesh.timing import MeshTiming
from ..mesh.transport.data_plane import CARRIED, DataPlane
from ..mesh.transport.interfaces import local_interfaces
from ..mesh.transport.lan_discovery import LanDiscovery, lan_discovery
from ..mesh.transport.libp2p_adapter import check_port_free, open_libp2p_transport
from ..mesh.transport.libp2p_relay import RelayOptions
from ..mesh.transport.seam import MeshStream, TransportError
from .api.app import create_app
from .api.metrics import NodeMetrics
from .api.server import listen_api, serve_api
from .config import NodeConfig
from .daemon_files import clear_running, record_running
from .engine.locate import EngineInfo, detect_backend
from .engine.native_build import load_native_relay
from .engine_share import ENGINE, EngineShare, engine_offer
from .mesh_setup import MeshPlan, make_invite
from .network_paths import (
    forward_ports,
    keep_relay_slots,
    relay_facts,
    warn_relayed_links,
    with_paths,
)
from .serving.jobs import LocalModel
from .serving.mesh_serving import MeshServing

_log = logging.getLogger("sharedllm.node")
_UPSTREAM_TIMEOUT = httpx.Timeout(connect=5.0, read=900.0, write=60.0, pool=30.0)


@dataclass(frozen=True)
class MeshOptions:
    plan: MeshPlan
    listen: tuple[str, ...]
    peers: tuple[str, ...]
    node_name: str
    data_dir: Path
    capacity: Callable[[], dict[str, Any]]
    invite_file: Path | None = None  # where to write an invite once running (admins)
    invite_uses: int = 8


async def run_node(
    config: NodeConfig,
    engine: EngineInfo,
    models: Sequence[LocalModel],
    mesh: MeshOptions,
    *,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serves until SIGINT/SIGTERM; everything it started is stopped before it returns."""
    try:
        await _run_node(config, engine, models, mesh, task_status)
    finally:
        clear_running(mesh.data_dir)


async def _run_node(
    config: NodeConfig,
    engine: EngineInfo,
    models: Sequence[LocalModel],
    mesh: MeshOptions,
    task_status: trio.TaskStatus[str],
) -> None:
    plan = mesh.plan
    async with (
        httpx.AsyncClient(timeout=_UPSTREAM_TIMEOUT) as client,
        open_libp2p_transport(
            plan.identity, mesh.listen, RelayOptions(serves=config.relay)
        ) as transport,
        _lan_discovery(config, plan, transport.listen_addrs()) as lan,
    ):
        membership = MembershipState(plan.files.mesh_public_key)
        faults = HandlerFaults(trio.current_time)  # one count for both planes' handlers
        data_plane = DataPlane(
            plan.identity, plan.files.proof, membership.admit_encoded, faults=faults
        )
        serving: MeshServing | None = None

        backend = detect_backend()
        offer = engine_offer(engine, backend)

        def describe_self() -> dict[str, Any]:
            fields = {} if serving is None else serving.gossip_fields()
            return {**mesh.capacity(), **fields, **relay_facts(transport, config.relay), **offer}

        service = MeshService(
            transport=transport,
            identity=plan.identity,
            membership=membership,
            data_plane=data_plane,
            proof=plan.files.proof,
            name=mesh.node_name,
            describe_self=describe_self,
            wall_clock=time.time,
            rng=random.Random(),
            faults=faults,
            timing=MeshTiming(forget_gone_after_s=config.forget_gone_peers_after_s),
            interfaces=local_interfaces,
            discovered=tuple if lan is None else lan.found,
            on_new_proof=lambda proof: save_mesh(
                mesh.data_dir, dataclasses.replace(plan.files, proof=proof)
            ),
        )
        transport.relay.is_member = service.admitted.__contains__

        async def carry(peer: str) -> MeshStream:
            await service.reach(peer)
            return await transport.open_stream(peer, CARRIED)

        data_plane.carrier = carry
        transport.serve(CARRIED, contained("control", CARRIED, data_plane.serve_carried, faults))
        if offer:
            data_plane.serve(ENGINE, EngineShare(config.cache_dir, backend).serve)
        serving = MeshServing(
            service=service,
            data_plane=data_plane,
            engine=engine,
            config=config,
            local_models=models,
            client=client,
            native_relay=await load_native_relay(
                config.cache_dir,
                config.native_relay,
                engine_on_gpus=bool(mesh.capacity().get("vram_total")),
            ),
        )
        revocation_files: set[str] = set()  # read already: the keeper reads only new ones
        for revocation in load_revocations(mesh.data_dir, revocation_files):
            service.membership.add_revocation(revocation)
        save_addresses(mesh.data_dir, list(transport.listen_addrs()))
        _log.info(
            "mesh %s: peer id %s, listening on %s",
            plan.files.name,
            plan.identity.peer_id,
            ", ".join(transport.listen_addrs()),
        )

        def mesh_view() -> dict[str, Any]:
            assert serving is not None
            return {
                "peer_id": plan.identity.peer_id,
                "mesh": plan.files.name,
                "peers": with_paths(service.peers(), transport, data_plane),
                "models": warn_relayed_links(serving.describe(), service.member_states()),
                "tunnels_served": serving.served_tunnels(),
                "api_traffic": metrics.traffic(),
                "control_traffic": dataclasses.asdict(service.traffic),
                "gossiped_states": dataclasses.asdict(service.store.stats),
                "data_plane_refused": data_plane.refused_connections,
                "data_plane_refused_handshakes": data_plane.refused_handshakes,
                "handler_faults": faults.as_rows(),
            }

        metrics = NodeMetrics(mesh_view)
        app = create_app(serving, mesh_view, metrics, config.api_key, config.cors_origins)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_stop_on_signal, nursery.cancel_scope, service)
            api_url = await nursery.start(serve_api, app, config)
            hosts, port = data_endpoint(config, mesh.listen)
            await nursery.start(data_plane.run, hosts, port, local_interfaces())
            _log.info(
                "data plane listening on %s, port %d (advertised: %s)",
                ", ".join(hosts),
                data_plane.address[1] if data_plane.address else port,
                ", ".join(f"{h}:{p}" for h, p in data_plane.advertised or ()),
            )
            known = load_known_peers(mesh.data_dir)
            nursery.start_soon(service.run, [*mesh.plan.bootstrap, *mesh.peers, *known])
            nursery.start_soon(_remember_peers, service, mesh.data_dir)
            nursery.start_soon(serving.run)
            nursery.start_soon(_keep_revocations, service, mesh.data_dir, revocation_files)
            if not config.relay:
                nursery.start_soon(keep_relay_slots, service, transport)
            mesh_port = mesh_port_of(mesh.listen)
            if config.upnp and mesh_port and _lan_ips(transport.listen_addrs()):
                nursery.start_soon(forward_ports, service, transport, data_plane, mesh_port)
            offered = ", ".join(m.model_id for m in models) or "no model of its own"
            _log.info("OpenAI-compatible API at %s/v1 (this node offers %s)", api_url, offered)
            record_running(mesh.data_dir, api_url)
            if mesh.invite_file is not None:
                _write_invite(mesh, mesh.invite_file, list(transport.listen_addrs()))
            task_status.started(api_url)


def _write_invite(mesh: MeshOptions, path: Path, addresses: list[str]) -> None:
    """An invite for `invite_uses` joiners, valid for a day, written where the joiners of a
    container stack read it (`up --join @FILE`)."""
    try:
        token = make_invite(
            mesh.data_dir, addresses, uses=mesh.invite_uses, expires_in_s=86400, now=time.time()
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, token.encode() + b"\n", mode=0o600)
    except (MeshStoreError, OSError, ValueError) as err:
        _log.error("cannot write an invite to %s: %s", path, err)
        return
    _log.info("invite for %d nodes written to %s", mesh.invite_uses, path)


async def _remember_peers(service: MeshService, data_dir: Path) -> None:
    """Keeps the members' addresses on disk, for the next start."""
    saved: list[str] = []
    while True:
        await trio.sleep(5.0)
        addresses = service.member_addresses()
        if addresses and addresses != saved:
            save_known_peers(data_dir, addresses)
            saved = addresses


async def _keep_revocations(service: MeshService, data_dir: Path, tried: set[str]) -> None:
    """Every node keeps every revocation it learns, one file each; revocations that
    `sharedllm-node revoke` writes there while the node runs are picked up (only files not
    read before are)."""
    while True:
        learned = [r for r in service.take_unsaved_revocations() if r.peer_id not in tried]
        tried.update(revocation.peer_id for revocation in learned)
        try:
            await trio.to_thread.run_sync(_save_learned, data_dir, learned)
        except OSError as err:
            _log.error("cannot save revocations in %s: %s", data_dir, err)
        for revocation in load_revocations(data_dir, tried):
            service.learn_revocation(revocation)
        await trio.sleep(1.0)


def _save_learned(data_dir: Path, revocations: list[Revocation]) -> None:
    for revocation in revocations:
        save_revocation(data_dir, revocation, sync=False)


def check_ports_free(config: NodeConfig, listen: tuple[str, ...]) -> None:
    """Refuses a busy API or mesh port before any slow start-up work (finding and timing the
    engine takes seconds); raises ApiBindError or TransportError with the one-line reason."""
    listen_api(config.api_host, config.api_port).close()
    for address in listen:
        check_port_free(address)
    hosts, port = data_endpoint(config, listen)
    for host in hosts if port else []:
        family = "ip6" if ":" in host else "ip4"
        check_port_free(f"/{family}/{host}/tcp/{port}", "--data-port")


@asynccontextmanager
async def _lan_discovery(
    config: NodeConfig, plan: MeshPlan, addresses: Sequence[str]
) -> AsyncIterator[LanDiscovery | None]:
    """mDNS on the mesh's non-loopback interfaces, unless turned off or there are none."""
    lan_ips = _lan_ips(addresses)
    if not config.mdns or not lan_ips:
        yield None
        return
    try:
        opened = lan_discovery(
            plan.identity.peer_id, plan.files.mesh_public_key, addresses, lan_ips
        )
        discovery = await opened.__aenter__()
    except Exception as err:  # noqa: BLE001 - mDNS is optional; zeroconf raises many kinds
        _log.warning("no LAN discovery (mDNS): %s", err)
        yield None
        return
    try:
        yield discovery
    finally:
        await opened.__aexit__(None, None, None)


def _lan_ips(addresses: Sequence[str]) -> list[str]:
    """The hosts of `addresses` that other machines could reach (not loopback)."""
    hosts = [host_of_multiaddr(a) for a in addresses]
    return [h for h in dict.fromkeys(hosts) if h is not None and not only_this_machine([h])]


def mesh_port_of(listen: Sequence[str]) -> int:
    """The first listen address's TCP port (0: none, or any free one)."""
    parts = listen[0].strip("/").split("/") if listen else []
    return int(parts[3]) if len(parts) > 3 and parts[2] == "tcp" and parts[3].isdigit() else 0


def data_endpoint(config: NodeConfig, listen: Sequence[str]) -> tuple[list[str], int]:
    """Where the data plane listens: on the mesh's interfaces, at `data_port` or the first
    mesh port + 1 (a free port when the mesh's is 0). Raises TransportError if there is none."""
    hosts = [host_of_multiaddr(a) or "0.0.0.0" for a in listen] or ["0.0.0.0"]
    if config.data_port is not None:
        return hosts, config.data_port
    mesh_port = mesh_port_of(listen)
    if mesh_port >= 65535:
        raise TransportError(f"the mesh port {mesh_port} leaves no port above it: set --data-port")
    return hosts, mesh_port + 1 if mesh_port else 0


async def _stop_on_signal(scope: trio.CancelScope, service: MeshService) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for received in signals:
            _log.info("received %s; leaving the mesh and stopping", signal.Signals(received).name)
            with trio.move_on_after(3.0):
                await service.leave()
            scope.cancel()
            return
