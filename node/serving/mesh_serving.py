"""This node's part in serving the mesh's models, and the API router that finds their primaries.

Every half second the node runs the election on the live members' gossiped states, asks the
reconciler (`reconciler.py`, pure) what must change, and makes its processes match the outcome:

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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import trio

from ...mesh.election import Elector, ModelState
from ...mesh.mesh_store import load_epochs, save_epochs
from ...mesh.service import MeshService
from ...mesh.transport.data_plane import DataPlane
from ...mesh.transport.native_relay import NativeRelay
from ...mesh.transport.tunnel import (
    TUNNEL,
    TunnelListener,
)
from ...mesh.transport.tunnel_stats import (
    TunnelStats,
)
from ..config import NodeConfig
from ..engine.locate import EngineInfo
from ..engine.unix_socket import private_socket_dir
from ..models.model_file import ModelFileError, cached_sha256
from ..weights.share import WeightShare
from ..weights.share_wire import WEIGHTS
from ..weights.warm_start import READY, WeightFiller, answer_ready
from .draft_meter import DraftMeter
from .jobs import Job, LocalModel, gossiped_aliases, gossiped_kinds
from .offered_recently import RecentlyOffered
from .parts import STEP_S, engine_seals
from .primary import PrimaryRole
from .reconciler import Changes, JobKey, Running, reconcile
from .replica_choice import InFlight
from .routing import ApiRouting
from .worker import WorkerRole

_log = logging.getLogger("sharedllm.serving")
_SETTLED_MARGIN_S = 0.001  # a step a moment after a settle time finds it passed
_STEP_GAP_S = 0.05  # the least time between two steps


class MeshServing(PrimaryRole, WorkerRole, ApiRouting):
    def __init__(
        self,
        *,
        service: MeshService,
        data_plane: DataPlane,
        engine: EngineInfo,
        config: NodeConfig,
        local_models: Sequence[LocalModel],
        client: httpx.AsyncClient,
        native_relay: NativeRelay | None = None,
    ) -> None:
        self._service = service
        self._native_relay = native_relay  # rpc tunnels' byte copy in C, where it was built
        self._engine_seals = engine_seals(engine, config, native_relay)
        self._data_plane = data_plane
        self._engine = engine
        self._config = config
        self._local = {model.model_id: model for model in local_models}
        self._client = client
        self._me = service.identity.peer_id
        self.elector = Elector(self._me, highest_epoch=load_epochs(config.data_dir))
        self._saved_epochs = dict(self.elector.highest_epoch)
        self._recently_offered = RecentlyOffered()
        self.aliases: dict[str, str] = {}
        self.kinds: dict[str, str] = {}
        self.model_states: dict[str, ModelState] = {}
        self.unit_states: dict[str, ModelState] = {}
        self._in_flight = InFlight()
        self._drafts = DraftMeter()
        self.replans: dict[str, int] = {}  # model -> placements replaced, as this node saw it
        self._last_rank: dict[str, tuple[int, str]] = {}  # model -> last placement seen
        # Jobs by (model, claim rank): two of one model run at once during a switch.
        self._primary_jobs: dict[JobKey, Job] = {}
        self._worker_jobs: dict[JobKey, Job] = {}
        self._accepting: set[JobKey] = set()  # rpc tunnels this worker takes now
        self._winding: set[JobKey] = set()
        self._filled: dict[JobKey, trio.Event] = {}
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
        service.on_state_news = self._step_soon
        self._hashes: dict[str, str] = {}
        self._socket_dir: Path | None = None
        self._engines_started = 0

    # -- gossip ------------------------------------------------------------------------------

    def gossip_fields(self) -> dict[str, Any]:
        now = trio.current_time()
        demand = self._in_flight.demand.report(now)
        drafts = self._drafts.gossip(now)
        return (
            {
                "models": [
                    m.gossip_entry(
                        self._config.context_size,
                        self._config.parallel_slots,
                        (self._config.min_replicas, self._config.max_replicas),
                        self._hashes.get(m.model_id),
                        speculation=self._config.speculation
                        if self._engine.ngram_speculation
                        else "off",
                        split=self._config.split,
                    )
                    for m in self._local.values()
                ],
                "claims": self.elector.gossiped_claims(),
                "problems": dict(sorted(self.elector.problems.items())),
            }
            | ({"demand": demand} if demand else {})
            | ({"drafts": drafts} if drafts else {})
        )

    # -- the loop ------------------------------------------------------------------------------

    def _step_soon(self) -> None:
        """News the election acts on at once rather than at the next tick: a member's claims
        changed (a worker named in a new claim starts its rpc-server while the primary waits
        for it), or any state in a small mesh (a mesh starting again plans on its links)."""
        self._changed.set()

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
                # ...and again at the next tick, when news comes, or when a plan it waits to
                # claim has settled, whichever is first; never more often than every
                # `_STEP_GAP_S` (a member flooding the mesh with states must not make this node
                # plan for each one)
                await trio.sleep(_STEP_GAP_S)
                settled_in = self.elector.next_claim_at() - trio.current_time() + _SETTLED_MARGIN_S
                with trio.move_on_after(min(STEP_S, max(settled_in, 0.0))):
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
        self.unit_states = self.elector.step(trio.current_time(), self._service.member_states())
        self.model_states = {
            state.request.model_id: state
            for state in self.unit_states.values()
            if state.request.replica == 0
        }
        self._recently_offered.note(self.model_states, trio.current_time())
        members = self._service.member_states()
        self.aliases = gossiped_aliases(members, self.model_states)
        self.kinds = gossiped_kinds(members, self.model_states)
        self._count_replans()
        await self._save_epochs()
        changes = reconcile(
            self._me,
            self._local.keys(),
            self.unit_states,
            claims=self.elector.claims,
            handing_over=self.elector.handing_over,
            running=self._running(),
        )
        self._apply(changes)
        for unit, epoch, ready in changes.serving:
            self.elector.set_serving(unit, epoch, ready)
        if self.elector.gossiped_claims() != before:
            own = [*self.elector.claims.values(), *self.elector.handing_over.values()]
            await self._service.publish_now(sorted({w for c in own for w in c.workers}))
            # This step's model states predate the change (a claim made, an engine serving):
            # the next step, at once, routes by it rather than half a second later.
            self._changed.set()

    def _running(self) -> Running:
        return Running(
            primaries={
                key: job.endpoint() is not None and job.verified
                for key, job in self._primary_jobs.items()
            },
            workers=tuple(self._worker_jobs),
            winding=frozenset(self._winding),
            api_tunnels=tuple(self._api_tunnels),
            worker_streams=tuple(
                (model_id, rank)
                for model_id, streams in self._worker_streams.items()
                for rank, _ in streams
            ),
        )

    def _apply(self, changes: Changes) -> None:
        """Carries out the reconciler's changes with processes, tasks and tunnels."""
        assert self._nursery is not None
        for key in changes.stop_primaries:
            job = self._primary_jobs.pop(key)
            _log.info("model %s: stopping the engine of epoch %d", key[0], job.claim.epoch)
            job.scope.cancel()
        for claim in changes.start_primaries:
            self._primary_jobs[(claim.model_id, claim.rank)] = self._start_job(
                self._run_primary, claim
            )
        for old in changes.wind_down:
            key = (old.model_id, old.rank)
            self._winding.add(key)
            self._nursery.start_soon(self._wind_down, old, self._primary_jobs.get(key))
        self._accepting = set(changes.accepting)
        for start in changes.start_workers:
            self._start_worker(start)
        for key in changes.stop_workers:
            self._worker_jobs.pop(key).scope.cancel()
        self._filled = {k: v for k, v in self._filled.items() if k in self._worker_jobs}
        fenced = set(changes.fence)
        for model_id, streams in self._worker_streams.items():
            for rank, scope in streams:
                if (model_id, rank) in fenced:
                    scope.cancel()  # that primary no longer leads this model here
        for tunnel in changes.close_api_tunnels:
            self._api_tunnels.pop(tunnel)[1].cancel()

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
