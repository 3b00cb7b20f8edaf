"""What the parts of `MeshServing` (its primary role, worker role and API routing) share."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Protocol

import httpx
import trio

from ...mesh.claims import Claim
from ...mesh.election import Elector, ModelState
from ...mesh.probing import data_addresses
from ...mesh.service import MeshService
from ...mesh.transport.data_plane import DataPlane
from ...mesh.transport.engine_handoff import engine_env, handoff_possible
from ...mesh.transport.native_relay import NativeRelay
from ...mesh.transport.seam import MeshStream, TransportError
from ...mesh.transport.tunnel import (
    TUNNEL,
    OpenStream,
    TunnelListener,
)
from ...mesh.transport.tunnel_stats import (
    TunnelStats,
)
from ..config import NodeConfig
from ..engine.locate import EngineInfo
from ..engine.sealed_patch import SEALED_PATCH_NAME
from ..weights.warm_start import WeightFiller
from .draft_meter import DraftMeter
from .jobs import Job, LocalModel
from .offered_recently import RecentlyOffered
from .reconciler import ApiTunnelKey, JobKey
from .replica_choice import InFlight

_log = logging.getLogger("sharedllm.serving")
Rank = tuple[int, str]  # a claim's (epoch, primary)
STEP_S = 0.5
ENGINE_ENV = {"GGML_RPC_NO_RDMA": "1"}


class ServingParts(Protocol):
    """What the roles of `MeshServing` share: its state and a few helpers."""

    _service: MeshService
    _data_plane: DataPlane
    _engine: EngineInfo
    _config: NodeConfig
    _local: dict[str, LocalModel]
    _client: httpx.AsyncClient
    _me: str
    _native_relay: NativeRelay | None
    _engine_seals: bool  # engines take rpc tunnels to seal themselves (engine_handoff.py)
    elector: Elector
    model_states: dict[str, ModelState]  # each model's first replica, by model id
    unit_states: dict[str, ModelState]  # every replica of every model, by unit
    _in_flight: InFlight
    _drafts: DraftMeter
    replans: dict[str, int]
    _primary_jobs: dict[JobKey, Job]
    _worker_jobs: dict[JobKey, Job]
    _accepting: set[JobKey]
    _winding: set[JobKey]
    _filled: dict[JobKey, trio.Event]
    _llama_cache: Path
    _filler: WeightFiller
    _worker_streams: dict[str, list[tuple[Rank, trio.CancelScope]]]
    _api_tunnels: dict[ApiTunnelKey, tuple[TunnelListener, trio.CancelScope]]
    worker_stats: dict[str, TunnelStats]
    _nursery: trio.Nursery | None
    _changed: trio.Event
    _socket_dir: Path | None
    _engines_started: int
    _recently_offered: RecentlyOffered
    aliases: dict[str, str]  # another name -> model id, from the holders' gossip
    kinds: dict[str, str]  # model id -> what it is for, from the holders' gossip

    def _start_job(self, runner: Callable[[Job], Awaitable[None]], claim: Claim) -> Job:
        assert self._nursery is not None
        job = Job(claim, trio.CancelScope())
        self._nursery.start_soon(runner, job)
        return job

    def _opener(self, peer: str, protocol: str = TUNNEL) -> OpenStream:
        async def open_stream() -> MeshStream:
            addresses = data_addresses(self._service.store.states.get(peer))
            if not addresses:
                raise TransportError(f"{peer} has not gossiped a data address")
            return await self._data_plane.connect(peer, addresses, protocol)

        return open_stream

    def _name_of(self, peer: str) -> str:
        state = self._service.store.states.get(peer)
        content = None if state is None else self._service.content_of(state)
        name = None if content is None else content.get("name")
        return f"{name} ({peer[-8:]})" if isinstance(name, str) else peer[-8:]

    def _engine_env(self, handoff_path: str | None) -> dict[str, str]:
        """An engine's environment; with a handoff socket (where engines seal tunnels here)."""
        return {**ENGINE_ENV, **(engine_env(handoff_path) if handoff_path else {})}

    def _rpc_handoff_path(self, port: int | str) -> Path | None:
        """Where the rpc-server listening on loopback `port` takes tunnels to seal itself."""
        if not self._engine_seals or self._socket_dir is None:
            return None
        return self._socket_dir / f"rpc-{port}.sock"


def engine_seals(engine: EngineInfo, config: NodeConfig, native: NativeRelay | None) -> bool:
    """Whether this node's engines seal rpc tunnels themselves: wanted, our engine change built
    in, and tunnels native here (the keys come from the native relay's handshake)."""
    return (
        config.engine_seals
        and native is not None
        and SEALED_PATCH_NAME in engine.changes.split(",")
        and handoff_possible()
    )
