"""A simulated network behind the mesh's Transport seam, on trio's clock.

Nodes, connections and streams live in one process. Bytes take time: one-way latency (with
jitter) plus size over bandwidth, and a segment "lost" on the way arrives one retransmission
timeout later, as over TCP; streams keep order, half-close and report a dead peer. Partitions
(one-way too) hold traffic until they heal; a crashed node's streams break at once.

Under the simulator's clock (simnet/clock.py) time jumps to the next timer whenever every task
waits, so a simulated minute takes only the CPU time of what happens in it. Every
random choice comes from one seeded `random.Random`, and every event feeds a SHA-256 trace
digest: the same seed must give the same digest.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import math
import random
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import trio

from ..mesh.transport.seam import MeshStream, StreamHandler, TransportError

_CONNECT_TIMEOUT_S = 3.0
# A send that takes longer than this on its link holds the sender (backpressure); shorter ones
# just arrive later, which costs the simulator one timer less per message.
_BACKPRESSURE_S = 0.001


@dataclass(frozen=True)
class LinkProfile:
    latency_s: float = 0.0005  # one way
    jitter_s: float = 0.0001
    bandwidth_bytes_per_s: float = 125e6  # 1 Gbit/s
    loss: float = 0.0  # chance that a segment needs one retransmission
    retransmit_s: float = 0.2


@dataclass
class NodeTraffic:
    messages_sent: int = 0
    bytes_sent: int = 0


class _Channel:
    """One direction of a stream: timed segments in order, then maybe an end.

    A reader with nothing to read yet is parked (no timer of its own); the network's postman
    wakes it when a segment falls due, and an end, a break or a healed partition wakes it at
    once.
    """

    def __init__(self, network: SimNetwork, source: str, target: str) -> None:
        self.network, self.source, self.target = network, source, target
        self.segments: deque[tuple[float, bytes]] = deque()
        self.last_delivery = 0.0
        self.ended = False  # the writer closed: the reader sees b"" after the data
        self.reader_gone = False
        self.broken: str | None = None
        self._parked: trio.lowlevel.Task | None = None

    def wake(self) -> None:
        """The reader looks again now."""
        task, self._parked = self._parked, None
        if task is not None:
            trio.lowlevel.reschedule(task)

    async def park(self) -> None:
        self._parked = trio.lowlevel.current_task()

        def abort(_: object) -> trio.lowlevel.Abort:
            self._parked = None
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)


class _Postman:
    """Wakes each reader when its segment falls due: one timer for the whole network, so
    the deliveries of one tick cost one wake-up of this task and one of each reader."""

    def __init__(self) -> None:
        self._due: list[tuple[float, int, _Channel]] = []
        self._sequence = itertools.count()  # same-instant deliveries keep their send order
        self._sleep: trio.CancelScope | None = None
        self._started = False

    def deliver_at(self, due: float, channel: _Channel) -> None:
        heapq.heappush(self._due, (due, next(self._sequence), channel))
        if not self._started:
            self._started = True
            trio.lowlevel.spawn_system_task(self._run, name="simnet postman")
        elif self._sleep is not None and due < self._sleep.deadline:
            self._sleep.deadline = due

    async def _run(self) -> None:
        while True:
            now = trio.current_time()
            while self._due and self._due[0][0] <= now:
                heapq.heappop(self._due)[2].wake()
            with trio.CancelScope(deadline=self._due[0][0] if self._due else math.inf) as sleep:
                self._sleep = sleep
                await trio.sleep_forever()
            self._sleep = None


class SimStream:
    """One end of a simulated stream, as a `MeshStream`."""

    def __init__(self, remote_peer: str, outgoing: _Channel, incoming: _Channel) -> None:
        self._remote = remote_peer
        self._out = outgoing
        self._in = incoming

    @property
    def remote_peer(self) -> str:
        return self._remote

    @property
    def remote_host(self) -> str | None:
        return None  # simulated nodes have peer ids, not addresses

    async def send_all(self, data: bytes) -> None:
        out = self._out
        if out.broken or out.reader_gone or out.ended:
            raise TransportError(out.broken or f"stream to {self._remote} is closed")
        network = out.network
        link = network.link(out.source, out.target)
        transmit_s = len(data) / link.bandwidth_bytes_per_s
        if transmit_s >= _BACKPRESSURE_S:
            await trio.sleep(transmit_s)  # the sender is busy while its bytes go out
            transmit_s = 0.0
        else:
            await trio.lowlevel.checkpoint()  # small messages: their time goes into the delay
        if out.broken:
            raise TransportError(out.broken)
        delay = transmit_s + link.latency_s + network.rng.random() * link.jitter_s
        if link.loss and network.rng.random() < link.loss:
            delay += link.retransmit_s
        due = max(out.last_delivery, trio.current_time() + delay)
        out.last_delivery = due
        out.segments.append((due, bytes(data)))
        network.postman.deliver_at(due, out)
        traffic = network.traffic.setdefault(out.source, NodeTraffic())
        traffic.messages_sent += 1
        traffic.bytes_sent += len(data)
        network.record("send", out.source, out.target, len(data))

    async def receive_some(self, max_bytes: int) -> bytes:
        channel = self._in
        network = channel.network
        while True:
            if channel.broken:
                raise TransportError(channel.broken)
            if channel.segments and not network.blocked(channel.source, channel.target):
                due, data = channel.segments[0]
                if due <= trio.current_time():
                    if len(data) <= max_bytes:
                        channel.segments.popleft()
                        return data
                    channel.segments[0] = (due, data[max_bytes:])
                    return data[:max_bytes]
            elif not channel.segments and channel.ended:
                return b""
            await channel.park()  # for bytes, an end, a break, or a partition's healing

    async def aclose(self) -> None:
        if not self._out.ended:
            self._out.ended = True
            self._out.wake()
        self._in.reader_gone = True
        await trio.lowlevel.checkpoint()


class SimTransport:
    """One node's view of the simulated network (the `Transport` protocol)."""

    def __init__(self, network: SimNetwork, peer_id: str) -> None:
        self.network = network
        self.peer_id = peer_id
        self.handlers: dict[str, StreamHandler] = {}
        self.connections: dict[str, None] = {}  # ordered: traces must not hang on str hashes
        self.nursery: trio.Nursery | None = None  # where this node's stream handlers run
        self.up = False

    @property
    def local_peer_id(self) -> str:
        return self.peer_id

    def listen_addrs(self) -> Sequence[str]:
        return [f"/sim/{self.peer_id}/p2p/{self.peer_id}"]

    async def connect(self, address: str) -> str:
        peer = address.rstrip("/").rsplit("/", 1)[-1]
        target = self.network.nodes.get(peer)
        rtt = self.network.rtt(self.peer_id, peer)
        if target is None or not target.up or peer == self.peer_id:
            await trio.sleep(rtt)
            raise TransportError(f"connection to {address} refused")
        if self.network.blocked(self.peer_id, peer) or self.network.blocked(peer, self.peer_id):
            await trio.sleep(_CONNECT_TIMEOUT_S)
            raise TransportError(f"connection to {address} timed out")
        await trio.sleep(rtt)
        if not target.up:
            raise TransportError(f"connection to {address} reset")
        self.connections[peer] = None
        target.connections[self.peer_id] = None
        self.network.record("connect", self.peer_id, peer, 0)
        return peer

    async def open_stream(self, peer_id: str, protocol: str) -> MeshStream:
        target = self.network.nodes.get(peer_id)
        if peer_id not in self.connections or target is None or not target.up:
            raise TransportError(f"not connected to {peer_id}")
        await trio.sleep(self.network.rtt(self.peer_id, peer_id))  # protocol negotiation
        handler = target.handlers.get(protocol)
        if not target.up or target.nursery is None or peer_id not in self.connections:
            raise TransportError(f"{peer_id} went away")
        if handler is None:
            raise TransportError(f"{peer_id} does not serve {protocol}")
        out = self.network.open_channel(self.peer_id, peer_id)
        back = self.network.open_channel(peer_id, self.peer_id)
        target.nursery.start_soon(_run_handler, handler, SimStream(self.peer_id, back, out))
        return SimStream(peer_id, out, back)

    def serve(self, protocol: str, handler: StreamHandler) -> None:
        self.handlers[protocol] = handler

    def connected_peers(self) -> Sequence[str]:
        return list(self.connections)

    async def disconnect(self, peer_id: str) -> None:
        self.network.cut(self.peer_id, peer_id, "disconnected")
        await trio.lowlevel.checkpoint()


