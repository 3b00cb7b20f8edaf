"""Wire forms of the probe protocols: a ping's news, an indirect-probe request, a bandwidth
probe's header. Each decoder turns a peer's bytes into a value or a `RecordError`, nothing else
(the fuzz bench and `tests/test_probe_records.py` hold them to it)."""

from __future__ import annotations

from dataclasses import dataclass

from . import records
from .gossip import SignedState
from .records import MAX_PEER_ID_CHARS, RecordError, check_peer_id_text
from .swim import Rumor

MAX_PROBE_BYTES = 64 * 1024 * 1024
_NEWS_KIND = "news"


@dataclass(frozen=True)
class News:
    """What every probe and its answer carry: a few SWIM rumors and a few new states."""

    rumors: tuple[Rumor, ...]
    states: tuple[SignedState, ...]

    def encode(self) -> bytes:
        return records.encode(
            _NEWS_KIND, [[r.to_wire() for r in self.rumors], [s.encode() for s in self.states]]
        )

    @staticmethod
    def decode(data: bytes, max_rumors: int, max_states: int) -> News:
        """At most `max_rumors` rumors and `max_states` states are read (more are ignored);
        a malformed rumor is skipped (a newer peer may know statuses we do not), a malformed
        state refuses the whole message."""
        raw_rumors, raw_states = records.decode(data, _NEWS_KIND, [list, list])
        rumors = []
        for raw in raw_rumors[:max_rumors]:
            try:
                rumors.append(Rumor.from_wire(raw))
            except ValueError:
                continue
        states = []
        for raw in raw_states[:max_states]:
            if not isinstance(raw, bytes):
                raise RecordError("news states must be byte strings")
            states.append(SignedState.decode(raw))
        return News(tuple(rumors), tuple(states))


def encode_ping_request(target: str) -> bytes:
    return target.encode()


def decode_ping_request(data: bytes) -> str:
    """The member an indirect probe asks us to ping."""
    if len(data) > MAX_PEER_ID_CHARS:
        raise RecordError("ping request too long")
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise RecordError("ping request is not a peer id") from None
    return check_peer_id_text(text)


def encode_probe_header(size: int) -> bytes:
    return size.to_bytes(8, "big")


def decode_probe_header(data: bytes) -> int:
    """The byte count a bandwidth probe announces, at most `MAX_PROBE_BYTES`."""
    if len(data) != 8:
        raise RecordError("a bandwidth probe header is 8 bytes")
    size = int.from_bytes(data, "big")
    if size > MAX_PROBE_BYTES:
        raise RecordError(f"a bandwidth probe of {size} bytes exceeds {MAX_PROBE_BYTES}")
    return size


def encode_hello_reply(proof: bytes, admission: bytes) -> bytes:
    """The listener's answer to an admitted hello: its own proof, and the admission it gave a
    joiner that came with a bare invite redemption (else empty)."""
    return records.encode("hello-reply", [proof, admission])


def decode_hello_reply(data: bytes) -> tuple[bytes, bytes]:
    proof, admission = records.decode(data, "hello-reply", [bytes, bytes], max_bytes=20_000)
    return proof, admission
