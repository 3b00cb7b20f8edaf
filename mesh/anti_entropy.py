"""Anti-entropy: digest exchanges of gossiped states, and revocation sets kept in step.

Rumours (piggybacked on probes) carry news fast; these full exchanges repair whatever they
missed. `MeshCore` decides when and with whom; this part runs the exchanges and keeps what
they bring.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import trio

from .gossip import Digest, Exchange, SignedState
from .membership import MembershipError
from .records import RecordError
from .revocation_sync import REVOCATIONS, RevocationBatch, RevokedIds, answer, provide
from .shell import MeshShell
from .swim import Liveness, Rumor
from .transport.seam import MeshStream

GOSSIP = "/sharedllm/gossip/2"
_STATE_SENDS = 4


class AntiEntropy(MeshShell):
    async def _exchange_with(self, peer: str) -> None:
        stream = await self.transport.open_stream(peer, GOSSIP)
        try:
            await self._send(stream, self.store.digest().encode())
            reply = Exchange.decode(await self._receive(stream, self.timing.exchange_timeout_s))
            known = len(self.store.states)
            new_states = self._merge(reply.states)
            self.core.note_news(new_states, reply.more, len(self.store.states) - known)
            await self._send(stream, self.store.provide(reply.wanted).encode())
        finally:
            await stream.aclose()

    async def _serve_gossip(self, stream: MeshStream) -> None:
        digest = Digest.decode(await self._receive(stream, self.timing.exchange_timeout_s))
        # A peer that knows many more members than we do: we are behind (a group of nodes
        # that joined together may have heard only of each other).
        self.core.note_news(len(digest.versions) - len(self.store.states), more=False)
        await self._send(stream, self.store.answer(digest).encode())
        pushed = Exchange.decode(await self._receive(stream, self.timing.exchange_timeout_s))
        known = len(self.store.states)
        new_states = self._merge(pushed.states)
        self.core.note_news(new_states, pushed.more, len(self.store.states) - known)

    async def _dial_and_exchange(self, peer: str) -> None:
        known = len(self.store.states)
        if peer in self.transport.connected_peers() or await self._connect_to(peer):
            await self._exchange_with(peer)
        self.core.far_exchange_done(found_members=len(self.store.states) > known)

    def _merge(self, states: Sequence[SignedState]) -> int:
        """Keeps the new states among `states`; returns how many there were."""
        now = trio.current_time()
        accepted = self.store.merge(states, admit=self._admit_state)
        heard_of, small_up_to = False, self.timing.full_mesh_up_to
        for state in accepted:
            if state.origin == self.identity.peer_id:
                continue
            heard_of = heard_of or state.origin not in self._known
            self._queue_state(state)  # news travels on
            content = self.content_of(state)
            if content is None:
                continue
            if content.get("leaving") is True:
                self.swim.hear(Rumor(state.origin, Liveness.LEFT, state.version), now)
            else:
                self.swim.heard_of(state.origin, state.version, now)
            claimed_before = self._known.get(state.origin, {}).get("claims")
            self._remember(state, content)
            acts_on = content.get("claims") != claimed_before or len(self._known) <= small_up_to
            if acts_on and self.on_state_news is not None:
                # A worker named in a new claim starts its part now; a small mesh plans as its
                # members' links come in (the election is cheap there).
                self.on_state_news()
        if heard_of:
            self.core.heard_of_members(now)
            self.timers_moved()
        return len(accepted)

    def _admit_state(self, state: SignedState) -> bool:
        try:
            content = state.content()
            proof = content.get("proof", b"")
            if not isinstance(proof, bytes):
                return False
            self.membership.admit_encoded(proof, state.origin)
        except (RecordError, MembershipError, ValueError, TypeError, AttributeError):
            return False
        self._contents[state.origin] = (state.version, content)
        return True

    def _queue_state(self, state: SignedState) -> None:
        """Spreads a new state by piggybacking it on the next few probes. Each node that gets
        it passes it on, so a few sends each reach nearly every node; anti-entropy finds the
        rest. (More sends would not fit: a probe carries only a few states.)"""
        self._state_rumors.put(state.origin, state, _STATE_SENDS)

    def content_of(self, state: SignedState) -> dict[str, Any] | None:
        """A state's decoded content, decoded once per version."""
        cached = self._contents.get(state.origin)
        if cached is not None and cached[0] == state.version:
            return cached[1]
        try:
            content = state.content()
        except RecordError:
            return None
        self._contents[state.origin] = (state.version, content)
        return content

    def _remember(self, state: SignedState, content: dict[str, Any]) -> None:
        self._contents[state.origin] = (state.version, content)
        self._known.put(state.origin, content)
        self._place_member(state.origin)

    def _place_member(self, peer: str) -> None:
        content = self._known.get(peer)
        if (peer == self.identity.peer_id or self.swim.is_live(peer)) and content is not None:
            self._members.put(peer, content)
        else:
            self._members.drop(peer)

    def revocations_differ(self, peer: str) -> bool:
        """Whether `peer` gossips a revocation set other than ours."""
        return (
            peer in self._known
            and self._known[peer].get("revoked", self._revocation_summary())
            != self._revocation_summary()
        )

    async def _serve_revocations(self, stream: MeshStream) -> None:
        theirs = RevokedIds.decode(await self._receive(stream, self.timing.exchange_timeout_s))
        await self._send(stream, answer(self.membership.revocations, theirs).encode())
        gift = RevocationBatch.decode(await self._receive(stream, self.timing.exchange_timeout_s))
        for revocation in gift.revocations:
            self.learn_revocation(revocation)

    async def _sync_revocations_with(self, peer: str) -> None:
        stream = await self.transport.open_stream(peer, REVOCATIONS)
        try:
            await self._send(stream, RevokedIds.of(self.membership.revocations).encode())
            batch = RevocationBatch.decode(
                await self._receive(stream, self.timing.exchange_timeout_s)
            )
            for revocation in batch.revocations:
                self.learn_revocation(revocation)
            await self._send(stream, provide(self.membership.revocations, batch.wanted).encode())
        finally:
            await stream.aclose()
