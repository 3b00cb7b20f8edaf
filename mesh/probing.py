"""Probes, over the control plane and the data plane: SWIM's pings (direct and through others),
dialing members, and bulk transfers that measure a link's bandwidth and the data plane's round
trip."""

from __future__ import annotations

import logging
import statistics

import trio

from .addresses import MAX_ADVERTISED, beyond_this_machine, host_of_multiaddr, order_multiaddrs
from .gossip import SignedState
from .link_stats import PROBE_BLOCK_BYTES, PeerLink
from .probe_records import (
    News,
    decode_ping_request,
    decode_probe_header,
    encode_ping_request,
    encode_probe_header,
)
from .records import RecordError
from .shell import PROTOCOL_FAULTS, MeshShell
from .transport.framing import receive_frame, send_frame
from .transport.happy_eyeballs import first_to_connect
from .transport.seam import MeshStream, TransportError

PING = "/sharedllm/ping/1"
PING_REQ = "/sharedllm/ping-req/1"
BANDWIDTH = "/sharedllm/bandwidth/2"
_ECHOES = 9  # round-trip samples after each bandwidth probe
_PROBES_PER_ROUND = 3  # probes of growing size in one bandwidth round, at most
STATES_PER_PROBE = 4
_log = logging.getLogger("sharedllm.mesh")


