"""Members behind NATs: py-libp2p's circuit relay v2 (a member with `--relay` carries other
members' connections), reservations at relay members, dials through a relay, hole punching
(DCUtR) to upgrade a relayed connection to a direct one, and which path each peer is on.

The libp2p adapter's second module (the first is `libp2p_adapter`); nothing else imports
libp2p's relay. The relay is for members only: a hop stream from a peer that is not admitted
is reset before py-libp2p reads it, and every circuit is bounded in rate, bytes, time and
number (`RelayLimits`).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import multiaddr
import trio

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from libp2p.peer.id import ID
    from libp2p.peer.peerinfo import info_from_p2p_addr
    from libp2p.relay.circuit_v2 import (
        DCUTR_PROTOCOL_ID,
        CircuitV2Protocol,
        CircuitV2Transport,
        DCUtRProtocol,
        RelayLimits,
    )
    from libp2p.relay.circuit_v2 import PROTOCOL_ID as HOP_PROTOCOL
    from libp2p.relay.circuit_v2.config import RelayConfig, RelayRole
    from libp2p.tools.anyio_service import background_trio_service

from .seam import TransportError

_log = logging.getLogger("sharedllm.mesh.relay")
RELAYS_USED = 2  # a member behind a NAT keeps reservations at this many relay members
REMEMBERED_RELAYED = 4096  # peers remembered as once relayed (to call a later direct one punched)


@dataclass(frozen=True)
class RelayOptions:
    """What a relay member lends: reservations and circuits are counted, each circuit is
    paced to `rate_bytes_per_s` in each direction and cut after `circuit_bytes` or
    `circuit_s`."""

    serves: bool = False
    max_reservations: int = 32
    circuits_per_reservation: int = 16
    rate_bytes_per_s: int = 4 * 1024 * 1024
    circuit_bytes: int = 4 * 1024**3
    circuit_s: int = 12 * 3600
    reservation_s: int = 3600


class _PacedStream:
    """A relayed stream whose writes are paced by a token bucket (py-libp2p's relay counts
    bytes and time but not rate); everything else is the stream's own. The bucket holds a
    tenth of a second: a bulk transfer (the bandwidth probe, say) sees the rate, not a burst."""

    BURST_S = 0.1

    def __init__(self, stream: Any, rate_bytes_per_s: int) -> None:
        self._stream = stream
        self._rate = float(rate_bytes_per_s)
        self._allowance = self._rate * self.BURST_S
        self._at = trio.current_time()

    async def write(self, data: bytes) -> None:
        now = trio.current_time()
        bucket = self._rate * self.BURST_S
        self._allowance = min(bucket, self._allowance + (now - self._at) * self._rate)
        self._at = now
        self._allowance -= len(data)
        if self._allowance < 0:
            await trio.sleep(-self._allowance / self._rate)
        await self._stream.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


class _MeshCircuitProtocol(CircuitV2Protocol):
    """py-libp2p's relay with each direction of a circuit paced (`_PacedStream`)."""

    rate_bytes_per_s: int = RelayOptions.rate_bytes_per_s

    async def _relay_data(
        self,
        src_stream: Any,
        dst_stream: Any,
        peer_id: Any,
        deadline: float | None = None,
        circuit_data_limit: list[int] | None = None,
    ) -> None:
        paced: Any = _PacedStream(dst_stream, self.rate_bytes_per_s)
        await super()._relay_data(src_stream, paced, peer_id, deadline, circuit_data_limit)


def is_circuit(address: str) -> bool:
    return "/p2p-circuit" in address


