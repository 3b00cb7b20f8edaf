"""Identity and membership records: peer ids as libp2p makes them, invites that admit exactly as
many peers as they allow, revocations, and decoders that refuse any damaged bytes cleanly."""

from __future__ import annotations

import contextlib
import os
import stat
import warnings
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sharedllm.mesh.identity import (
    NodeIdentity,
    load_or_create_identity,
    peer_id_of,
    public_key_of_peer_id,
)
from sharedllm.mesh.invite import Invite
from sharedllm.mesh.membership import (
    Certificate,
    MembershipError,
    MeshKey,
    Proof,
    Redemption,
    Revocation,
    Ticket,
)
from sharedllm.mesh.membership_state import AdmissionNeeded, MembershipState
from sharedllm.mesh.records import RecordError

NOW = 1_800_000_000.0
MESH = MeshKey.generate(b"\x07" * 32)


def _peer(n: int) -> NodeIdentity:
    return NodeIdentity.from_seed(bytes([n]) * 32)


def test_peer_id_matches_libp2p() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from libp2p.crypto.ed25519 import create_new_key_pair
        from libp2p.peer.id import ID

    pair = create_new_key_pair(b"\x05" * 32)
    ours = peer_id_of(pair.public_key.to_bytes())
    assert ours == ID.from_pubkey(pair.public_key).to_base58()
    assert public_key_of_peer_id(ours) == pair.public_key.to_bytes()


def test_identity_is_created_once_with_private_permissions(tmp_path: Path) -> None:
    first = load_or_create_identity(tmp_path)
    again = load_or_create_identity(tmp_path)
    assert first.peer_id == again.peer_id
    assert first.peer_id.startswith("12D3KooW")
    mode = stat.S_IMODE(os.stat(tmp_path / "node_key").st_mode)
    assert mode == 0o600


def test_founder_certificate_proves_membership() -> None:
    founder = _peer(1)
    cert = Certificate.issue(MESH, founder.peer_id, "founder", ["admin", "member"], NOW)
    state = MembershipState(MESH.public_key)
    state.admit(Proof.decode(Proof(certificate=cert).encode()), founder.peer_id)
    with pytest.raises(MembershipError, match="names another peer"):
        state.admit(Proof(certificate=cert), _peer(2).peer_id)


def test_certificate_from_another_mesh_is_refused() -> None:
    other = MeshKey.generate(b"\x08" * 32)
    cert = Certificate.issue(other, _peer(1).peer_id, "x", ["member"], NOW)
    with pytest.raises(MembershipError, match="another mesh"):
        MembershipState(MESH.public_key).admit(Proof(certificate=cert), _peer(1).peer_id)


def test_forged_certificate_is_refused() -> None:
    cert = Certificate.issue(MESH, _peer(1).peer_id, "x", ["member"], NOW)
    forged = Certificate(
        cert.mesh_public_key, _peer(2).peer_id, "x", cert.roles, NOW, cert.signature
    )
    with pytest.raises(MembershipError, match="signature"):
        MembershipState(MESH.public_key).admit(Proof(certificate=forged), _peer(2).peer_id)


def _invite(uses: int = 1, expires_in_s: float = 3600.0) -> Invite:
    return Invite.create(
        MESH,
        "home",
        now=NOW,
        expires_in_s=expires_in_s,
        uses=uses,
        bootstrap=["/ip4/127.0.0.1/tcp/4001"],
        seed=b"\x09" * 32,
    )


def _admitter(n: int) -> tuple[NodeIdentity, Proof]:
    identity = _peer(n)
    cert = Certificate.issue(MESH, identity.peer_id, f"admin{n}", ["admin", "member"], NOW)
    return identity, Proof(certificate=cert)


def _granted(state: MembershipState, redemption: Redemption, at: float, by: int = 1) -> Proof:
    identity, proof = _admitter(by)
    admission = state.grant(redemption, identity, proof, at)
    return Proof.decode(Proof(redemption=redemption, admission=admission).encode())


