"""Who belongs to a mesh: the mesh key, member certificates, tickets, redemptions, admissions,
revocations (invites, the tokens that carry a ticket, are in `invite`).

Trust starts at the mesh key (Ed25519), held by admin nodes. Two ways in:

- a **certificate** signed by the mesh key names a peer id (the founder gets one at creation);
- an **invite** carries a *ticket* — a one-off key pair whose public half the mesh key signed,
  with an expiry and a number of uses — and the ticket's private half. The joiner signs a
  **redemption** binding the ticket to its own peer id. Any member can check the chain
  (mesh key -> ticket -> redemption) with no admin online; redemptions are gossiped, and every
  node ranks the redemptions of one ticket the same way (time, then peer id), so a single-use
  ticket admits exactly one peer mesh-wide.

A **revocation** signed by the mesh key removes a peer for good. All checks are pure functions
of the records and `now`.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Container, Iterable
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from . import records
from .identity import NodeIdentity, public_key_bytes, public_key_of_peer_id, verify
from .records import RecordError

ROLES = frozenset({"member", "admin"})
MAX_REASON_CHARS = 200
MAX_NAME_CHARS = 128
MAX_PROOF_BYTES = 8 * 1024
ADMITTED_PROOFS_CACHED = 4096
# Revocations are kept forever by every node and listed in one message of the revocation
# exchange (32 bytes each): this many fit a frame with room to spare.
MAX_REVOCATIONS = 16_384


class MembershipError(Exception):
    """A peer's proof of membership does not hold (the message says which check failed)."""


def mesh_id_of(mesh_public_key: bytes) -> str:
    return hashlib.sha256(b"sharedllm-mesh:" + mesh_public_key).hexdigest()[:16]


@dataclass(frozen=True)
class MeshKey:
    """The mesh's signing key; only admins hold the private half."""

    private_key: Ed25519PrivateKey

    @property
    def public_key(self) -> bytes:
        return public_key_bytes(self.private_key.public_key())

    @staticmethod
    def generate(seed: bytes | None = None) -> MeshKey:
        return MeshKey(Ed25519PrivateKey.from_private_bytes(seed or os.urandom(32)))


@dataclass(frozen=True)
class Certificate:
    mesh_public_key: bytes
    peer_id: str
    name: str
    roles: tuple[str, ...]
    issued_at: float
    signature: bytes = b""

    KIND = "certificate"

    def fields(self) -> list[Any]:
        return [self.mesh_public_key, self.peer_id, self.name, list(self.roles), self.issued_at]

    @staticmethod
    def issue(
        mesh: MeshKey, peer_id: str, name: str, roles: Iterable[str], now: float
    ) -> Certificate:
        draft = Certificate(mesh.public_key, peer_id, name, tuple(sorted(roles)), now)
        return signed_record(
            draft, mesh.private_key.sign(records.signing_bytes(draft.KIND, draft.fields()))
        )

    def encode(self) -> bytes:
        return records.encode(self.KIND, [*self.fields(), self.signature])

    @staticmethod
    def decode(data: bytes) -> Certificate:
        key, peer, name, roles, issued, sig = records.decode(
            data, Certificate.KIND, [bytes, str, str, list, (int, float), bytes], max_bytes=2048
        )
        return Certificate(key, peer, _name(name), _roles(roles), float(issued), sig)

    def check(self, mesh_public_key: bytes, peer_id: str) -> None:
        if self.mesh_public_key != mesh_public_key:
            raise MembershipError("certificate belongs to another mesh")
        if self.peer_id != peer_id:
            raise MembershipError("certificate names another peer")
        if not self._signed_by_its_mesh:
            raise MembershipError("certificate signature is not the mesh key's")

    @functools.cached_property
    def _signed_by_its_mesh(self) -> bool:
        """Checked once per decoded certificate (decoded proofs are shared: `_decoded_proof`)."""
        return verify(
            self.mesh_public_key, self.signature, records.signing_bytes(self.KIND, self.fields())
        )