class MeshRelay:
    """This node's side of relaying: serving as a relay (when asked), reservations at
    others, circuit dials, and the path to each connected peer."""

    def __init__(self, host: Any, options: RelayOptions) -> None:
        self._host = host
        self.options = options
        limits = RelayLimits(
            duration=options.circuit_s,
            data=options.circuit_bytes,
            max_circuit_conns=options.circuits_per_reservation,
            max_reservations=options.max_reservations,
            reservation_ttl=options.reservation_s,
        )
        self.protocol = _MeshCircuitProtocol(host, limits, allow_hop=options.serves)
        self.protocol.rate_bytes_per_s = options.rate_bytes_per_s
        roles = (
            RelayRole.STOP | RelayRole.CLIENT | (RelayRole.HOP if options.serves else RelayRole(0))
        )
        self.circuits = CircuitV2Transport(host, self.protocol, RelayConfig(roles=roles))
        self.hole_punching = DCUtRProtocol(host)
        self.is_member: Callable[[str], bool] = lambda peer: False  # set once the mesh runs
        self.refused_hops = 0  # relay and hole-punch streams from peers not admitted
        self.reserved: dict[str, str] = {}  # relay peer -> our address through it
        self._was_relayed: dict[str, None] = {}  # peers once reached only through a relay
        self._nursery: trio.Nursery | None = None

    async def _members_only_hop(self, stream: Any) -> None:
        if await self._refused(stream, "relay"):
            return
        await self.protocol._handle_hop_stream(stream)

    async def _members_only_hole_punch(self, stream: Any) -> None:
        """A hole punch makes us dial the addresses the peer names: members only."""
        if await self._refused(stream, "hole punch"):
            return
        await self.hole_punching._handle_dcutr_stream(stream)

    async def _refused(self, stream: Any, what: str) -> bool:
        peer = str(stream.muxed_conn.peer_id)
        if self.is_member(peer):
            return False
        self.refused_hops += 1
        _log.info("refused to %s for %s: not an admitted member", what, peer)
        await stream.reset()
        return True

    async def keep_reservations(self, relays: Sequence[str]) -> list[str]:
        """Keeps reservations at up to `RELAYS_USED` of `relays` (connected relay members, best
        first) and drops those at relays we lost; returns our addresses through them."""
        connected = {str(p) for p in self._host.get_connected_peers()}
        for relay in [r for r in self.reserved if r not in connected]:
            del self.reserved[relay]
        for relay in relays:
            if len(self.reserved) >= RELAYS_USED:
                break
            if relay in self.reserved or relay not in connected:
                continue
            address = self._reserve_address(relay)
            if address is not None and await self._reserve(relay):
                self.reserved[relay] = address
                _log.info("reserved a relay slot at %s: reachable at %s", relay, address)
        return list(self.reserved.values())

    def _reserve_address(self, relay: str) -> str | None:
        """Our circuit address through `relay`: the address we reached it at."""
        for conn in self._connections_to(relay):
            address = _remote_address(conn)
            if address is not None and not is_circuit(address):
                return f"{address}/p2p/{relay}/p2p-circuit/p2p/{self._host.get_id()}"
        return None

    async def _reserve(self, relay: str) -> bool:
        assert self._nursery is not None
        try:
            with trio.fail_after(10):
                stream = await self._host.new_stream(ID.from_base58(relay), [HOP_PROTOCOL])
                try:
                    return bool(
                        await self.circuits.reserve(stream, ID.from_base58(relay), self._nursery)
                    )
                finally:
                    await stream.close()
        except Exception as err:  # noqa: BLE001 - libp2p raises many unrelated types here
            _log.debug("no reservation at %s: %s", relay, err)
            return False

    async def dial(self, address: str) -> None:
        """Connects through the relay a circuit address names (dialing the relay first)."""
        try:
            target = multiaddr.Multiaddr(address)
            relay_part = address.split("/p2p-circuit", maxsplit=1)[0]
            relay_info = info_from_p2p_addr(multiaddr.Multiaddr(relay_part))
            if relay_info.peer_id not in self._host.get_connected_peers():
                await self._host.connect(relay_info)
            with trio.fail_after(15):
                await self.circuits.dial(target)
        except Exception as err:  # noqa: BLE001
            raise TransportError(f"cannot connect through a relay to {address}: {err}") from None

    def path_to(self, peer: str) -> tuple[str, str | None]:
        """("direct" | "relayed" | "hole-punched", the address in use) of our connection to
        `peer`, or ("none", None)."""
        conns = self._connections_to(peer)
        direct = [c for c in conns if not _is_relayed(c)]
        if conns and not direct:
            self._was_relayed[peer] = None
            while len(self._was_relayed) > REMEMBERED_RELAYED:
                del self._was_relayed[next(iter(self._was_relayed))]
            return "relayed", _remote_address(conns[0])
        if not direct:
            return "none", None
        punched = peer in self._was_relayed or ID.from_base58(peer) in getattr(
            self.hole_punching, "_direct_connections", set()
        )
        return ("hole-punched" if punched else "direct"), _remote_address(direct[0])

    def _connections_to(self, peer: str) -> list[Any]:
        try:
            conns = self._host.get_network().get_connections(ID.from_base58(peer))
        except Exception:  # noqa: BLE001 - not a peer id, or no connection
            return []
        return list(conns or [])


def _is_relayed(conn: Any) -> bool:
    try:
        return any(is_circuit(str(a)) for a in conn.get_transport_addresses())
    except Exception:  # noqa: BLE001
        return False


def _remote_address(conn: Any) -> str | None:
    try:
        addresses = conn.get_transport_addresses()
    except Exception:  # noqa: BLE001
        return None
    return str(addresses[0]) if addresses else None


@asynccontextmanager
async def running_relay(host: Any, options: RelayOptions) -> AsyncIterator[MeshRelay]:
    """Runs the relay (hop only where `options.serves`, guarded for members) and DCUtR."""
    relay = MeshRelay(host, options)
    async with trio.open_nursery() as nursery:
        relay._nursery = nursery  # the reservations' refresher runs here
        async with (
            background_trio_service(relay.protocol),
            background_trio_service(relay.hole_punching),
        ):
            # the services register py-libp2p's own handlers as they start: ours replace them
            await relay.protocol.event_started.wait()
            await relay.hole_punching.event_started.wait()
            if options.serves:
                host.set_stream_handler(HOP_PROTOCOL, relay._members_only_hop)
            host.set_stream_handler(DCUTR_PROTOCOL_ID, relay._members_only_hole_punch)
            yield relay
        nursery.cancel_scope.cancel()
