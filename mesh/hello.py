"""The hello exchange over the Transport seam: proving membership on every new connection.

When a connection opens, the dialer sends its membership proof on the hello protocol and the
listener answers with its own; `HelloDesk` judges both sides. Every other protocol is served
only to admitted peers (`members_only`); anyone else is disconnected.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence

import trio

from .addresses import order_multiaddrs
from .admission import HelloDesk
from .membership import Proof
from .mesh_core import Action, Do
from .shell import PROTOCOL_FAULTS, MeshShell
from .transport.seam import MeshStream, StreamHandler, TransportError

HELLO = "/sharedllm/hello/2"
DISCOVERED_PER_ROUND = 8  # LAN-announced addresses dialed per bootstrap round
REFUSAL_LINGER_S = 1.0  # how long a refused peer is given to read why
# A joiner that answered our hello with "my own is on its way" may speak before that hello
# reaches us: its streams are dropped quietly for this long rather than its connection cut.
HELLO_EXPECTED_S = 10.0
MAX_HELLOS_EXPECTED = 256
_log = logging.getLogger("sharedllm.mesh")


class Hello(MeshShell):
    hello_desk: HelloDesk
    _hello_pending: set[str]
    _hello_expected: dict[str, float]  # peer -> until when its own hello is expected
    on_new_proof: Callable[[Proof], None] | None

    async def _serve_hello(self, stream: MeshStream) -> None:
        peer, source, now = stream.remote_peer, stream.remote_host, trio.current_time()
        if not self.hello_desk.may_read(source, now):
            self.traffic.limited_hellos += 1  # no proof is read or checked for it
            await self.transport.disconnect(peer)
            return
        try:
            hello = await self._receive(stream, self.timing.exchange_timeout_s)
        except PROTOCOL_FAULTS as err:
            answer = self.hello_desk.refuse(peer, source, now, str(err))
        else:
            answer = self.hello_desk.answer(hello, peer, source, now, self.wall_clock())
        if not answer.admitted:
            self.traffic.refused_hellos += 1
            self.faults.log.emit("refused-hello", "refused %s: %s", peer, answer.refusal)
        if answer.admitted:
            # Admitted before the answer leaves: the peer may speak (gossip, a ping) as soon as
            # it reads it, and a stream from a peer not admitted yet cuts its connection.
            self._admit(peer)
            await self._send(stream, answer.reply)
            return
        await self._send(stream, answer.reply)
        if answer.reply:  # a revocation: the revoked node must learn it, or it keeps asking
            await self._until_read(stream)
        await self.transport.disconnect(peer)

    async def _until_read(self, stream: MeshStream) -> None:
        """Waits (briefly) for the peer to close its side after our refusal: cutting the
        connection at once resets the stream before the refusal arrives. Only for a refusal
        with content: lingering, the peer-wide disconnect would also cut the peer's next
        connection if it came first."""
        with trio.move_on_after(min(REFUSAL_LINGER_S, self.timing.exchange_timeout_s)):
            try:
                while await stream.receive_some(64):
                    pass
            except TransportError:
                pass

    async def introduce(self, peer: str) -> bool:
        """Runs the hello exchange with a newly connected peer; False (and disconnected) if
        either side refuses."""
        self._hello_pending.add(peer)
        try:
            stream = await self.transport.open_stream(peer, HELLO)
            try:
                await self._send(stream, self.proof.encode())
                reply = await self._receive(stream, self.timing.exchange_timeout_s)
            finally:
                await stream.aclose()
        except PROTOCOL_FAULTS as err:
            _log.warning("could not join %s: %s", peer, err)
            await self.transport.disconnect(peer)
            return False
        finally:
            self._hello_pending.discard(peer)
        verdict = self.hello_desk.read_reply(reply, peer)
        if verdict.revocation is not None:
            self.learn_revocation(verdict.revocation)
        if verdict.waiting:
            # A joiner whose own hello to us is on its way (it carries the redemption we admit
            # then): cutting the connection now would cut that hello too, again and again.
            _log.debug("%s has not been admitted yet; its own hello will be", peer)
            self._expect_hello(peer, trio.current_time())
            return False
        if not verdict.admitted:
            _log.warning("could not join %s: %s", peer, verdict.refusal)
            await self.transport.disconnect(peer)
            return False
        if verdict.admission is not None:
            self._adopt(verdict.admission)
        self._admit(peer)
        # Exchange states at once: two nodes that joined through different peers may each
        # belong to a group that has not heard of the other, and only such a first exchange
        # is sure to tell the groups apart from the start (random rounds may take minutes).
        self._in_background(Action(Do.EXCHANGE, peer), self._exchange_with)
        link = self.links.get(peer)
        if link is None or link.rtt_ms is None:
            # And its link measured at once rather than in its turn among the probes (up to a
            # probe period per member): no plan counts on a peer until its link is. A ping, not
            # SWIM's probe: one lost in the rush of a forming mesh must not make it suspect.
            self._in_background(Action(Do.PROBE, peer), self._ping)
        return True

    def _admit(self, peer: str) -> None:
        if peer not in self.admitted:
            _log.info("admitted %s", peer)
        self.admitted.add(peer)
        self._hello_expected.pop(peer, None)
        self.core.met(peer)

    def _expect_hello(self, peer: str, now: float) -> None:
        expected = self._hello_expected
        for gone in [p for p, until in expected.items() if until <= now]:
            del expected[gone]
        if len(expected) < MAX_HELLOS_EXPECTED:
            expected[peer] = now + HELLO_EXPECTED_S

    def _members_only(self, handler: StreamHandler) -> StreamHandler:
        async def members_only(stream: MeshStream) -> None:
            if stream.remote_peer in self._hello_pending:
                return  # it admitted us and spoke before its answer to our hello reached us
            if self._hello_expected.get(stream.remote_peer, -math.inf) > trio.current_time():
                return  # a joiner that admitted us and spoke before its own hello reached us
            if stream.remote_peer not in self.admitted:
                self.faults.log.emit(
                    "no-proof", "dropping %s: no membership proof yet", stream.remote_peer
                )
                self.traffic.refused_streams += 1
                await self.transport.disconnect(stream.remote_peer)
                return
            await handler(stream)

        return members_only

    async def _dial_bootstrap(self, bootstrap: Sequence[str]) -> None:
        """Dials the bootstrap addresses until one of them has let us in. Being connected is
        not enough: nodes that joined through us may have dialed us while our own way in
        failed, and such a group would otherwise live on as a mesh of its own. Addresses found
        on the LAN come after them, a few of the newest each round."""
        connected = set(self.transport.connected_peers())
        found = list(self.discovered())[:DISCOVERED_PER_ROUND]
        for address in dict.fromkeys([*order_multiaddrs(bootstrap, self.interfaces()), *found]):
            with trio.move_on_after(self.timing.exchange_timeout_s):
                try:
                    peer = await self.transport.connect(address)
                except TransportError as err:
                    _log.debug("cannot reach %s: %s", address, err)
                    continue
                if peer == self.identity.peer_id:
                    continue
                # A new connection proves membership again, even to a peer admitted before:
                # the other side may have restarted and forgotten us.
                if peer not in connected or peer not in self.admitted:
                    connected.add(peer)
                    await self.introduce(peer)
                if peer in self.admitted:
                    self.core.bootstrapped = True