async def _run_handler(handler: StreamHandler, stream: SimStream) -> None:
    try:
        await handler(stream)
    except TransportError:
        pass
    finally:
        await stream.aclose()


@dataclass
class SimNetwork:
    rng: random.Random
    default_link: LinkProfile = field(default_factory=LinkProfile)
    nodes: dict[str, SimTransport] = field(default_factory=dict)
    links: dict[tuple[str, str], LinkProfile] = field(default_factory=dict)
    traffic: dict[str, NodeTraffic] = field(default_factory=dict)
    _blocked: set[tuple[str, str]] = field(default_factory=set)
    _channels: dict[tuple[str, str], list[_Channel]] = field(default_factory=dict)
    _trace: hashlib._Hash = field(default_factory=hashlib.sha256)
    events: int = 0
    postman: _Postman = field(default_factory=_Postman)
    started_at: float = field(default_factory=trio.current_time)

    def add_node(self, peer_id: str) -> SimTransport:
        transport = SimTransport(self, peer_id)
        self.nodes[peer_id] = transport
        return transport

    def link(self, source: str, target: str) -> LinkProfile:
        return self.links.get((source, target), self.default_link)

    def rtt(self, a: str, b: str) -> float:
        return self.link(a, b).latency_s + self.link(b, a).latency_s

    def blocked(self, source: str, target: str) -> bool:
        return (source, target) in self._blocked

    def partition(
        self, side_a: Sequence[str], side_b: Sequence[str], both_ways: bool = True
    ) -> None:
        """Traffic from side_a to side_b (and back, if both_ways) is held until `heal`."""
        for a in side_a:
            for b in side_b:
                self._blocked.add((a, b))
                if both_ways:
                    self._blocked.add((b, a))
        self.record("partition", str(len(side_a)), str(len(side_b)), int(both_ways))

    def heal(self) -> None:
        self._blocked.clear()
        self.record("heal", "", "", 0)
        for channels in self._channels.values():
            for channel in channels:
                channel.wake()  # traffic held by the partition flows again

    def open_channel(self, source: str, target: str) -> _Channel:
        channel = _Channel(self, source, target)
        key = (min(source, target), max(source, target))
        channels = self._channels.setdefault(key, [])
        channels[:] = [c for c in channels if not (c.ended and c.reader_gone) and not c.broken]
        channels.append(channel)
        return channel

    def cut(self, a: str, b: str, why: str) -> None:
        """Ends the connection between a and b: their open streams break."""
        for transport, other in ((self.nodes.get(a), b), (self.nodes.get(b), a)):
            if transport is not None:
                transport.connections.pop(other, None)
        for channel in self._channels.pop((min(a, b), max(a, b)), []):
            channel.broken = f"connection between {a} and {b} {why}"
            channel.wake()
        self.record("cut", a, b, 0)

    def crash(self, peer_id: str) -> None:
        node = self.nodes[peer_id]
        node.up = False
        for other in sorted(node.connections):
            self.cut(peer_id, other, "lost: peer crashed")
        node.handlers.clear()
        node.nursery = None
        self.record("crash", peer_id, "", 0)

    def record(self, kind: str, a: str, b: str, size: int) -> None:
        self.events += 1
        now = trio.current_time() - self.started_at
        self._trace.update(f"{now:.6f} {kind} {a} {b} {size}\n".encode())

    def trace_digest(self) -> str:
        return self._trace.hexdigest()