class Probing(MeshShell):
    def _news(self) -> bytes:
        """What every probe and answer carries: a few rumors and a few new states."""
        rumors = self.swim.rumors_to_send(self.timing.rumors_per_message)
        return News(tuple(rumors), tuple(self._state_rumors.take(STATES_PER_PROBE))).encode()

    def _take_news(self, data: bytes) -> None:
        news = News.decode(data, 4 * self.timing.rumors_per_message, STATES_PER_PROBE)
        now = trio.current_time()
        for rumor in news.rumors:
            self.swim.hear(rumor, now)
        self._merge(news.states)

    async def _serve_ping(self, stream: MeshStream) -> None:
        self._take_news(await self._receive(stream, self.timing.exchange_timeout_s))
        await self._send(stream, self._news())

    async def _ping(self, peer: str) -> None:
        """One probe: news out, news back, and the round trip as an RTT sample."""
        started = trio.current_time()
        stream = await self.transport.open_stream(peer, PING)
        try:
            await self._send(stream, self._news())
            answer = await self._receive(stream, self.timing.probe_timeout_s)
        finally:
            await stream.aclose()
        link = self.links.setdefault(peer, PeerLink())
        first = link.rtt_ms is None
        link.observe((trio.current_time() - started) * 1000)
        self._take_news(answer)
        if first:
            self.measured_first()

    async def _serve_ping_request(self, stream: MeshStream) -> None:
        """Probes a member on behalf of a peer that could not reach it (indirect probe)."""
        target = decode_ping_request(await self._receive(stream, self.timing.exchange_timeout_s))
        reached = target in self.admitted and await self._try(self._ping, target)
        await self._send(stream, b"1" if reached else b"0")

    async def _ask_to_ping(self, helper: str, target: str) -> bool:
        stream = await self.transport.open_stream(helper, PING_REQ)
        try:
            await self._send(stream, encode_ping_request(target))
            return await self._receive(stream, 2 * self.timing.probe_timeout_s) == b"1"
        finally:
            await stream.aclose()

    async def _probe(self, target: str) -> None:
        """SWIM's probe: direct, then through a few others, then suspicion."""
        now = trio.current_time()
        reached = target in self.transport.connected_peers() or await self._try(
            self._connect_to, target
        )
        if reached and await self._try(self._ping, target):
            self.swim.probe_answered(target, trio.current_time())
            return
        helpers = [
            p for p in self.transport.connected_peers() if p in self.admitted and p != target
        ]
        chosen = self.rng.sample(helpers, min(self.timing.indirect_probes, len(helpers)))
        answered = False
        async with trio.open_nursery() as nursery:

            async def ask(helper: str) -> None:
                nonlocal answered
                if await self._try(self._ask_to_ping, helper, target):
                    answered = True
                    nursery.cancel_scope.cancel()

            for helper in chosen:
                nursery.start_soon(ask, helper)
        if answered:
            self.swim.probe_answered(target, trio.current_time())
        else:
            _log.debug("probe of %s failed directly and through %d others", target, len(chosen))
            self.swim.probe_failed(target, now)

    async def reach(self, peer: str) -> bool:
        """Connected to `peer`, dialing its gossiped addresses (and saying hello) if not yet:
        a carried data stream needs a control connection, relayed or not."""
        if peer in self.transport.connected_peers():
            return True
        return await self._connect_to(peer)

    async def _connect_to(self, peer: str) -> bool:
        """Dials a member we know of by its gossiped addresses, raced in dial order (the one
        that worked last first, the next after a short stagger or a failure), and proves
        membership."""
        state = self.store.states.get(peer)
        content = None if state is None else self.content_of(state)
        gossiped = [] if content is None else content.get("addrs", [])
        link = self.links.get(peer)
        addresses = order_multiaddrs(
            [a for a in gossiped[:MAX_ADVERTISED] if isinstance(a, str)],
            self.interfaces(),
            None if link is None or link.address is None else host_of_multiaddr(link.address),
        )
        addresses = beyond_this_machine(addresses, self.interfaces())
        try:
            if len(addresses) == 1:  # nothing to race (the simulator's nodes have one)
                address = addresses[0]
                await self._dial(peer, address)
            else:
                address, _ = await first_to_connect(addresses, lambda a: self._dial(peer, a))
        except TransportError as err:
            _log.debug("cannot reach %s: %s", peer, err)
            return False
        self.links.setdefault(peer, PeerLink()).address = address
        return await self.introduce(peer)

    async def _dial(self, peer: str, address: str) -> _Dialed:
        """One attempt of `_connect_to`; several race (an address that reaches nothing, such
        as a private one in another home, costs a stagger, and a relay's address is tried
        soon after)."""
        with trio.move_on_after(self.timing.exchange_timeout_s):
            found = await self.transport.connect(address)
            if found != peer:
                if found not in self.admitted:
                    await self.transport.disconnect(found)  # not whom we meant to reach
                raise TransportError(f"{address} is {found}, not {peer}")
            return _Dialed()
        raise TransportError(f"no answer at {address}")

    async def _measure_bandwidth(self, peer: str) -> None:
        """Times bulk transfers over the data plane, then the round trip of small frames. The
        first probe is small; while one ends too soon to time, a bigger one follows (up to
        `bandwidth_probe_bytes`), sized by what the last one measured."""
        addresses = data_addresses(self.store.states.get(peer))
        if self.data_plane is None or not addresses:
            return
        link = self.links.setdefault(peer, PeerLink())
        limit_s = self.timing.exchange_timeout_s * 4
        largest = self.timing.bandwidth_probe_bytes
        for _ in range(_PROBES_PER_ROUND):
            size = link.probe_size(largest)
            with trio.move_on_after(limit_s) as timer:
                try:
                    seconds = await self._probe_once(peer, addresses, size, link)
                except PROTOCOL_FAULTS as err:
                    _log.debug("bandwidth probe to %s failed: %s", peer, err)
                    return
            if timer.cancelled_caught:
                link.probe_timed_out(size, limit_s)
                return
            if not link.probed(size, seconds, largest):
                return

    async def _probe_once(
        self, peer: str, addresses: list[tuple[str, int]], size: int, link: PeerLink
    ) -> float:
        """One bulk probe of `size` bytes; its seconds (the data plane's RTT noted on `link`)."""
        assert self.data_plane is not None
        stream = await self.data_plane.connect(peer, addresses, BANDWIDTH)
        try:
            started = trio.current_time()
            await send_frame(stream, encode_probe_header(size))
            block = bytes(PROBE_BLOCK_BYTES)
            for _ in range(size // len(block)):
                await stream.send_all(block)
            await receive_frame(stream, self.timing.exchange_timeout_s)
            seconds = trio.current_time() - started
            link.data_rtt_ms = await _time_echoes(stream, self.timing.exchange_timeout_s) * 1000
        finally:
            await stream.aclose()
        return seconds

    def bandwidth_candidates(self) -> list[tuple[str, bool]]:
        """(peer, measured already) for each admitted member with a data-plane address."""
        return [
            (peer, self.links.get(peer, PeerLink()).bandwidth_mbps is not None)
            for peer in sorted(self.admitted)
            if data_addresses(self.store.states.get(peer))
        ]


class _Dialed:
    """A connection `_dial` made: the transport keeps it (a late one is simply kept too)."""

    async def aclose(self) -> None:
        return None


def data_addresses(state: SignedState | None) -> list[tuple[str, int]]:
    """The data-plane addresses a member gossips (at most MAX_ADVERTISED; malformed entries
    are left out)."""
    if state is None:
        return []
    try:
        value = state.content().get("data_addrs")
    except RecordError:
        return []
    found = []
    for entry in value[:MAX_ADVERTISED] if isinstance(value, list) else []:
        if (
            isinstance(entry, list)
            and len(entry) == 2
            and isinstance(entry[0], str)
            and len(entry[0]) <= 64
            and isinstance(entry[1], int)
            and 0 < entry[1] < 65536
        ):
            found.append((entry[0], entry[1]))
    return found


async def sink_and_acknowledge(stream: MeshStream) -> None:
    """The far end of a bandwidth probe: reads the announced byte count, acknowledges, then
    echoes the prober's small frames (its round-trip samples)."""
    remaining = decode_probe_header(await receive_frame(stream))
    while remaining > 0:
        chunk = await stream.receive_some(min(remaining, 256 * 1024))
        if not chunk:
            return
        remaining -= len(chunk)
    await send_frame(stream, b"k")
    for _ in range(_ECHOES):
        await send_frame(stream, await receive_frame(stream))


async def _time_echoes(stream: MeshStream, timeout_s: float) -> float:
    """The median round trip of small frames on a data-plane stream, in seconds."""
    samples = []
    for index in range(_ECHOES):
        started = trio.current_time()
        await send_frame(stream, index.to_bytes(8, "big"))
        await receive_frame(stream, timeout_s)
        samples.append(trio.current_time() - started)
    return statistics.median(samples)
