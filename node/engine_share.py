"""Members hand their built engine to each other: a node that built llama.cpp offers it (packed
on first request, `engine pack`'s archive) over the authenticated data plane, and a new node of
the same platform started with `--engine-from-mesh` fetches it instead of building: it joins
the mesh just long enough to find such a member, takes the archive, checks its SHA-256 and
size against what the member announced, and installs it (`install_engine` checks the platform
and that it runs here).
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import trio

from ..mesh import records
from ..mesh.membership_state import MembershipState
from ..mesh.probing import data_addresses
from ..mesh.random_source import RandomSource
from ..mesh.records import RecordError
from ..mesh.service import MeshService
from ..mesh.transport.data_plane import DataPlane
from ..mesh.transport.framing import FrameError, receive_frame, send_frame
from ..mesh.transport.interfaces import local_interfaces
from ..mesh.transport.libp2p_adapter import open_libp2p_transport
from ..mesh.transport.seam import MeshStream, TransportError
from .engine.archive import Platform, install_engine, pack_engine
from .engine.locate import EngineInfo, load_built_engine, pinned_build_key
from .mesh_setup import MeshPlan

ENGINE = "/sharedllm/engine/1"
MAX_ARCHIVE_BYTES = 1024**3
_CHUNK = 256 * 1024
_log = logging.getLogger("sharedllm.engine")


class EngineFetchError(Exception):
    """No member handed over a usable engine; the message says why."""


def engine_offer(engine: EngineInfo, backend: str) -> dict[str, Any]:
    """What our gossiped state says of the engine we can hand over: only our own build (a
    configured or PATH engine is the user's, not ours to copy)."""
    if engine.source != "built":
        return {}
    here = Platform.here()
    offer = {
        "build_key": pinned_build_key(backend),
        "system": here.system,
        "machine": here.machine,
        "cpu_features": sorted(here.cpu_features),
    }
    return {"engine_offer": offer}


def usable_offer(content: Mapping[str, Any], here: Platform, build_key: str) -> bool:
    """Whether a member's offer is an engine for this machine (it may lack none of its CPU
    features here; a malformed offer is not usable)."""
    offer = content.get("engine_offer")
    if not isinstance(offer, dict):
        return False
    features = offer.get("cpu_features")
    return (
        offer.get("build_key") == build_key
        and offer.get("system") == here.system
        and offer.get("machine") == here.machine
        and isinstance(features, list)
        and all(isinstance(f, str) for f in features)
        and (not here.cpu_features or set(features) <= set(here.cpu_features))
    )


class EngineShare:
    """Serves our engine archive to members (packed once, on the first request)."""

    def __init__(self, cache_dir: Path, backend: str) -> None:
        self._cache_dir = cache_dir
        self._backend = backend
        self._lock = trio.Lock()
        self._packed: tuple[Path, str, int] | None = None

    async def serve(self, stream: MeshStream) -> None:
        async with self._lock:
            if self._packed is None:
                self._packed = await trio.to_thread.run_sync(self._pack)
        path, digest, size = self._packed
        await send_frame(stream, records.encode("engine-archive", [size, digest]))
        with path.open("rb") as archive:
            while block := await trio.to_thread.run_sync(archive.read, _CHUNK):
                await stream.send_all(block)

    def _pack(self) -> tuple[Path, str, int]:
        target = self._cache_dir / "engine" / f"{pinned_build_key(self._backend)}.tar.gz"
        if load_built_engine(self._cache_dir, self._backend) is None:
            raise TransportError("this node has no built engine to hand over")
        pack_engine(self._cache_dir, self._backend, target)
        digest = hashlib.sha256(target.read_bytes()).hexdigest()
        return target, digest, target.stat().st_size


async def receive_archive(stream: MeshStream, destination: Path) -> None:
    """The archive a member sends, checked against the size and SHA-256 it announced."""
    size, digest = records.decode(
        await receive_frame(stream, timeout_s=120), "engine-archive", [int, str], max_bytes=256
    )
    if not 0 < size <= MAX_ARCHIVE_BYTES:
        raise EngineFetchError(f"the member offers an archive of {size} bytes")
    hashed, received = hashlib.sha256(), 0
    with destination.open("wb") as out:
        while received < size:
            block = await stream.receive_some(min(_CHUNK, size - received))
            if not block:
                raise EngineFetchError(f"the archive stopped after {received} of {size} bytes")
            hashed.update(block)
            out.write(block)
            received += len(block)
    if hashed.hexdigest() != digest:
        raise EngineFetchError("the archive does not match the SHA-256 its member announced")


def fetch_engine_from_mesh(
    plan: MeshPlan,
    listen: tuple[str, ...],
    bootstrap: tuple[str, ...],
    cache_dir: Path,
    *,
    backend: str,
    wall_clock: Callable[[], float],
    rng: RandomSource,
    timeout_s: float = 600.0,
) -> EngineInfo:
    """Joins the mesh without serving, until a member of this platform hands over its engine,
    and installs it."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as work:
        archive = Path(work) / "engine.tar.gz"
        found = trio.run(
            partial(
                _fetch_archive,
                plan,
                archive,
                pinned_build_key(backend),
                _Mesh(listen, bootstrap, wall_clock, rng, timeout_s),
            )
        )
        if not found:
            here = Platform.here()
            raise EngineFetchError(
                f"no member of this platform ({here.system} {here.machine}) offered its engine "
                f"within {timeout_s:.0f} s: build it here (`sharedllm-node engine build`)"
            )
        return install_engine(archive, cache_dir)


@dataclass(frozen=True)
class _Mesh:
    """How to take part in the mesh while fetching."""

    listen: tuple[str, ...]
    bootstrap: tuple[str, ...]
    wall_clock: Callable[[], float]
    rng: RandomSource
    timeout_s: float


async def _fetch_archive(plan: MeshPlan, archive: Path, key: str, mesh: _Mesh) -> bool:
    here = Platform.here()
    async with open_libp2p_transport(plan.identity, mesh.listen) as transport:
        membership = MembershipState(plan.files.mesh_public_key)
        data_plane = DataPlane(plan.identity, plan.files.proof, membership.admit_encoded)
        data_plane.interfaces = tuple(local_interfaces())
        service = MeshService(
            transport=transport,
            identity=plan.identity,
            membership=membership,
            proof=plan.files.proof,
            name="(fetching the engine)",
            describe_self=dict,
            wall_clock=mesh.wall_clock,
            rng=mesh.rng,
            data_plane=data_plane,
        )
        found = False
        async with trio.open_nursery() as nursery:
            nursery.start_soon(service.run, mesh.bootstrap)
            with trio.move_on_after(mesh.timeout_s):
                while not (found := await _try_members(service, data_plane, here, key, archive)):
                    await trio.sleep(2.0)
            nursery.cancel_scope.cancel()
        return found


async def _try_members(
    service: MeshService, data_plane: DataPlane, here: Platform, key: str, archive: Path
) -> bool:
    for peer, content in sorted(service.member_states().items()):
        if peer == service.identity.peer_id or not usable_offer(content, here, key):
            continue
        addresses = data_addresses(service.store.states.get(peer))
        try:
            stream = await data_plane.connect(peer, addresses, ENGINE)
            try:
                await receive_archive(stream, archive)
            finally:
                await stream.aclose()
        except (TransportError, EngineFetchError, RecordError, FrameError, OSError) as err:
            _log.warning("fetching the engine from %s failed: %s", peer, err)
            await trio.Path(archive).unlink(missing_ok=True)
            continue
        _log.info("engine archive received from %s", peer)
        return True
    return False
