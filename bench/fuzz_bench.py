"""Fuzzing every decoder of bytes that come from the network.

Each decoder gets random byte strings, random msgpack values and mutations of valid encodings
(bit flips, truncations, splices, repeated chunks). A decoder may reject an input only with its
own error types; anything else (a crash, another exception) is a finding. The benchmark runs
100,000 inputs per decoder (`SHAREDLLM_FUZZ_COUNT` to change); the test suite runs a few
thousand of the same generator (`tests/test_fuzz.py`).
"""

from __future__ import annotations

import inspect
import os
import random
import time
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import msgpack
import trio
import trio.testing
from sharedllm.mesh.claims import Claim
from sharedllm.mesh.gossip import Digest, Exchange, SignedState
from sharedllm.mesh.identity import NodeIdentity
from sharedllm.mesh.invite import Invite
from sharedllm.mesh.membership import (
    Admission,
    Certificate,
    MembershipError,
    MeshKey,
    Proof,
    Revocation,
)
from sharedllm.mesh.probe_records import (
    News,
    decode_hello_reply,
    decode_ping_request,
    decode_probe_header,
)
from sharedllm.mesh.records import RecordError
from sharedllm.mesh.revocation_sync import RevocationBatch, RevokedIds
from sharedllm.mesh.swim import Liveness, Rumor
from sharedllm.mesh.transport.framing import FrameError, receive_frame
from sharedllm.mesh.transport.seam import TransportError
from sharedllm.mesh.transport.tunnel import TunnelRequest
from sharedllm.mesh.transport.tunnel_codec import Packer, Unpacker
from sharedllm.node.weights.share_wire import (
    WeightRequest,
    WeightShareError,
    decode_manifest,
    decode_tensor_answer,
)

_MESH = MeshKey.generate(b"\x42" * 32)
_NODE = NodeIdentity.from_seed(b"\x17" * 32)
_RECORD_ERRORS = (RecordError, MembershipError)


@dataclass(frozen=True)
class Target:
    name: str
    decode: Callable[[bytes], object]  # or a coroutine function (run under one trio.run)
    allowed: tuple[type[BaseException], ...]
    samples: tuple[bytes, ...]  # valid encodings to mutate


async def _frame(data: bytes) -> object:
    """`receive_frame` on a stream that delivers `data` and then ends."""

    class _Stream:
        remote_peer = "fuzz"
        remote_host: str | None = None

        def __init__(self) -> None:
            self._left = data

        async def send_all(self, _data: bytes) -> None:
            return None

        async def receive_some(self, max_bytes: int) -> bytes:
            chunk, self._left = self._left[:max_bytes], self._left[max_bytes:]
            return chunk

        async def aclose(self) -> None:
            return None

    return await receive_frame(_Stream(), timeout_s=1.0)


def _from_msgpack(parse: Callable[[object], object]) -> Callable[[bytes], object]:
    def decode(data: bytes) -> object:
        try:
            value = msgpack.unpackb(data, raw=False, max_bin_len=4096, max_str_len=4096)
        except (ValueError, msgpack.UnpackException, TypeError):
            return None  # not msgpack: the caller's unpacking already refuses it
        return parse(value)

    return decode


