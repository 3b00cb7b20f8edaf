"""What the parts of the mesh's I/O shell share: its state, what each part offers the others,
framed sends and receives with traffic counts, and bounded tasks.

`MeshService` is assembled from the parts (`Hello`, `OwnState`, `AntiEntropy`, `Probing`)
that each serve one concern over the Transport seam; this protocol names what they may use.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol

import trio

from .addresses import LocalInterface
from .containment import HandlerFaults
from .gossip import GossipStore, SignedState
from .identity import NodeIdentity
from .link_stats import ControlTraffic, PeerLink
from .member_states import MemberStates
from .membership import Admission, Proof, Revocation
from .membership_state import MembershipState
from .mesh_core import Action, MeshCore
from .random_source import RandomSource
from .records import RecordError
from .send_queue import SendQueue
from .swim import Swim
from .timing import MeshTiming
from .transport.data_plane import DataPlane
from .transport.framing import FrameError, receive_frame, send_frame
from .transport.seam import MeshStream, Transport, TransportError

PROTOCOL_FAULTS = (TransportError, FrameError, RecordError)
_log = logging.getLogger("sharedllm.mesh")


class MeshShell(Protocol):
    transport: Transport
    identity: NodeIdentity
    membership: MembershipState
    proof: Proof
    name: str
    describe_self: Callable[[], Mapping[str, Any]]
    wall_clock: Callable[[], float]
    rng: RandomSource
    timing: MeshTiming
    data_plane: DataPlane | None
    interfaces: Callable[[], Sequence[LocalInterface]]  # this machine's, for the order of dials
    discovered: Callable[[], Sequence[str]]  # addresses announced on the LAN (mDNS), newest first
    store: GossipStore
    admitted: set[str]
    links: dict[str, PeerLink]
    traffic: ControlTraffic
    faults: HandlerFaults
    core: MeshCore
    on_state_news: Callable[[], None] | None  # news serving acts on at once
    swim: Swim
    _tasks: trio.Nursery | None
    _contents: dict[str, tuple[int, dict[str, Any]]]
    _known: MemberStates
    _members: MemberStates
    _state_rumors: SendQueue[SignedState]
    _leaving: bool

    async def introduce(self, peer: str) -> bool: ...

    def _place_member(self, peer: str) -> None: ...

    def _adopt(self, admission: Admission) -> None: ...

    async def _connect_to(self, peer: str) -> bool: ...

    def _queue_state(self, state: SignedState) -> None: ...

    def _remember(self, state: SignedState, content: dict[str, Any]) -> None: ...

    def learn_revocation(self, revocation: Revocation) -> None: ...

    def _revocation_summary(self) -> str: ...

    def _merge(self, states: Sequence[SignedState]) -> int: ...

    def content_of(self, state: SignedState) -> dict[str, Any] | None: ...

    async def _send(self, stream: MeshStream, payload: bytes) -> None:
        await send_frame(stream, payload)
        self.traffic.sent(len(payload))

    async def _receive(self, stream: MeshStream, timeout_s: float) -> bytes:
        payload = await receive_frame(stream, timeout_s)
        self.traffic.received(len(payload))
        return payload

    def _in_background(self, action: Action, run: Callable[[str], Awaitable[object]]) -> None:
        """Runs `run(action.peer)` in the background unless the same action is running."""
        ...

    def _publish(self) -> None: ...

    def measured_first(self) -> None:
        """Reports a link's first figure (the core then publishes soon in a small mesh)."""
        ...

    def timers_moved(self) -> None:
        """The core's timers were moved from outside its loop: the loop looks again."""
        ...

    async def _ping(self, peer: str) -> None: ...

    async def _exchange_with(self, peer: str) -> None: ...

    async def _bounded(
        self, kind: str, peer: str, action: Callable[[str], Awaitable[object]]
    ) -> None:
        with trio.move_on_after(self.timing.exchange_timeout_s):
            try:
                await action(peer)
            except PROTOCOL_FAULTS as err:
                self.traffic.faults += 1
                _log.debug("%s with %s failed: %s", kind, peer, err)

    async def _try(self, action: Callable[..., Awaitable[Any]], *args: Any) -> bool:
        """Whether `action` finishes without a fault within the probe timeout."""
        with trio.move_on_after(2 * self.timing.probe_timeout_s):
            try:
                result = await action(*args)
            except PROTOCOL_FAULTS:
                return False
            return result is not False
        return False
