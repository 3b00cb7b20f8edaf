"""`sharedllm-node up`: one node serving a model on its OpenAI-compatible port.

The node supervises its own llama-server and routes API requests to it. The router is the seam
where the mesh will later send requests to whichever peer is the model's primary.
"""

from __future__ import annotations

import logging
import random
import signal
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve

from ..mesh.data_plane import DataPlane
from ..mesh.libp2p_transport import open_libp2p_transport
from ..mesh.membership import MembershipState
from ..mesh.mesh_store import load_revocations, save_addresses
from ..mesh.service import MeshService
from .config import NodeConfig
from .engine import EngineInfo, free_loopback_port
from .http_api import ModelEntry, ModelNotFound, create_app
from .mesh_setup import MeshPlan
from .supervisor import ProcessSpec, ServiceState, Supervisor
from .upstream import HttpUpstream, Upstream, UpstreamUnavailable

_log = logging.getLogger("sharedllm.node")
_UPSTREAM_TIMEOUT = httpx.Timeout(connect=5.0, read=900.0, write=60.0, pool=30.0)


class ApiBindError(Exception):
    """The API port could not be opened."""


@dataclass(frozen=True)
class ServedModel:
    model_id: str
    path: Path
    created: int


def llama_server_spec(
    engine: EngineInfo, model: ServedModel, config: NodeConfig, port: int
) -> ProcessSpec:
    """Arguments for a llama-server that serves `model` alone, on loopback only."""
    argv = [
        str(engine.llama_server),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--model",
        str(model.path),
        "--alias",
        model.model_id,
        "--ctx-size",
        str(config.context_size),
        "--no-webui",
    ]
    if config.threads is not None:
        argv += ["--threads", str(config.threads)]
    return ProcessSpec(name="llama-server", argv=tuple(argv), endpoint=f"127.0.0.1:{port}")


class LocalEngineRouter:
    """Routes every request for the node's model to its own supervised llama-server."""

    def __init__(
        self, model: ServedModel, supervisor: Supervisor, client: httpx.AsyncClient
    ) -> None:
        self._model = model
        self._supervisor = supervisor
        self._client = client

    def models(self) -> Sequence[ModelEntry]:
        return [ModelEntry(self._model.model_id, self._model.created)]

    def route(self, model_id: str) -> Upstream:
        if model_id != self._model.model_id:
            raise ModelNotFound(model_id)
        spec = self._supervisor.ready_spec
        if self._supervisor.state is not ServiceState.READY or spec is None:
            raise UpstreamUnavailable(self._state_in_words())
        return HttpUpstream(self._client, f"http://{spec.endpoint}")

    def health(self) -> tuple[bool, dict[str, str]]:
        ready = self._supervisor.state is ServiceState.READY
        return ready, {self._model.model_id: "ready" if ready else self._state_in_words()}

    def _state_in_words(self) -> str:
        state = self._supervisor.state
        if state is ServiceState.WAITING_TO_RESTART:
            return "engine restarting after a failure"
        if state is ServiceState.STARTING:
            return "engine loading the model"
        return str(state.value)


@dataclass(frozen=True)
class MeshOptions:
    plan: MeshPlan
    listen: tuple[str, ...]
    peers: tuple[str, ...]
    node_name: str
    data_dir: Path
    capacity: Callable[[], dict[str, Any]]