@dataclass(frozen=True)
class Ticket:
    """A mesh-signed permission for `uses` peers to join before `expires_at`."""

    mesh_public_key: bytes
    ticket_public_key: bytes
    expires_at: float
    uses: int
    roles: tuple[str, ...]
    signature: bytes = b""

    KIND = "ticket"

    def fields(self) -> list[Any]:
        return [
            self.mesh_public_key,
            self.ticket_public_key,
            self.expires_at,
            self.uses,
            list(self.roles),
        ]

    def encode(self) -> bytes:
        return records.encode(self.KIND, [*self.fields(), self.signature])

    @staticmethod
    def decode(data: bytes) -> Ticket:
        mesh, key, expires, uses, roles, sig = records.decode(
            data, Ticket.KIND, [bytes, bytes, (int, float), int, list, bytes]
        )
        return Ticket(mesh, key, float(expires), uses, _roles(roles), sig)

    def check(self, mesh_public_key: bytes) -> None:
        if self.mesh_public_key != mesh_public_key:
            raise MembershipError("invite belongs to another mesh")
        if not verify(
            mesh_public_key, self.signature, records.signing_bytes(self.KIND, self.fields())
        ):
            raise MembershipError("invite ticket is not signed by the mesh key")


@dataclass(frozen=True)
class Redemption:
    """The joiner's binding of a ticket to its peer id, signed with the ticket's key."""

    ticket: Ticket
    peer_id: str
    name: str
    redeemed_at: float
    signature: bytes = b""

    KIND = "redemption"

    def fields(self) -> list[Any]:
        return [self.ticket.encode(), self.peer_id, self.name, self.redeemed_at]

    def encode(self) -> bytes:
        return records.encode(self.KIND, [*self.fields(), self.signature])

    @staticmethod
    def decode(data: bytes) -> Redemption:
        ticket, peer, name, at, sig = records.decode(
            data, Redemption.KIND, [bytes, str, str, (int, float), bytes], max_bytes=2048
        )
        return Redemption(Ticket.decode(ticket), peer, _name(name), float(at), sig)

    @property
    def ticket_id(self) -> bytes:
        return self.ticket.ticket_public_key

    @functools.cached_property
    def digest(self) -> bytes:
        return hashlib.sha256(self.encode()).digest()

    def check(self, mesh_public_key: bytes, peer_id: str) -> None:
        self.ticket.check(mesh_public_key)
        if self.peer_id != peer_id:
            raise MembershipError("invite was redeemed by another peer")
        if self.redeemed_at > self.ticket.expires_at:
            raise MembershipError("invite had expired when it was redeemed")
        message = records.signing_bytes(self.KIND, self.fields())
        if not verify(self.ticket.ticket_public_key, self.signature, message):
            raise MembershipError("redemption is not signed with the invite's key")


@dataclass(frozen=True)
class Revocation:
    mesh_public_key: bytes
    peer_id: str
    revoked_at: float
    reason: str
    signature: bytes = b""

    KIND = "revocation"

    def fields(self) -> list[Any]:
        return [self.mesh_public_key, self.peer_id, self.revoked_at, self.reason]

    @staticmethod
    def issue(mesh: MeshKey, peer_id: str, reason: str, now: float) -> Revocation:
        if len(reason) > MAX_REASON_CHARS:
            raise ValueError(f"a revocation's reason is at most {MAX_REASON_CHARS} characters")
        draft = Revocation(mesh.public_key, peer_id, now, reason)
        return signed_record(
            draft, mesh.private_key.sign(records.signing_bytes(draft.KIND, draft.fields()))
        )

    def encode(self) -> bytes:
        return records.encode(self.KIND, [*self.fields(), self.signature])

    @staticmethod
    def decode(data: bytes) -> Revocation:
        key, peer, at, reason, sig = records.decode(
            data, Revocation.KIND, [bytes, str, (int, float), str, bytes], max_bytes=2048
        )
        if len(reason) > MAX_REASON_CHARS:
            raise RecordError(f"a revocation's reason is at most {MAX_REASON_CHARS} characters")
        return Revocation(key, peer, float(at), reason, sig)

    def is_valid_for(self, mesh_public_key: bytes) -> bool:
        return self.mesh_public_key == mesh_public_key and verify(
            mesh_public_key, self.signature, records.signing_bytes(self.KIND, self.fields())
        )


