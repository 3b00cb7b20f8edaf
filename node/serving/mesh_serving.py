"""This node's part in serving the mesh's models, and the API router that finds their primaries.

Every half second the node runs the election on the live members' gossiped states, then makes
its processes match the outcome:

- as the primary of a claim: one tunnel listener per worker, and a llama-server whose `--rpc`
  lists those listeners in placement order; the claim is marked serving once the engine is
  ready and its log shows the layers where the plan put them;
- as a worker of the current claim: an rpc-server on loopback, reached only through tunnels
  opened by that claim's primary;
- as any node: API requests go to the local engine or through a tunnel to the primary.

A re-plan while serving switches make-before-break when the new primary found memory for both
placements at once: the old one serves until the new one does, then finishes the requests it
took (bounded) before its primary withdraws it. Otherwise the old placement stops at once and a
worker in both keeps its rpc-server, so the gap is only the new engine's load.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import trio

from ...mesh.election import Claim, Elector, ModelState
from ...mesh.mesh_store import load_epochs, save_epochs
from ...mesh.probing import data_address
from ...mesh.service import MeshService
from ...mesh.transport.data_plane import DataPlane
from ...mesh.transport.seam import MeshStream, TransportError
from ...mesh.transport.tunnel import (
    TUNNEL,
    OpenStream,
    TunnelListener,
    TunnelRefused,
    TunnelRequest,
    TunnelStats,
    serve_tunnel,
)
from ...scheduler.llama_args import LlamaSplitArgs, split_args
from ...scheduler.model_profile import profile_to_dict
from ..api.app import ModelEntry, ModelNotFound
from ..config import NodeConfig
from ..engine.devices import gossiped_device_count
from ..engine.load_report import LoadReport
from ..engine.locate import EngineInfo, free_loopback_port
from ..engine.rpc_traffic import RpcTally
from ..engine.supervisor import ProcessSpec, ServiceState, Supervisor
from ..engine.unix_socket import ENGINE_BASE_URL, engine_client, private_socket_dir, unix_endpoint
from ..models.model_file import ModelFileError, ModelInfo, cached_sha256
from ..weights.share import WEIGHTS, WeightShare
from ..weights.warm_start import READY, READY_ANSWER, WeightFiller, answer_ready, await_ready
from .offered_recently import RecentlyOffered
from .upstream import HttpUpstream, Upstream, UpstreamUnavailable

_log = logging.getLogger("sharedllm.serving")
Rank = tuple[int, str]  # a claim's (epoch, primary)
_STEP_S = 0.5
_CLAIM_WAIT_S = 5.0  # a worker waits this long for a new claim to reach it by gossip
_WORKER_READY_WAIT_S = 30.0
_FILL_WAIT_S = 1800.0  # the longest a primary waits for its workers to fill their caches
_HANDOVER_MIN_S = 1.0  # routers hear that the new placement serves before the old one stops
_HANDOVER_LIMIT_S = 60.0  # the longest a replaced engine may take to finish its requests
_ENGINE_ENV = {"GGML_RPC_NO_RDMA": "1"}


@dataclass(frozen=True)
class LocalModel:
    """A model file this node holds and offers to the mesh."""

    model_id: str
    info: ModelInfo
    created: int

    @property
    def path(self) -> Path:
        return self.info.path

    def gossip_entry(self, context: int, sha256: str | None) -> dict[str, Any]:
        entry = {
            "id": self.model_id,
            "size": self.info.size_bytes,
            "context": context,
            "profile": profile_to_dict(self.info.profile),
        }
        if sha256 is not None:
            entry["sha256"] = sha256
        return entry


@dataclass
class _Job:
    """A running role (primary or worker) for one model, stoppable on its own."""

    claim: Claim
    scope: trio.CancelScope
    supervisor: Supervisor | None = None
    problem: str | None = None
    verified: bool = False
    tunnels: dict[str, TunnelListener] = field(default_factory=dict)  # worker -> listener
    socket: Path | None = None  # the primary's llama-server listens here
    http: httpx.AsyncClient | None = None  # bound to `socket`
    requests: dict[str, RpcTally] = field(default_factory=dict)  # worker -> engine requests

    def engine_pids(self) -> tuple[int, ...]:
        """The job's engine process, while it runs: its tunnels carry its connections only."""
        pid = None if self.supervisor is None else self.supervisor.pid
        return () if pid is None else (pid,)

    def endpoint(self) -> str | None:
        """Where the job's process listens, once it is ready."""
        supervisor = self.supervisor
        if supervisor is None or supervisor.state is not ServiceState.READY:
            return None
        return None if supervisor.ready_spec is None else supervisor.ready_spec.endpoint


