"""The worker's role: rpc-servers for placements, their weights, and the tunnels to them."""

from __future__ import annotations

import logging
import os
from collections.abc import Collection, Mapping
from typing import Protocol

import trio

from ...mesh.transport.seam import MeshStream
from ...mesh.transport.tunnel import TunnelRefused, TunnelRequest, serve_tunnel
from ...mesh.transport.tunnel_stats import TunnelStats
from ..engine.locate import free_loopback_port
from ..engine.supervisor import ProcessSpec, Supervisor
from ..weights.share_wire import WEIGHTS
from ..weights.warm_start import READY_ANSWER
from .jobs import Job, accepts_tcp, offered_sha256
from .parts import ServingParts
from .reconciler import JobKey, WorkerStart

_log = logging.getLogger("sharedllm.serving")
_CLAIM_WAIT_S = 5.0  # a worker waits this long for a new claim to reach it by gossip
_WORKER_READY_WAIT_S = 30.0
_FILL_WAIT_S = 1800.0  # the longest a worker's cache may take to fill
# How often the waits below look again: each is a lookup, and a primary's load waits on them.
_LOOK_S = 0.02


class WorkerRole(ServingParts):
    """A worker of placements: an rpc-server on loopback per placement, its weight cache
    filled, reached only through tunnels its primary opens."""

    def _start_worker(self, start: WorkerStart) -> None:
        """Starts the rpc-server for a placement, or hands it the one of the placement it
        replaces (as the reconciler chose), then fills its cache."""
        key, claim = start.key, start.claim
        if start.replaces is None:
            self._worker_jobs[key] = self._start_job(self._run_worker, claim)
        else:
            job = self._worker_jobs.pop(start.replaces)
            job.claim = claim
            self._worker_jobs[key] = job
        first, last = next((a, b) for n, a, b in claim.layers if n == self._me)
        assert self._nursery is not None
        self._nursery.start_soon(self._fill, key, first, last)
        _log.info(
            "model %s: holding layers %d-%d for primary %s (epoch %d)",
            claim.model_id,
            first,
            last,
            claim.primary,
            claim.epoch,
        )

    async def _fill(self, key: JobKey, first: int, last: int) -> None:
        """Fills the weight cache for our layers of a placement, if we hold the model."""
        done = self._filled[key] = trio.Event()
        model = self._local.get(key[0])
        try:
            if model is not None:
                await self._filler.fill(key[0], model.path, first, last)
            else:
                holders = self._holders_of(key[0], primary=key[1][1])
                await self._filler.fetch(
                    key[0], holders, self._weights_stream, range(first, last + 1)
                )
        finally:
            done.set()

    def _holders_of(self, model_id: str, primary: str) -> list[str]:
        """Nodes to fetch a model's weights from: the primary (it loads that very file), then
        the other nodes offering a file of the same content."""
        states = self._service.member_states()
        wanted = offered_sha256(states.get(primary, {}), model_id)
        others = [
            origin
            for origin, content in states.having("models")
            if origin not in (primary, self._me)
            and wanted is not None
            and offered_sha256(content, model_id) == wanted
        ]
        return [primary, *others]

    async def _weights_stream(self, peer: str) -> MeshStream:
        return await self._opener(peer, WEIGHTS)()

    async def _ready_for(self, request: TunnelRequest, peer: str) -> bytes:
        """Waits until this worker's rpc-server for `peer`'s placement is up and its cache
        filled (bounded); the answer to the primary's ready check."""
        key = (request.model_id, (request.epoch, peer))
        with trio.move_on_after(_CLAIM_WAIT_S):
            while key not in self._accepting:
                await trio.sleep(_LOOK_S)
        with trio.move_on_after(_FILL_WAIT_S):
            while key in self._accepting:
                filled, job = self._filled.get(key), self._worker_jobs.get(key)
                if filled is not None and filled.is_set() and job and job.endpoint():
                    return READY_ANSWER
                await trio.sleep(_LOOK_S)
        return f"not a ready worker of {request.model_id} epoch {request.epoch} here".encode()

    async def _run_worker(self, job: Job) -> None:
        cache = self._llama_cache
        cache.mkdir(parents=True, exist_ok=True)
        threads = self._config.threads or os.cpu_count() or 1

        def spec() -> ProcessSpec:
            port = free_loopback_port()
            argv = [str(self._engine.rpc_server), "-H", "127.0.0.1", "-p", str(port)]
            argv += ["-c", "-t", str(threads)]
            handoff = self._rpc_handoff_path(port)
            env = self._engine_env(None if handoff is None else str(handoff))
            env["LLAMA_CACHE"] = str(cache)
            return ProcessSpec("ggml-rpc-server", tuple(argv), env, f"127.0.0.1:{port}")

        with job.scope:
            job.supervisor = Supervisor(spec, accepts_tcp, logger=_log, ready_timeout_s=30.0)
            await job.supervisor.run()

    async def _serve_tunnel(self, stream: MeshStream) -> None:
        """Connects a tunnel to a local engine; an rpc tunnel is cut when its primary is fenced."""
        scope = trio.CancelScope()
        registered: list[tuple[tuple[int, str], trio.CancelScope]] | None = None

        async def target(request: TunnelRequest, peer: str) -> str:
            nonlocal registered
            endpoint = await self._tunnel_target(request, peer)
            if request.service == "rpc":
                registered = self._worker_streams.setdefault(request.model_id, [])
                registered.append(((request.epoch, peer), scope))
            return endpoint

        stats = self.worker_stats.setdefault(stream.remote_peer, TunnelStats())
        try:
            with scope:
                await serve_tunnel(stream, target, stats, self._native_relay, self._handoff_of)
        finally:
            if registered is not None:
                registered[:] = [entry for entry in registered if entry[1] is not scope]

    async def _tunnel_target(self, request: TunnelRequest, peer: str) -> str:
        if request.service == "api":
            endpoint = api_endpoint(
                self._primary_jobs, self._winding, self._me, request.model_id, request.epoch
            )
            if endpoint is None:
                raise TunnelRefused(f"this node does not serve {request.model_id} now")
            return endpoint
        if request.service != "rpc":
            raise TunnelRefused(f"unknown tunnel service {request.service!r}")
        with trio.move_on_after(_CLAIM_WAIT_S):
            while not self._leads(request, peer):
                await trio.sleep(_LOOK_S)
        if not self._leads(request, peer):
            raise TunnelRefused(
                f"{peer} is not the primary of {request.model_id} epoch {request.epoch} here"
            )
        key = (request.model_id, (request.epoch, peer))
        with trio.move_on_after(_WORKER_READY_WAIT_S):
            while (job := self._worker_jobs.get(key)) is None or (
                endpoint := job.endpoint()
            ) is None:
                await trio.sleep(_LOOK_S)
            return endpoint
        raise TunnelRefused(f"the rpc-server for {request.model_id} is not ready")

    def _handoff_of(self, endpoint: str) -> str | None:
        """The handoff socket of the rpc-server at `endpoint`, where it takes tunnels."""
        host, _, port = endpoint.rpartition(":")
        path = self._rpc_handoff_path(port) if host == "127.0.0.1" and port.isdigit() else None
        return str(path) if path is not None and path.exists() else None

    def _leads(self, request: TunnelRequest, peer: str) -> bool:
        """Whether `peer` leads a placement of the model that this node serves in now."""
        return (request.model_id, (request.epoch, peer)) in self._accepting


class _Engine(Protocol):
    verified: bool

    def endpoint(self) -> str | None: ...


def api_endpoint(
    jobs: Mapping[JobKey, _Engine],
    winding: Collection[JobKey],
    me: str,
    model_id: str,
    epoch: int,
) -> str | None:
    """The engine for an API request of `model_id` at `epoch` (of the jobs this node leads):
    that placement's, or, when the sender's view is behind (this node re-planned and leads a
    newer epoch of the model), the newest placement of it here that takes requests."""
    exact = jobs.get((model_id, (epoch, me)))
    if exact is not None and exact.verified and (found := exact.endpoint()) is not None:
        return found
    newer = sorted(
        (key for key in jobs if key[0] == model_id and key[1][0] > epoch and key not in winding),
        key=lambda key: -key[1][0],
    )
    for key in newer:
        job = jobs[key]
        if key[1][1] == me and job.verified and (found := job.endpoint()) is not None:
            return found
    return None
