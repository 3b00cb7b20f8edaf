"""The primary's role: leading a placement with a llama-server over tunnels to its workers."""

from __future__ import annotations

import logging

import httpx
import trio

from ...mesh.claims import Claim
from ...mesh.transport.engine_handoff import HandoffDesk
from ...mesh.transport.tunnel import (
    TunnelListener,
    TunnelRequest,
)
from ...scheduler.llama_args import LlamaSplitArgs, split_args
from ..engine.devices import gossiped_device_count, gossiped_device_names
from ..engine.load_report import LoadReport
from ..engine.options import speculation_args
from ..engine.rpc_traffic import COMMANDS, RpcTally
from ..engine.supervisor import ProcessSpec, ServiceState, Supervisor
from ..engine.unix_socket import engine_client, unix_endpoint
from ..models.chat_template import template_args
from ..models.model_kind import kind_args
from ..weights.warm_start import READY, await_ready
from .draft_meter import EngineCounters, parse_engine_counters
from .jobs import Job, LocalModel
from .parts import STEP_S, ServingParts

_log = logging.getLogger("sharedllm.serving")
_FILL_WAIT_S = 1800.0  # the longest a primary waits for its workers to fill their caches
_HANDOVER_MIN_S = 1.0  # routers hear that the new placement serves before the old one stops
_HANDOVER_LIMIT_S = 60.0  # the longest a replaced engine may take to finish its requests
_METER_S = 10.0  # how often the engine's counters are read


class PrimaryRole(ServingParts):
    """The primary of a claim: tunnel listeners to its workers, and a llama-server whose
    `--rpc` lists them in placement order, checked against the plan once it is ready."""

    async def _run_primary(self, job: Job) -> None:
        assert self._socket_dir is not None
        self._engines_started += 1
        job.socket = self._socket_dir / f"engine-{self._engines_started}.sock"
        job.http = engine_client(job.socket, self._client.timeout)
        try:
            await self._lead(job)
        finally:
            with trio.CancelScope(shield=True):
                await job.http.aclose()

    async def _lead(self, job: Job) -> None:
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
                        native=self._native_relay,
                        rpc_commands=len(COMMANDS),
                    )
                    job.tunnels[worker] = listener
                    nursery.start_soon(listener.run)
                if self._engine_seals:
                    assert job.socket is not None
                    path = job.socket.with_name(f"{job.socket.stem}-handoff.sock")
                    job.handoff = HandoffDesk(str(path), job.tunnel_at, job.engine_pids)
                    nursery.start_soon(job.handoff.run)
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
                nursery.start_soon(self._meter_drafts, job)

    def _llama_server_spec(
        self, model: LocalModel, claim: Claim, job: Job, report: LoadReport
    ) -> ProcessSpec:
        report.restart()
        job.verified = False
        assert job.socket is not None
        job.socket.unlink(missing_ok=True)  # left by the engine's previous run
        split = self._split_args(claim, model.info.profile.layer_count)
        endpoints = [job.tunnels[w].endpoint for w in split.rpc_workers]
        argv = [
            str(self._engine.llama_server),
            *("--host", str(job.socket)),  # a Unix socket, for this user only (unix_socket)
            *("--model", str(model.path), "--alias", model.model_id),
            # One KV cache of the context per slot (llama.cpp splits --ctx-size among them).
            *("--parallel", str(claim.slots)),
            *("--ctx-size", str(self._config.context_size * claim.slots)),
            *("--n-predict", str(self._config.default_max_tokens)),
            *kind_args(model.kind, model.info.pooling_type),
            *template_args(
                has_own=model.info.has_chat_template,
                architecture=model.info.profile.architecture,
                tokenizer_pre=model.info.tokenizer_pre,
                configured=self._config.chat_template,
            ),
            *("--no-webui", "--log-verbosity", "4", "--metrics"),
            *split.argv(endpoints),
        ]
        if self._config.threads is not None:
            argv += ["--threads", str(self._config.threads)]
        argv += self._speculation_args(model, claim)
        # The split and the context are set above: llama.cpp's fitting would change nothing,
        # after a trial load of the model on every device (0.5 s of every load on a CPU).
        argv += ("--fit", "off") if self._engine.fit_switch else ()
        argv += self._config.engine_args  # checked against the allow-list when loaded
        env = self._engine_env(None if job.handoff is None else job.handoff.path)
        return ProcessSpec("llama-server", tuple(argv), env, unix_endpoint(job.socket))

    def _speculation_args(self, model: LocalModel, claim: Claim) -> tuple[str, ...]:
        """The claim's speculation mode as arguments (none where the engine cannot speculate);
        a draft model goes on this node's own devices, as the planner booked it."""
        if not self._engine.ngram_speculation:
            return ()
        own = gossiped_device_names(self._service.member_states().get(self._me, {}))
        draft = None if model.draft is None else model.draft.path
        if claim.speculation == "draft" and (draft is None or not draft.is_file()):
            # gone since the node started: the engine runs without drafts rather than not at
            # all (its counters then price the mode as no faster than none)
            _log.warning("model %s: its draft model %s is gone", claim.model_id, draft)
            draft = None
        return speculation_args(claim.speculation, draft, own)

    def _split_args(self, claim: Claim, layer_count: int) -> LlamaSplitArgs:
        """The claim's layout as llama-server arguments, given the devices each node gossiped."""
        states = self._service.member_states()
        devices = {
            node: gossiped_device_count(states.get(node, {}))
            for node in {claim.primary, *claim.nodes}
        }
        return split_args(claim.as_placement(), layer_count, devices)

    async def _verify_load(self, job: Job, model: LocalModel, report: LoadReport) -> None:
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
            with trio.move_on_after(0.2):  # the log pump may be a line behind the health check
                while report.offloaded is None:
                    await trio.sleep(0.01)
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

    async def _meter_drafts(self, job: Job) -> None:
        """Reads the engine's counters now and then: what its drafts yield is what the
        planner weighs speculation by."""
        engine = (job.claim.model_id, job.claim.epoch)
        mode = job.claim.speculation if self._engine.ngram_speculation else "off"
        try:
            while True:
                await trio.sleep(_METER_S)
                counters = await self._engine_counters(job)
                if counters is not None:
                    now = trio.current_time()
                    self._drafts.observe(engine, counters, mode, now)
        finally:
            self._drafts.forget(engine)

    async def _engine_counters(self, job: Job) -> EngineCounters | None:
        if job.http is None or job.supervisor is None:
            return None
        if job.supervisor.state is not ServiceState.READY:
            return None
        try:
            answer = await job.http.get("/metrics", timeout=2.0)
        except httpx.HTTPError:
            return None
        return parse_engine_counters(answer.text) if answer.status_code == 200 else None

    async def _engine_healthy(self, job: Job) -> bool:
        assert job.http is not None
        try:
            answer = await job.http.get("/health", timeout=2.0)
        except httpx.HTTPError:
            return False
        return answer.status_code == 200

    async def _wind_down(self, claim: Claim, job: Job | None) -> None:
        """Lets a replaced engine finish the requests it took, then withdraws its claim."""
        with trio.move_on_after(_HANDOVER_LIMIT_S):
            await trio.sleep(_HANDOVER_MIN_S)
            while job is not None and await self._engine_busy(job):
                await trio.sleep(STEP_S)
        _log.info("model %s: epoch %d handed over", claim.model_id, claim.epoch)
        self.elector.end_handover(claim.unit, claim.epoch)
        self._winding.discard((claim.model_id, claim.rank))
        self._changed.set()

    async def _engine_busy(self, job: Job) -> bool:
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