@dataclass(frozen=True)
class Admission:
    """A member's signed word that it let `peer_id` in by a redemption at `admitted_at`, read
    on the member's own clock. The joiner chooses its redemption's time; it cannot choose
    this one, so expiry and the order of a ticket's uses are judged by it (SECURITY.md).
    The admitter's own proof rides along, so any node can check the chain offline."""

    redemption_digest: bytes
    peer_id: str
    admitted_at: float
    admitter: str
    admitter_proof: bytes
    signature: bytes = b""

    KIND = "admission"

    def fields(self) -> list[Any]:
        return [
            self.redemption_digest,
            self.peer_id,
            self.admitted_at,
            self.admitter,
            self.admitter_proof,
        ]

    @staticmethod
    def issue(
        identity: NodeIdentity, own_proof: Proof, redemption: Redemption, now: float
    ) -> Admission:
        draft = Admission(
            redemption.digest, redemption.peer_id, now, identity.peer_id, own_proof.encode()
        )
        return signed_record(
            draft, identity.sign(records.signing_bytes(draft.KIND, draft.fields()))
        )

    def encode(self) -> bytes:
        return records.encode(self.KIND, [*self.fields(), self.signature])

    @staticmethod
    def decode(data: bytes) -> Admission:
        digest, peer, at, admitter, proof, sig = records.decode(
            data,
            Admission.KIND,
            [bytes, str, (int, float), str, bytes, bytes],
            max_bytes=MAX_PROOF_BYTES,
        )
        return Admission(digest, peer, float(at), admitter, proof, sig)

    def check(
        self, mesh_public_key: bytes, redemption: Redemption, revoked: Container[str], depth: int
    ) -> None:
        if self.redemption_digest != redemption.digest or self.peer_id != redemption.peer_id:
            raise MembershipError("the admission is for another redemption")
        if self.admitted_at > redemption.ticket.expires_at:
            raise MembershipError("the invite had expired when this peer was admitted")
        if self.admitter in revoked:
            raise MembershipError("the peer was admitted by a revoked member")
        message = records.signing_bytes(self.KIND, self.fields())
        if not verify(public_key_of_peer_id(self.admitter), self.signature, message):
            raise MembershipError("the admission is not signed by its admitter")
        admitter = Proof.decode(self.admitter_proof)
        if admitter.certificate is not None:
            admitter.certificate.check(mesh_public_key, self.admitter)
        elif admitter.redemption is None or admitter.admission is None or depth <= 0:
            raise MembershipError("the admitter's own membership cannot be checked")
        else:
            admitter.redemption.check(mesh_public_key, self.admitter)
            admitter.admission.check(mesh_public_key, admitter.redemption, revoked, depth - 1)


@dataclass(frozen=True)
class Proof:
    """What a peer shows to prove membership: a certificate, or an invite redemption and the
    admission a member gave it for that redemption (a bare redemption only asks for one)."""

    certificate: Certificate | None = None
    redemption: Redemption | None = None
    admission: Admission | None = None

    KIND = "proof"

    def encode(self) -> bytes:
        cert = self.certificate.encode() if self.certificate else b""
        red = self.redemption.encode() if self.redemption else b""
        adm = self.admission.encode() if self.admission else b""
        return records.encode(self.KIND, [cert, red, adm])

    @staticmethod
    def decode(data: bytes) -> Proof:
        """Also reads proofs saved before admissions existed (no third field)."""
        try:
            cert, red, adm = records.decode(
                bytes(data), Proof.KIND, [bytes, bytes, bytes], max_bytes=MAX_PROOF_BYTES
            )
        except RecordError:
            cert, red = records.decode(
                bytes(data), Proof.KIND, [bytes, bytes], max_bytes=MAX_PROOF_BYTES
            )
            adm = b""
        return Proof(
            Certificate.decode(cert) if cert else None,
            Redemption.decode(red) if red else None,
            Admission.decode(adm) if adm else None,
        )

    @property
    def roles(self) -> tuple[str, ...]:
        if self.certificate is not None:
            return self.certificate.roles
        return self.redemption.ticket.roles if self.redemption else ()


def _name(value: str) -> str:
    if len(value) > MAX_NAME_CHARS:
        raise RecordError(f"a member's name is at most {MAX_NAME_CHARS} characters")
    return value


def _roles(value: Any) -> tuple[str, ...]:
    roles = records.string_list(value, "roles", limit=4)
    if not set(roles) <= ROLES:
        raise RecordError(f"unknown role in {roles}")
    return roles


_Record = TypeVar("_Record", Certificate, Ticket, Redemption, Revocation, Admission)


def signed_record(draft: _Record, signature: bytes) -> _Record:
    return replace(draft, signature=signature)