def targets() -> list[Target]:
    certificate = Certificate.issue(_MESH, _NODE.peer_id, "fuzz", ["member"], 0.0)
    state = SignedState.publish(_NODE, 7, {"name": "fuzz", "models": []})
    invite = Invite.create(
        _MESH, "fuzz", now=0.0, expires_in_s=1e9, uses=1, bootstrap=["/ip4/127.0.0.1/tcp/1"]
    )
    revocation = Revocation.issue(_MESH, _NODE.peer_id, "fuzz", 0.0)
    claim = {"model": "m", "epoch": 3, "primary": _NODE.peer_id, "layers": [[_NODE.peer_id, 0, 4]]}
    return [
        Target("signed state", SignedState.decode, _RECORD_ERRORS, (state.encode(),)),
        Target("digest", Digest.decode, _RECORD_ERRORS, (Digest({"a": 1, "b": 2}).encode(),)),
        Target("exchange", Exchange.decode, _RECORD_ERRORS, (_exchange(state),)),
        Target("certificate", Certificate.decode, _RECORD_ERRORS, (certificate.encode(),)),
        Target("proof", Proof.decode, _RECORD_ERRORS, (Proof(certificate=certificate).encode(),)),
        Target("revocation", Revocation.decode, _RECORD_ERRORS, (revocation.encode(),)),
        Target(
            "invite token",
            lambda data: Invite.from_token(data.decode(errors="replace")),
            _RECORD_ERRORS,
            (invite.to_token().encode(),),
        ),
        Target("tunnel request", TunnelRequest.decode, _RECORD_ERRORS, (_tunnel_request(),)),
        Target(
            "swim rumor",
            _from_msgpack(Rumor.from_wire),
            (ValueError,),
            (msgpack.packb(Rumor(_NODE.peer_id, Liveness.SUSPECT, 5).to_wire()),),
        ),
        Target("claim", _from_msgpack(Claim.from_wire), (ValueError,), (msgpack.packb(claim),)),
        Target(
            "weights request",
            WeightRequest.decode,
            (RecordError,),
            (WeightRequest("tensor", "m", 0, 3, "0123456789abcdef", 5).encode(),),
        ),
        Target("weights manifest", decode_manifest, (RecordError, WeightShareError), ()),
        Target("weights tensor answer", decode_tensor_answer, (RecordError, WeightShareError), ()),
        Target("frame", _frame, (FrameError, TransportError), (b"\x00\x00\x00\x03abc",)),
        *_control_targets(certificate, state, revocation, invite),
        Target(
            "tunnel chunk (zstd)",
            lambda data: Unpacker().unpack(data),
            (FrameError,),
            (Packer().pack(b"ggml graph " * 400),),
        ),
    ]


def _control_targets(
    certificate: Certificate, state: SignedState, revocation: Revocation, invite: Invite
) -> list[Target]:
    """The decoders of the probe, hello-reply, revocation-exchange and admission messages."""
    proof = Proof(certificate=certificate)
    redemption = invite.redeem(_NODE.peer_id, "fuzz", 1.0)
    admission = Admission.issue(_NODE, proof, redemption, 2.0)
    news = News((Rumor(_NODE.peer_id, Liveness.ALIVE, 3),), (state,))
    batch = RevocationBatch(frozenset({b"k" * 32}), (revocation,))
    return [
        Target("news", lambda data: News.decode(data, 48, 4), _RECORD_ERRORS, (news.encode(),)),
        Target("ping request", decode_ping_request, (RecordError,), (_NODE.peer_id.encode(),)),
        Target(
            "bandwidth header", decode_probe_header, (RecordError,), ((1024).to_bytes(8, "big"),)
        ),
        Target("hello reply", decode_hello_reply, (RecordError,), ()),
        Target("admission", Admission.decode, _RECORD_ERRORS, (admission.encode(),)),
        Target(
            "proof with admission",
            Proof.decode,
            _RECORD_ERRORS,
            (Proof(redemption=redemption, admission=admission).encode(),),
        ),
        Target(
            "revoked ids",
            RevokedIds.decode,
            _RECORD_ERRORS,
            (RevokedIds(frozenset({b"k" * 32})).encode(),),
        ),
        Target("revocation batch", RevocationBatch.decode, _RECORD_ERRORS, (batch.encode(),)),
    ]


def _exchange(state: SignedState) -> bytes:
    return Exchange((state,), ("x",), False).encode()


def _tunnel_request() -> bytes:
    return TunnelRequest("rpc", "m", 2).encode()


def inputs(target: Target, count: int, rng: random.Random) -> Iterator[bytes]:
    """`count` inputs: a third random bytes, a third random msgpack, a third mutations."""
    for index in range(count):
        kind = index % 3
        if kind == 0 or (kind == 2 and not target.samples):
            yield rng.randbytes(rng.choice((0, 1, 4, 16, 64, 300, 5000)))
        elif kind == 1:
            yield msgpack.packb(_random_value(rng, 3), use_bin_type=True)
        else:
            yield _mutate(rng.choice(target.samples), rng)