class MeshServing:
    def __init__(
        self,
        *,
        service: MeshService,
        data_plane: DataPlane,
        engine: EngineInfo,
        config: NodeConfig,
        local_models: Sequence[LocalModel],
        client: httpx.AsyncClient,
    ) -> None:
        self._service = service
        self._data_plane = data_plane
        self._engine = engine
        self._config = config
        self._local = {model.model_id: model for model in local_models}
        self._client = client
        self._me = service.identity.peer_id
        self.elector = Elector(self._me, highest_epoch=load_epochs(config.data_dir))
        self._saved_epochs = dict(self.elector.highest_epoch)
        self._recently_offered = RecentlyOffered()
        self.model_states: dict[str, ModelState] = {}
        self.replans: dict[str, int] = {}  # model -> placements replaced, as this node saw it
        self._last_rank: dict[str, tuple[int, str]] = {}  # model -> last placement seen
        # Jobs by (model, claim rank): two of one model run at once during a switch.
        self._primary_jobs: dict[tuple[str, Rank], _Job] = {}
        self._worker_jobs: dict[tuple[str, Rank], _Job] = {}
        self._accepting: set[tuple[str, Rank]] = set()  # rpc tunnels this worker takes now
        self._winding: set[tuple[str, Rank]] = set()
        self._filled: dict[tuple[str, Rank], trio.Event] = {}
        self._llama_cache = config.cache_dir / "rpc-cache"
        self._filler = WeightFiller(
            config.cache_dir, self._llama_cache, enabled=config.prefill_weights
        )
        self._share = WeightShare(
            {m.model_id: m.path for m in local_models}, config.cache_dir, config.weight_share_mbps
        )
        self._worker_streams: dict[str, list[tuple[tuple[int, str], trio.CancelScope]]] = {}
        self._api_tunnels: dict[tuple[str, int, str], tuple[TunnelListener, trio.CancelScope]] = {}
        self.worker_stats: dict[str, TunnelStats] = {}
        self._nursery: trio.Nursery | None = None
        self._changed = trio.Event()
        self._hashes: dict[str, str] = {}
        self._socket_dir: Path | None = None
        self._engines_started = 0

    # -- gossip ------------------------------------------------------------------------------

    def gossip_fields(self) -> dict[str, Any]:
        return {
            "models": [
                m.gossip_entry(self._config.context_size, self._hashes.get(m.model_id))
                for m in self._local.values()
            ],
            "claims": self.elector.gossiped_claims(),
            "problems": dict(sorted(self.elector.problems.items())),
        }

    # -- the loop ------------------------------------------------------------------------------

    async def run(self) -> None:
        self._data_plane.serve(TUNNEL, self._serve_tunnel)
        self._data_plane.serve(READY, lambda stream: answer_ready(stream, self._ready_for))
        self._data_plane.serve(WEIGHTS, self._share.serve)
        with private_socket_dir() as self._socket_dir:
            await self._serve_models()

    async def _serve_models(self) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._hash_models)
            while True:
                await self._step()
                with trio.move_on_after(_STEP_S):
                    await self._changed.wait()
                self._changed = trio.Event()

    async def _hash_models(self) -> None:
        """Hashes the offered files in a thread (minutes for big ones), then gossips the hashes."""
        for model in self._local.values():
            try:
                self._hashes[model.model_id] = await trio.to_thread.run_sync(
                    cached_sha256, model.path, self._config.cache_dir, abandon_on_cancel=True
                )
            except (OSError, ModelFileError) as err:
                _log.warning("model %s: cannot hash %s: %s", model.model_id, model.path, err)
        await self._service.publish_now()

    async def _step(self) -> None:
        before = self.elector.gossiped_claims()
        self.elector.note_epochs(self._service.claimants())
        self.model_states = self.elector.step(trio.current_time(), self._service.member_states())
        self._recently_offered.note(self.model_states, trio.current_time())
        self._count_replans()
        await self._save_epochs()
        self._reconcile_primary()
        self._reconcile_workers()
        self._close_stale_api_tunnels()
        for (model_id, _), job in self._primary_jobs.items():
            ready = job.endpoint() is not None and job.verified
            self.elector.set_serving(model_id, job.claim.epoch, ready)
        if self.elector.gossiped_claims() != before:
            own = [*self.elector.claims.values(), *self.elector.handing_over.values()]
            await self._service.publish_now(sorted({w for c in own for w in c.workers}))

    async def _save_epochs(self) -> None:
        """Keeps the highest epochs on disk before any claim of them starts an engine."""
        epochs = dict(self.elector.highest_epoch)
        if epochs == self._saved_epochs:
            return
        try:
            await trio.to_thread.run_sync(save_epochs, self._config.data_dir, epochs)
        except OSError as err:
            _log.error("cannot save epochs in %s: %s", self._config.data_dir, err)
        self._saved_epochs = epochs

    def _count_replans(self) -> None:
        """Counts each model whose placement was replaced (a new epoch or primary).

        Compared with the last placement seen, not the last step's: a lost primary
        usually leaves a few steps with no placement at all before the next one.
        """
        for model_id, state in self.model_states.items():
            if state.current is None:
                continue
            last = self._last_rank.get(model_id)
            if last is not None and state.current.rank != last:
                self.replans[model_id] = self.replans.get(model_id, 0) + 1
            self._last_rank[model_id] = state.current.rank

    def _reconcile_primary(self) -> None:
        own = (*self.elector.claims.values(), *self.elector.handing_over.values())
        wanted = {(claim.model_id, claim.rank): claim for claim in own}
        for key, job in list(self._primary_jobs.items()):
            if key not in wanted:
                _log.info("model %s: stopping the engine of epoch %d", key[0], job.claim.epoch)
                job.scope.cancel()
                del self._primary_jobs[key]
        for key, claim in wanted.items():
            if key not in self._primary_jobs and claim.model_id in self._local:
                self._primary_jobs[key] = self._start_job(self._run_primary, claim)
        for model_id, old in self.elector.handing_over.items():
            state = self.model_states.get(model_id)
            key = (model_id, old.rank)
            successor = None if state is None else state.current
            if successor is not None and successor.serving and key not in self._winding:
                self._winding.add(key)
                assert self._nursery is not None
                self._nursery.start_soon(self._wind_down, old, self._primary_jobs.get(key))

    async def _wind_down(self, claim: Claim, job: _Job | None) -> None:
        """Lets a replaced engine finish the requests it took, then withdraws its claim."""
        with trio.move_on_after(_HANDOVER_LIMIT_S):
            await trio.sleep(_HANDOVER_MIN_S)
            while job is not None and await self._engine_busy(job):
                await trio.sleep(_STEP_S)
        _log.info("model %s: epoch %d handed over", claim.model_id, claim.epoch)
        self.elector.end_handover(claim.model_id, claim.epoch)
        self._winding.discard((claim.model_id, claim.rank))
        self._changed.set()

    async def _engine_busy(self, job: _Job) -> bool:
        """Whether llama-server is working on a request (its /slots say so)."""
        if job.endpoint() is None or job.http is None:
            return False
        try:
            answer = await job.http.get("/slots", timeout=2.0)
            slots = answer.json()
        except (httpx.HTTPError, ValueError):
            return False
        return isinstance(slots, list) and any(
            isinstance(slot, dict) and slot.get("is_processing") for slot in slots
        )

    def _reconcile_workers(self) -> None:
        wanted: dict[tuple[str, Rank], Claim] = {}
        self._accepting = set()
        for model_id, state in self.model_states.items():
            running = state.placements()
            serving_soon = len(running) - len(state.winding_down)  # the others only finish
            for index, claim in enumerate(running):
                if self._me in claim.workers:
                    wanted[(model_id, claim.rank)] = claim
                    if index < serving_soon:
                        self._accepting.add((model_id, claim.rank))
        for key in sorted(self._accepting - self._worker_jobs.keys()):
            self._start_worker(key, wanted[key], keep=wanted.keys())
        for key, job in list(self._worker_jobs.items()):
            if key not in wanted:
                job.scope.cancel()
                del self._worker_jobs[key]
        self._filled = {k: v for k, v in self._filled.items() if k in self._worker_jobs}
        for model_id, streams in self._worker_streams.items():
            for rank, scope in streams:
                if (model_id, rank) not in wanted:
                    scope.cancel()  # fenced: that primary no longer leads this model

    def _start_worker(
        self, key: tuple[str, Rank], claim: Claim, keep: Collection[tuple[str, Rank]]
    ) -> None:
        """Starts the rpc-server for a placement, or hands it the one of the placement it
        replaces at once (no time to start a process, and the memory is freed as it goes)."""
        replaced = next((k for k in self._worker_jobs if k[0] == key[0] and k not in keep), None)
        if replaced is None:
            self._worker_jobs[key] = self._start_job(self._run_worker, claim)
        else:
            job = self._worker_jobs.pop(replaced)
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

    def _start_job(self, runner: Callable[[_Job], Awaitable[None]], claim: Claim) -> _Job:
        assert self._nursery is not None
        job = _Job(claim, trio.CancelScope())
        self._nursery.start_soon(runner, job)
        return job

    # -- primary -------------------------------------------------------------------------------

    async def _run_primary(self, job: _Job) -> None:
        assert self._socket_dir is not None
        self._engines_started += 1
        job.socket = self._socket_dir / f"engine-{self._engines_started}.sock"
        job.http = engine_client(job.socket, self._client.timeout)
        try:
            await self._lead(job)
        finally:
            with trio.CancelScope(shield=True):
                await job.http.aclose()

    async def _lead(self, job: _Job) -> None:
        claim = job.claim
        model = self._local[claim.model_id]
        _log.info("model %s: leading epoch %d over %s", claim.model_id, claim.epoch, claim.nodes)
        with job.scope:
            with trio.move_on_after(_FILL_WAIT_S):
                async with trio.open_nursery() as waiting:
                    for worker in claim.workers:
                        request = TunnelRequest("rpc", claim.model_id, claim.epoch)
                        opener = self._opener(worker, READY)
                        waiting.start_soon(await_ready, opener, request, self._name_of(worker))
            async with trio.open_nursery() as nursery:
                for worker in claim.workers:
                    tally = job.requests[worker] = RpcTally()
                    listener = TunnelListener(
                        self._opener(worker),
                        TunnelRequest("rpc", claim.model_id, claim.epoch),
                        watcher=tally.reader,
                        allowed_pids=job.engine_pids,
                    )
                    job.tunnels[worker] = listener
                    nursery.start_soon(listener.run)
                report = LoadReport()
                job.supervisor = Supervisor(
                    lambda: self._llama_server_spec(model, claim, job, report),
                    lambda _spec: self._engine_healthy(job),
                    logger=_log,
                    ready_timeout_s=self._config.engine_load_timeout_s,
                    on_log_line=report.feed,
                )
                nursery.start_soon(job.supervisor.run)
                nursery.start_soon(self._verify_load, job, model, report)

    def _llama_server_spec(
        self, model: LocalModel, claim: Claim, job: _Job, report: LoadReport
    ) -> ProcessSpec:
        report.offloaded, report.buffers = None, {}
        job.verified = False
        assert job.socket is not None
        job.socket.unlink(missing_ok=True)  # left by the engine's previous run
        split = self._split_args(claim, model.info.profile.layer_count)
        endpoints = [job.tunnels[w].endpoint for w in split.rpc_workers]
        argv = [
            str(self._engine.llama_server),
            *("--host", str(job.socket)),  # a Unix socket, for this user only (engine_socket)
            *("--model", str(model.path), "--alias", model.model_id),
            *("--ctx-size", str(self._config.context_size)),
            *("--no-webui", "--log-verbosity", "4"),
            *split.argv(endpoints),
        ]
        if self._config.threads is not None:
            argv += ["--threads", str(self._config.threads)]
        return ProcessSpec("llama-server", tuple(argv), _ENGINE_ENV, unix_endpoint(job.socket))

    def _split_args(self, claim: Claim, layer_count: int) -> LlamaSplitArgs:
        """The claim's layout as llama-server arguments, given the devices each node gossiped."""
        states = self._service.member_states()
        devices = {
            node: gossiped_device_count(states.get(node, {}))
            for node in {claim.primary, *claim.nodes}
        }
        return split_args(claim.as_placement(), layer_count, devices)

    async def _verify_load(self, job: _Job, model: LocalModel, report: LoadReport) -> None:
        """Checks each (re)start's log against the plan once the engine is ready."""
        assert job.supervisor is not None
        profile = model.info.profile
        split = self._split_args(job.claim, profile.layer_count)
        planned = {
            job.tunnels[node].endpoint: sum(profile.layer_weight_bytes[first : last + 1])
            for node, first, last in job.claim.layers
            if node != job.claim.primary
        }
        while True:
            await job.supervisor.wait_changed()
            if job.supervisor.state is not ServiceState.READY:
                continue
            await trio.sleep(0.2)  # the log pump may be a line or two behind the health check
            job.problem = report.problem(split.n_gpu_layers, planned)
            job.verified = job.problem is None
            if job.problem:
                _log.error("model %s: %s", job.claim.model_id, job.problem)
            else:
                _log.info(
                    "model %s: serving epoch %d, layers as planned: %s",
                    job.claim.model_id,
                    job.claim.epoch,
                    ", ".join(f"{n[-6:]} {a}-{b}" for n, a, b in job.claim.layers),
                )
            self._changed.set()

    async def _engine_healthy(self, job: _Job) -> bool:
        assert job.http is not None
        try:
            answer = await job.http.get("/health", timeout=2.0)
        except httpx.HTTPError:
            return False
        return answer.status_code == 200

    def _opener(self, peer: str, protocol: str = TUNNEL) -> OpenStream:
        async def open_stream() -> MeshStream:
            address = data_address(self._service.store.states.get(peer))
            if address is None:
                raise TransportError(f"{peer} has not gossiped a data address")
            return await self._data_plane.open_stream(peer, address[0], address[1], protocol)

        return open_stream

    # -- worker --------------------------------------------------------------------------------

    async def _fill(self, key: tuple[str, Rank], first: int, last: int) -> None:
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
        wanted = _offered_sha256(states.get(primary, {}), model_id)
        others = [
            origin
            for origin, content in states.having("models")
            if origin not in (primary, self._me)
            and wanted is not None
            and _offered_sha256(content, model_id) == wanted
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
                await trio.sleep(0.1)
        with trio.move_on_after(_FILL_WAIT_S):
            while key in self._accepting:
                filled, job = self._filled.get(key), self._worker_jobs.get(key)
                if filled is not None and filled.is_set() and job and job.endpoint():
                    return READY_ANSWER
                await trio.sleep(0.2)
        return f"not a ready worker of {request.model_id} epoch {request.epoch} here".encode()

    async def _run_worker(self, job: _Job) -> None:
        cache = self._llama_cache
        cache.mkdir(parents=True, exist_ok=True)
        threads = self._config.threads or os.cpu_count() or 1

        def spec() -> ProcessSpec:
            port = free_loopback_port()
            argv = [str(self._engine.rpc_server), "-H", "127.0.0.1", "-p", str(port)]
            argv += ["-c", "-t", str(threads)]
            env = {**_ENGINE_ENV, "LLAMA_CACHE": str(cache)}
            return ProcessSpec("ggml-rpc-server", tuple(argv), env, f"127.0.0.1:{port}")

        with job.scope:
            job.supervisor = Supervisor(spec, _accepts_tcp, logger=_log, ready_timeout_s=30.0)
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
                await serve_tunnel(stream, target, stats)
        finally:
            if registered is not None:
                registered[:] = [entry for entry in registered if entry[1] is not scope]

    async def _tunnel_target(self, request: TunnelRequest, peer: str) -> str:
        if request.service == "api":
            job = self._primary_jobs.get((request.model_id, (request.epoch, self._me)))
            endpoint = None if job is None or not job.verified else job.endpoint()
            if endpoint is None:
                raise TunnelRefused(f"this node does not serve {request.model_id} now")
            return endpoint
        if request.service != "rpc":
            raise TunnelRefused(f"unknown tunnel service {request.service!r}")
        with trio.move_on_after(_CLAIM_WAIT_S):
            while not self._leads(request, peer):
                await trio.sleep(0.1)
        if not self._leads(request, peer):
            raise TunnelRefused(
                f"{peer} is not the primary of {request.model_id} epoch {request.epoch} here"
            )
        key = (request.model_id, (request.epoch, peer))
        with trio.move_on_after(_WORKER_READY_WAIT_S):
            while (job := self._worker_jobs.get(key)) is None or (
                endpoint := job.endpoint()
            ) is None:
                await trio.sleep(0.1)
            return endpoint
        raise TunnelRefused(f"the rpc-server for {request.model_id} is not ready")

    def _leads(self, request: TunnelRequest, peer: str) -> bool:
        """Whether `peer` leads a placement of the model that this node serves in now."""
        return (request.model_id, (request.epoch, peer)) in self._accepting

    # -- the API's view ----------------------------------------------------------------------

    def models(self) -> Sequence[ModelEntry]:
        return [
            ModelEntry(model_id, self._local[model_id].created if model_id in self._local else 0)
            for model_id in sorted(self.model_states)
        ]

    def route(self, model_id: str) -> Upstream:
        unavailable = self._unavailable(model_id)
        if unavailable is not None:
            raise UpstreamUnavailable(*unavailable)
        claim = self.model_states[model_id].routed
        assert claim is not None
        if claim.primary == self._me:
            http = self._primary_jobs[(model_id, claim.rank)].http
            assert http is not None
            return HttpUpstream(http, ENGINE_BASE_URL)
        listener = self._api_tunnel(claim)
        return HttpUpstream(self._client, f"http://{listener.endpoint}")

    def _unavailable(self, model_id: str) -> tuple[str, bool] | None:
        """Why requests for the model cannot be served now, and whether that should pass soon
        (None: they can be served)."""
        state = self.model_states.get(model_id)
        if state is None:
            gone_for = self._recently_offered.gone_for(model_id, trio.current_time())
            if gone_for is None:
                raise ModelNotFound(model_id)
            return f"no member holding it has been reachable for {gone_for:.0f} s", True
        claim = state.routed
        if claim is None:
            return (state.problem, False) if state.problem else ("no primary elected yet", True)
        members = self._service.member_states()
        gone = [node for node in (claim.primary, *claim.nodes) if node not in members]
        if gone:
            return f"re-planning after node {self._name_of(gone[0])} left", True
        if not claim.serving:
            nodes = len(claim.nodes)
            return f"loading on {claim.primary[-8:]} (epoch {claim.epoch}, {nodes} nodes)", True
        if claim.primary == self._me:
            job = self._primary_jobs.get((model_id, claim.rank))
            if job is None or job.endpoint() is None:
                return "the local engine is restarting", True
        return None

    def health(self) -> tuple[bool, dict[str, str]]:
        missing = self._recently_offered.missing(self.model_states, trio.current_time())
        states = {
            model_id: self._state_in_words(model_id)
            for model_id in sorted([*self.model_states, *missing])
        }
        return bool(states) and all(s == "ready" for s in states.values()), states

    def _api_tunnel(self, claim: Claim) -> TunnelListener:
        key = (claim.model_id, claim.epoch, claim.primary)
        if key not in self._api_tunnels:
            assert self._nursery is not None
            listener = TunnelListener(
                self._opener(claim.primary),
                TunnelRequest("api", claim.model_id, claim.epoch),
                allowed_pids=lambda: (os.getpid(),),  # only this node's own HTTP client
            )
            scope = trio.CancelScope()
            self._api_tunnels[key] = (listener, scope)

            async def run() -> None:
                with scope:
                    await listener.run()

            self._nursery.start_soon(run)
        return self._api_tunnels[key][0]

    def _close_stale_api_tunnels(self) -> None:
        """Closes tunnels to primaries that lead nothing now (a replaced placement that still
        finishes requests keeps its tunnel until its primary withdraws it)."""
        for key, (_, scope) in list(self._api_tunnels.items()):
            state = self.model_states.get(key[0])
            running = () if state is None else state.placements()
            if all((claim.model_id, claim.epoch, claim.primary) != key for claim in running):
                scope.cancel()
                del self._api_tunnels[key]

    def served_tunnels(self) -> dict[str, dict[str, int]]:
        """Traffic of the tunnels other nodes opened to this one, by the peer that opened them."""
        return {peer: stats.as_dict() for peer, stats in sorted(self.worker_stats.items())}

    def describe(self) -> dict[str, Any]:
        """Each model's placement as this node sees it (for `status` and `peers`)."""
        described = {}
        for model_id, state in sorted(self.model_states.items()):
            claim = state.current
            job = None if claim is None else self._primary_jobs.get((model_id, claim.rank))
            entry: dict[str, Any] = {
                "state": self._state_in_words(model_id),
                "primary": None if claim is None else claim.primary,
                "epoch": None if claim is None else claim.epoch,
                "serving": claim is not None and claim.serving,
                "assignments": []
                if claim is None
                else [
                    {"node": node, "first_layer": first, "last_layer": last}
                    for node, first, last in claim.layers
                ],
                "planned": None if state.planned is None else state.planned.as_dict(),
                "problem": (job.problem if job is not None else None) or state.problem,
                "tunnels": {}
                if job is None
                else {
                    worker: {**t.stats.as_dict(), "requests": job.requests[worker].as_dict()}
                    for worker, t in job.tunnels.items()
                },
                "unused": {} if claim is None else self._unused_nodes(claim),
                "serving_meanwhile": None if state.previous is None else state.previous.epoch,
                "replans": self.replans.get(model_id, 0),
                "engine_restarts": 0
                if job is None or job.supervisor is None
                else job.supervisor.restarts,
            }
            described[model_id] = entry
        return described

    def _unused_nodes(self, claim: Claim) -> dict[str, str]:
        """Why each live member outside a placement is left out of it."""
        members = self._service.member_states()
        primary = members.get(claim.primary, {})
        placed = {claim.primary, *claim.nodes}
        unused = {}
        for peer, content in members.items():
            if peer in placed:
                continue
            theirs, ours = content.get("rpc_protocol"), primary.get("rpc_protocol")
            if theirs != ours:
                unused[peer] = f"engine RPC protocol {theirs} differs from the primary's {ours}"
            else:
                unused[peer] = "not needed by the plan (fewer nodes are faster)"
        return unused

    def _name_of(self, peer: str) -> str:
        state = self._service.store.states.get(peer)
        content = None if state is None else self._service.content_of(state)
        name = None if content is None else content.get("name")
        return f"{name} ({peer[-8:]})" if isinstance(name, str) else peer[-8:]

    def _state_in_words(self, model_id: str) -> str:
        unavailable = self._unavailable(model_id)
        return "ready" if unavailable is None else unavailable[0]


async def _accepts_tcp(spec: ProcessSpec) -> bool:
    assert spec.endpoint is not None
    host, _, port = spec.endpoint.rpartition(":")
    try:
        stream = await trio.open_tcp_stream(host, int(port))
    except OSError:
        return False
    await stream.aclose()
    return True


def _offered_sha256(content: Mapping[str, Any], model_id: str) -> str | None:
    """The content hash a member gossips for its file of `model_id` (None: not offered or
    not hashed yet)."""
    models = content.get("models")
    for entry in models if isinstance(models, list) else []:
        if isinstance(entry, dict) and entry.get("id") == model_id:
            sha = entry.get("sha256")
            return sha if isinstance(sha, str) else None
    return None
