"""The hello exchange's decisions without I/O (`HelloDesk`): members are let in, a joiner's
bare redemption is admitted by our clock, a revoked member is told so, and an address whose
hellos keep failing is not read at all for a while; a joiner whose own hello is on its way is
not cut off for speaking first."""

from __future__ import annotations

from typing import Any

import trio
from sharedllm.mesh.admission import HelloDesk
from sharedllm.mesh.hello import HELLO_EXPECTED_S, MAX_HELLOS_EXPECTED
from sharedllm.mesh.identity import NodeIdentity
from sharedllm.mesh.invite import Invite
from sharedllm.mesh.membership import Certificate, MeshKey, Proof, Revocation
from sharedllm.mesh.membership_state import MembershipState
from sharedllm.mesh.probe_records import decode_hello_reply
from sharedllm.simnet.simulation import Simulation

NOW = 1_800_000_000.0
MESH = MeshKey.generate(b"\x05" * 32)


def _peer(n: int) -> NodeIdentity:
    return NodeIdentity.from_seed(bytes([n]) * 32)


def _member(n: int) -> tuple[NodeIdentity, Proof]:
    identity = _peer(n)
    cert = Certificate.issue(MESH, identity.peer_id, f"m{n}", ["admin", "member"], NOW)
    return identity, Proof(certificate=cert)


def _desk(n: int = 1) -> HelloDesk:
    identity, proof = _member(n)
    return HelloDesk(MembershipState(MESH.public_key), identity, lambda: proof)


def test_a_member_is_admitted_and_shown_our_proof() -> None:
    desk = _desk()
    identity, proof = _member(2)
    answer = desk.answer(proof.encode(), identity.peer_id, "10.0.0.2", 0.0, NOW)
    assert answer.admitted and answer.refusal is None
    theirs, admission = decode_hello_reply(answer.reply)
    assert Proof.decode(theirs).certificate is not None and admission == b""
    # ...and the dialer's desk reads that answer as an admission by a member.
    verdict = _desk(2).read_reply(answer.reply, _peer(1).peer_id)
    assert verdict.admitted and verdict.admission is None and verdict.refusal is None


def test_a_joiner_s_redemption_is_granted_and_the_joiner_adopts_that_admission() -> None:
    desk = _desk()
    invite = Invite.create(MESH, "home", now=NOW, expires_in_s=60, uses=1, bootstrap=[])
    joiner = _peer(3)
    redemption = invite.redeem(joiner.peer_id, "laptop", NOW + 1)
    answer = desk.answer(Proof(redemption=redemption).encode(), joiner.peer_id, None, 0.0, NOW + 2)
    assert answer.admitted
    joiner_desk = HelloDesk(
        MembershipState(MESH.public_key), joiner, lambda: Proof(redemption=redemption)
    )
    verdict = joiner_desk.read_reply(answer.reply, _peer(1).peer_id)
    assert verdict.admitted and verdict.admission is not None
    assert verdict.admission.admitted_at == NOW + 2  # judged on the admitter's clock
    # The ticket had one use: a second joiner is refused.
    other = invite.redeem(_peer(4).peer_id, "x", NOW + 3)
    refused = desk.answer(Proof(redemption=other).encode(), _peer(4).peer_id, None, 0.0, NOW + 3)
    assert not refused.admitted and refused.reply == b""


def test_a_revoked_member_is_told_why_and_learns_it_from_the_answer() -> None:
    desk = _desk()
    identity, proof = _member(2)
    revocation = Revocation.issue(MESH, identity.peer_id, "lost laptop", NOW)
    assert desk.membership.add_revocation(revocation)
    answer = desk.answer(proof.encode(), identity.peer_id, None, 0.0, NOW)
    assert not answer.admitted and answer.refusal and "revoked" in answer.refusal
    verdict = _desk(2).read_reply(answer.reply, _peer(1).peer_id)
    assert not verdict.admitted and verdict.revocation == revocation


def test_no_answer_or_a_damaged_one_is_a_refusal_never_an_error() -> None:
    desk = _desk()
    assert desk.read_reply(b"", _peer(2).peer_id).refusal == (
        "the peer refused our membership proof"
    )
    for damaged in (b"\x00", b"\xff" * 40, bytes(range(256))):
        verdict = desk.read_reply(damaged, _peer(2).peer_id)
        assert not verdict.admitted and verdict.refusal
        answer = desk.answer(damaged, _peer(2).peer_id, None, 0.0, NOW)
        assert not answer.admitted and answer.reply == b""


def test_an_address_whose_hellos_keep_failing_is_not_read_until_its_window_passes() -> None:
    desk = _desk()
    stranger = _peer(9).peer_id
    for attempt in range(desk.limiter.max_failures):
        assert desk.may_read("203.0.113.9", attempt * 0.01)
        desk.answer(b"junk", stranger, "203.0.113.9", attempt * 0.01, NOW)
    assert not desk.may_read("203.0.113.9", 1.0)
    assert desk.may_read("203.0.113.10", 1.0)  # others are not held up
    assert desk.may_read(None, 1.0)  # a transport that cannot say where a peer is
    assert desk.may_read("203.0.113.9", desk.limiter.window_s + 0.01)
    # A hello that never arrived whole counts too.
    for _ in range(desk.limiter.max_failures):
        desk.refuse(stranger, "203.0.113.11", 2.0, "timed out")
    assert not desk.may_read("203.0.113.11", 2.5)


class _Stream:
    def __init__(self, peer: str) -> None:
        self.remote_peer = peer


async def test_a_joiner_that_speaks_before_its_own_hello_arrives_is_not_cut() -> None:
    """We dialled a joiner; it admitted us and answered that its own hello (with the
    redemption we admit) is on its way. It may gossip or ping first: those streams are dropped
    quietly for a while, not its connection cut (which cut that hello too, and a joiner on a
    LAN with decoy addresses then took many seconds to get in). A stranger's still are."""
    service = Simulation(seed=1).add_node().service
    cut: list[str] = []

    async def disconnect(peer: str) -> None:
        cut.append(peer)

    async def handler(stream: Any) -> None:
        raise AssertionError(f"{stream.remote_peer} was served before its admission")

    service.transport.disconnect = disconnect  # type: ignore[method-assign,assignment]
    guarded = service._members_only(handler)
    now = trio.current_time()
    service._expect_hello("joiner", now)
    service._expect_hello("long-ago", now - HELLO_EXPECTED_S - 1)
    for peer in ("joiner", "long-ago", "stranger"):
        await guarded(_Stream(peer))  # type: ignore[arg-type]
    assert cut == ["long-ago", "stranger"]
    for index in range(2 * MAX_HELLOS_EXPECTED):  # bounded, whatever peers answer
        service._expect_hello(f"peer{index}", now)
    assert len(service._hello_expected) == MAX_HELLOS_EXPECTED