def test_invite_token_round_trip_and_redeem() -> None:
    invite = Invite.from_token(_invite().to_token())
    assert invite.mesh_name == "home"
    assert invite.bootstrap == ("/ip4/127.0.0.1/tcp/4001",)
    joiner = _peer(3)
    redemption = invite.redeem(joiner.peer_id, "laptop", NOW + 10)
    state = MembershipState(MESH.public_key)
    with pytest.raises(AdmissionNeeded):
        state.admit(Proof.decode(Proof(redemption=redemption).encode()), joiner.peer_id)
    proof = _granted(state, redemption, NOW + 11)
    MembershipState(MESH.public_key).admit(proof, joiner.peer_id)  # anyone can check it


def test_single_use_invite_admits_exactly_one_peer_everywhere() -> None:
    invite = _invite(uses=1)
    early = invite.redeem(_peer(3).peer_id, "a", NOW + 5)
    late = invite.redeem(_peer(4).peer_id, "b", NOW + 6)
    # Two admitters that had not heard of each other each admitted one...
    first = _granted(MembershipState(MESH.public_key), early, NOW + 5, by=1)
    second = _granted(MembershipState(MESH.public_key), late, NOW + 6, by=2)
    # ...and every node, whatever order it learns them in, keeps the earlier admission.
    for order in ([first, second], [second, first]):
        state = MembershipState(MESH.public_key)
        for proof in order:
            with contextlib.suppress(MembershipError):
                assert proof.redemption is not None
                state.admit(proof, proof.redemption.peer_id)
        state.admit(first, _peer(3).peer_id)
        with pytest.raises(MembershipError, match="used up"):
            state.admit(second, _peer(4).peer_id)
        with pytest.raises(MembershipError, match="used up"):
            state.grant(late, *_admitter(1), NOW + 7)


def test_a_back_dated_redemption_never_outranks_an_earlier_admission() -> None:
    """The issue's attack: with the token of a used (or expired) single-use invite, a forger
    signs a redemption dated before the legitimate one. Admission times are the admitters'
    clocks, so the forger ranks after the member, and an expired ticket admits no one."""
    invite = _invite(uses=1, expires_in_s=60)
    legit = invite.redeem(_peer(3).peer_id, "legit", NOW + 10)
    state = MembershipState(MESH.public_key)
    member = _granted(state, legit, NOW + 10)
    forged = _sign_redemption(invite, Redemption(invite.ticket, _peer(5).peer_id, "f", NOW))
    with pytest.raises(MembershipError, match="used up"):
        state.grant(forged, *_admitter(1), NOW + 20)
    # An admitter that had not heard of the member admits the forger, but only after it:
    unaware = _granted(MembershipState(MESH.public_key), forged, NOW + 20, by=2)
    elsewhere = MembershipState(MESH.public_key)
    for proof in (unaware, member):
        with contextlib.suppress(MembershipError):
            assert proof.redemption is not None
            elsewhere.admit(proof, proof.redemption.peer_id)
    elsewhere.admit(member, _peer(3).peer_id)
    with pytest.raises(MembershipError, match="used up"):
        elsewhere.admit(unaware, _peer(5).peer_id)
    # After expiry nobody admits anyone new, whatever date the redemption carries.
    late = _sign_redemption(invite, Redemption(invite.ticket, _peer(6).peer_id, "g", NOW))
    with pytest.raises(MembershipError, match="expired"):
        MembershipState(MESH.public_key).grant(late, *_admitter(1), NOW + 61)


def test_a_flood_of_redemptions_keeps_only_a_ticket_s_uses() -> None:
    invite = _invite(uses=2)
    state = MembershipState(MESH.public_key)
    for n in range(10, 60):
        redemption = invite.redeem(_peer(n).peer_id, "x", NOW + 1)
        with contextlib.suppress(MembershipError):
            state.grant(redemption, *_admitter(1), NOW + n)
    assert sum(len(best) for best in state.admissions.values()) == 2


def _sign_redemption(invite: Invite, draft: Redemption) -> Redemption:
    from sharedllm.mesh import records

    key = NodeIdentity.from_seed(invite.ticket_seed)
    signature = key.sign(records.signing_bytes(draft.KIND, draft.fields()))
    return Redemption(draft.ticket, draft.peer_id, draft.name, draft.redeemed_at, signature)


