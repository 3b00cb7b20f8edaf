"""A node's serving jobs and the model files it offers (the records the roles share)."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import trio

from ...mesh.claims import Claim
from ...mesh.member_states import MemberStates
from ...mesh.transport.engine_handoff import HandoffDesk
from ...mesh.transport.tunnel import (
    TunnelListener,
)
from ...scheduler.model_profile import profile_to_dict
from ...scheduler.speculation import POLICY_MODES
from ..config import MAX_ALIASES
from ..engine.rpc_traffic import RpcTally
from ..engine.supervisor import ProcessSpec, ServiceState, Supervisor
from ..models.model_file import ModelInfo
from ..models.model_kind import KINDS


@dataclass(frozen=True)
class LocalModel:
    """A model file this node holds and offers to the mesh."""

    model_id: str
    info: ModelInfo
    created: int
    aliases: tuple[str, ...] = ()  # other names clients may use for it (gossiped)
    kind: str = "text"  # text, embedding or rerank (gossiped: every peer routes by it)
    draft: ModelInfo | None = None  # a model of its vocabulary that drafts for it when we lead

    @property
    def path(self) -> Path:
        return self.info.path

    def gossip_entry(
        self,
        context: int,
        slots: int,
        replicas: tuple[int, int],
        sha256: str | None,
        *,
        speculation: str = "off",
        split: str = "planner",
    ) -> dict[str, Any]:
        """`replicas`: the least and most placements this node's settings allow;
        `speculation`: the modes it allows the planner (a `POLICY_MODES` name); `split`: how
        the model is split (`SPLITS`)."""
        entry = {
            "id": self.model_id,
            "size": self.info.size_bytes,
            "context": context,
            "slots": slots,
            "min_replicas": replicas[0],
            "max_replicas": replicas[1],
            "profile": profile_to_dict(self.info.profile),
            # only a model that generates text drafts tokens
            "speculation": speculation if self.kind == "text" else "off",
        }
        if split != "planner":
            entry["split"] = split
        if sha256 is not None:
            entry["sha256"] = sha256
        if self.aliases:
            entry["aliases"] = list(self.aliases)
        if self.kind != "text":
            entry["kind"] = self.kind
        elif self.draft is not None and "draft" in POLICY_MODES.get(speculation, ()):
            entry["draft"] = {"profile": profile_to_dict(self.draft.profile)}
        return entry


@dataclass
class Job:
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
    handoff: HandoffDesk | None = None  # where the primary's engine asks for its tunnels

    def tunnel_at(self, endpoint: str) -> TunnelListener:
        """The primary's tunnel listener at `endpoint` (LookupError if none)."""
        for listener in self.tunnels.values():
            if listener.endpoint == endpoint:
                return listener
        raise LookupError(f"no tunnel of this engine listens at {endpoint[:40]!r}")

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


def gossiped_aliases(members: MemberStates, models: Collection[str]) -> dict[str, str]:
    """Other names for the models offered, as their holders gossip them (the lowest peer id's
    claim on a name wins; a model's own id is never an alias of another)."""
    aliases: dict[str, str] = {}
    for _, content in members.having("models"):
        entries = content.get("models")
        for entry in entries[:16] if isinstance(entries, list) else []:
            if not isinstance(entry, dict) or entry.get("id") not in models:
                continue
            names = entry.get("aliases")
            for name in names[:MAX_ALIASES] if isinstance(names, list) else []:
                if isinstance(name, str) and name not in models:
                    aliases.setdefault(name, entry["id"])
    return aliases


def gossiped_kinds(members: MemberStates, models: Collection[str]) -> dict[str, str]:
    """What each offered model is for, as the lowest peer id holding it says."""
    kinds: dict[str, str] = {}
    for _, content in members.having("models"):
        entries = content.get("models")
        for entry in entries[:16] if isinstance(entries, list) else []:
            if isinstance(entry, dict) and entry.get("id") in models:
                kind = entry.get("kind", "text")
                kinds.setdefault(entry["id"], kind if kind in KINDS else "text")
    return kinds


async def accepts_tcp(spec: ProcessSpec) -> bool:
    assert spec.endpoint is not None
    host, _, port = spec.endpoint.rpartition(":")
    try:
        stream = await trio.open_tcp_stream(host, int(port))
    except OSError:
        return False
    await stream.aclose()
    return True


def offered_sha256(content: Mapping[str, Any], model_id: str) -> str | None:
    """The content hash a member gossips for its file of `model_id` (None: not offered or
    not hashed yet)."""
    models = content.get("models")
    for entry in models if isinstance(models, list) else []:
        if isinstance(entry, dict) and entry.get("id") == model_id:
            sha = entry.get("sha256")
            return sha if isinstance(sha, str) else None
    return None