def _random_value(rng: random.Random, depth: int) -> Any:
    choice = rng.randrange(9 if depth > 0 else 6)
    simple: list[Any] = [
        None,
        rng.random() < 0.5,
        rng.randint(-(2**63), 2**64 - 1),
        rng.random() * 1e6,
        rng.randbytes(rng.randrange(40)).decode("latin-1"),
        rng.randbytes(rng.randrange(40)),
    ]
    if choice < 6:
        return simple[choice]
    if choice == 6:
        return [_random_value(rng, depth - 1) for _ in range(rng.randrange(8))]
    if choice == 7:
        keys = [str(rng.randrange(100)) for _ in range(rng.randrange(5))]
        return {key: _random_value(rng, depth - 1) for key in keys}
    fields = [_random_value(rng, depth - 1) for _ in range(rng.randrange(6))]
    return [rng.choice(("digest", "exchange", "state", "tunnel-open")), 1, *fields]


def _mutate(sample: bytes, rng: random.Random) -> bytes:
    data = bytearray(sample)
    for _ in range(rng.randint(1, 4)):
        operation = rng.randrange(4)
        if operation == 0 and data:
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        elif operation == 1:
            del data[rng.randrange(len(data) + 1) :]
        elif operation == 2 and data:
            start = rng.randrange(len(data))
            data[start:start] = data[start : start + rng.randrange(1, 64)] * rng.randint(1, 8)
        else:
            data[rng.randrange(len(data) + 1) : rng.randrange(len(data) + 1)] = rng.randbytes(8)
    return bytes(data)


@dataclass
class FuzzResult:
    name: str
    inputs: int
    rejected: int  # inputs refused with the decoder's own errors
    seconds: float
    findings: list[str]


def fuzz(target: Target, count: int, seed: int = 0) -> FuzzResult:
    rng = random.Random(f"{seed}:{target.name}")
    result = FuzzResult(target.name, count, 0, 0.0, [])
    started = time.perf_counter()
    if inspect.iscoroutinefunction(target.decode):

        async def all_inputs() -> None:
            for data in inputs(target, count, rng):
                await _one_async(target, data, result)

        trio.run(all_inputs, clock=trio.testing.MockClock(autojump_threshold=0))
    else:
        for data in inputs(target, count, rng):
            _one(target, data, result)
    result.seconds = time.perf_counter() - started
    return result


def _one(target: Target, data: bytes, result: FuzzResult) -> None:
    try:
        target.decode(data)
    except target.allowed:
        result.rejected += 1
    except Exception as err:  # noqa: BLE001 - every other error is what we look for
        result.findings.append(f"{type(err).__name__}: {err} on {data[:80]!r}")


async def _one_async(target: Target, data: bytes, result: FuzzResult) -> None:
    try:
        await target.decode(data)  # type: ignore[misc]
    except target.allowed:
        result.rejected += 1
    except Exception as err:  # noqa: BLE001 - every other error is what we look for
        result.findings.append(f"{type(err).__name__}: {err} on {data[:80]!r}")


def run() -> dict[str, Any]:
    count = int(os.environ.get("SHAREDLLM_FUZZ_COUNT", "100000"))
    print(f"fuzz: {count} inputs per decoder")
    results: dict[str, dict[str, Any]] = {}
    findings = 0
    for target in targets():
        tracemalloc.start()
        result = fuzz(target, count)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        findings += len(result.findings)
        results[target.name] = {
            "inputs": result.inputs,
            "rejected": result.rejected,
            "seconds": result.seconds,
            "findings": result.findings[:20],
            "peak_memory_bytes": peak,
        }
        print(
            f"  {target.name:<22} {result.inputs} inputs, {result.rejected} rejected cleanly, "
            f"{len(result.findings)} findings, peak memory {peak / 1e6:.1f} MB, "
            f"{result.seconds:.1f} s"
        )
    return {"inputs_per_decoder": count, "decoders": results, "findings": findings}