async def run_node(
    config: NodeConfig,
    engine: EngineInfo,
    model: ServedModel,
    mesh: MeshOptions,
    *,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serves until SIGINT/SIGTERM; everything it started is stopped before it returns."""
    plan = mesh.plan
    async with (
        httpx.AsyncClient(timeout=_UPSTREAM_TIMEOUT) as client,
        open_libp2p_transport(plan.identity, mesh.listen) as transport,
    ):
        membership = MembershipState(plan.files.mesh_public_key)
        data_plane = DataPlane(plan.identity, plan.files.proof, membership.admit)
        service = MeshService(
            transport=transport,
            identity=plan.identity,
            membership=membership,
            data_plane=data_plane,
            proof=plan.files.proof,
            name=mesh.node_name,
            describe_self=mesh.capacity,
            wall_clock=time.time,
            rng=random.Random(),
        )
        for revocation in load_revocations(mesh.data_dir):
            service.membership.add_revocation(revocation)
        save_addresses(mesh.data_dir, list(transport.listen_addrs()))
        _log.info(
            "mesh %s: peer id %s, listening on %s",
            plan.files.name,
            plan.identity.peer_id,
            ", ".join(transport.listen_addrs()),
        )

        async def is_ready(spec: ProcessSpec) -> bool:
            try:
                answer = await client.get(f"http://{spec.endpoint}/health", timeout=2.0)
            except httpx.HTTPError:
                return False
            return answer.status_code == 200

        supervisor = Supervisor(
            lambda: llama_server_spec(engine, model, config, free_loopback_port()),
            is_ready,
            logger=_log,
            ready_timeout_s=config.engine_load_timeout_s,
        )

        def mesh_view() -> dict[str, Any]:
            return {
                "peer_id": plan.identity.peer_id,
                "mesh": plan.files.name,
                "peers": service.peers(),
            }

        app = create_app(LocalEngineRouter(model, supervisor, client), mesh_view)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_stop_on_signal, nursery.cancel_scope, service)
            api_url = await nursery.start(_serve_api, app, config)
            nursery.start_soon(supervisor.run)
            data_host = _host_of(mesh.listen[0])
            await nursery.start(data_plane.run, data_host, 0, _host_of(transport.listen_addrs()[0]))
            nursery.start_soon(service.run, [*mesh.plan.bootstrap, *mesh.peers])
            nursery.start_soon(_watch_revocations, service, mesh.data_dir)
            _log.info("OpenAI-compatible API for model %s at %s/v1", model.model_id, api_url)
            task_status.started(api_url)


async def _watch_revocations(service: MeshService, data_dir: Path) -> None:
    """Picks up revocations that `sharedllm-node revoke` wrote while the node runs."""
    while True:
        for revocation in load_revocations(data_dir):
            service.membership.add_revocation(revocation)
        await trio.sleep(1.0)


async def _serve_api(
    app: object, config: NodeConfig, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED
) -> None:
    listener = _listen(config.api_host, config.api_port)
    hyper = HypercornConfig()
    hyper.bind = [f"fd://{listener.fileno()}"]  # hypercorn adopts the socket we opened
    hyper.accesslog = None
    hyper.errorlog = logging.getLogger("sharedllm.api.server")
    hyper.graceful_timeout = 2.0
    host, port = listener.getsockname()[:2]
    url = f"http://{_bracket(host)}:{port}"
    task_status.started(url)
    await serve(app, hyper)  # type: ignore[arg-type]


def _listen(host: str, port: int) -> socket.socket:
    """Opens the API socket here, so that a busy port is one clear error."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        listener = socket.socket(family, kind, proto)
    except OSError as err:
        raise ApiBindError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(address)
        listener.listen(128)
    except OSError as err:
        listener.close()
        raise ApiBindError(
            f"cannot listen on {host}:{port}: {err.strerror} (use --api-port to pick another port)"
        ) from None
    return listener


def _host_of(multiaddress: str) -> str:
    """The IP of an /ip4/... or /ip6/... multiaddr (the data plane listens beside libp2p)."""
    parts = multiaddress.strip("/").split("/")
    return parts[1] if len(parts) > 1 and parts[0] in ("ip4", "ip6") else "127.0.0.1"


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


async def _stop_on_signal(scope: trio.CancelScope, service: MeshService) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for received in signals:
            _log.info("received %s; leaving the mesh and stopping", signal.Signals(received).name)
            with trio.move_on_after(3.0):
                await service.leave()
            scope.cancel()
            return