def test_expired_invite_cannot_be_redeemed_or_backdated_past_expiry() -> None:
    invite = _invite(expires_in_s=60)
    with pytest.raises(MembershipError, match="expired"):
        invite.redeem(_peer(3).peer_id, "a", NOW + 61)
    ticket_key = NodeIdentity.from_seed(invite.ticket_seed)
    from sharedllm.mesh import records

    draft = Redemption(invite.ticket, _peer(3).peer_id, "a", NOW + 61)
    signed = Redemption(
        draft.ticket,
        draft.peer_id,
        draft.name,
        draft.redeemed_at,
        ticket_key.sign(records.signing_bytes(draft.KIND, draft.fields())),
    )
    with pytest.raises(MembershipError, match="expired"):
        MembershipState(MESH.public_key).admit(Proof(redemption=signed), _peer(3).peer_id)


def test_ticket_not_signed_by_the_mesh_is_refused() -> None:
    rogue = MeshKey.generate(b"\x0a" * 32)
    invite = _invite()
    fake_ticket = Ticket(
        MESH.public_key,
        invite.ticket.ticket_public_key,
        NOW + 99,
        100,
        ("member",),
        rogue.private_key.sign(b"anything"),
    )
    forged = Invite("home", fake_ticket, invite.ticket_seed, ())
    redemption = forged.redeem(_peer(3).peer_id, "x", NOW)
    with pytest.raises(MembershipError, match="not signed by the mesh key"):
        MembershipState(MESH.public_key).admit(Proof(redemption=redemption), _peer(3).peer_id)


def test_revoked_member_is_refused_and_revocations_must_be_signed() -> None:
    peer = _peer(3)
    cert = Certificate.issue(MESH, peer.peer_id, "x", ["member"], NOW)
    state = MembershipState(MESH.public_key)
    fake = Revocation(MESH.public_key, peer.peer_id, NOW, "spite", b"\x00" * 64)
    assert not state.add_revocation(fake)
    state.admit(Proof(certificate=cert), peer.peer_id)
    revocation = Revocation.decode(
        Revocation.issue(MESH, peer.peer_id, "laptop stolen", NOW).encode()
    )
    assert state.add_revocation(revocation)
    assert not state.add_revocation(revocation)  # idempotent
    with pytest.raises(MembershipError, match="revoked"):
        state.admit(Proof(certificate=cert), peer.peer_id)


def test_no_proof_is_refused() -> None:
    with pytest.raises(MembershipError, match="no membership proof"):
        MembershipState(MESH.public_key).admit(Proof(), _peer(1).peer_id)


@pytest.mark.parametrize(
    "token",
    ["", "hello", "sllm1-", "sllm1-!!!!", "sllm1-" + "A" * 9000, "sllm1-gqNmb2+jYmFy"],
)
def test_bad_tokens_are_record_errors(token: str) -> None:
    with pytest.raises(RecordError):
        Invite.from_token(token)


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=600))
def test_decoders_never_crash_on_random_bytes(data: bytes) -> None:
    for decoder in (
        Certificate.decode,
        Ticket.decode,
        Redemption.decode,
        Revocation.decode,
        Proof.decode,
    ):
        with contextlib.suppress(RecordError):
            decoder(data)


@settings(max_examples=500, deadline=None)
@given(st.data())
def test_decoders_never_crash_on_damaged_records(data: st.DataObject) -> None:
    invite = _invite()
    valid = Proof(redemption=invite.redeem(_peer(3).peer_id, "n", NOW)).encode()
    damaged = bytearray(valid)
    for _ in range(data.draw(st.integers(1, 6))):
        damaged[data.draw(st.integers(0, len(damaged) - 1))] = data.draw(st.integers(0, 255))
    try:
        proof = Proof.decode(bytes(damaged))
    except RecordError:
        return
    with contextlib.suppress(MembershipError, ValueError):
        MembershipState(MESH.public_key).admit(proof, _peer(3).peer_id)
