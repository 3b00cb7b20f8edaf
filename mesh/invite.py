"""Invites: what `sharedllm-node invite` prints, a ticket and its private half in one
copy-pasteable token, and redeeming one (signing a redemption with the ticket's key)."""

from __future__ import annotations

import base64
import os
from collections.abc import Iterable
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from . import records
from .identity import NodeIdentity, public_key_bytes
from .membership import MembershipError, MeshKey, Redemption, Ticket, signed_record
from .records import RecordError

TOKEN_PREFIX = "sllm1-"
MAX_TOKEN_CHARS = 8192


@dataclass(frozen=True)
class Invite:
    """What `sharedllm-node invite` prints: enough to join, as one copy-pasteable string."""

    mesh_name: str
    ticket: Ticket
    ticket_seed: bytes
    bootstrap: tuple[str, ...]

    KIND = "invite"

    @staticmethod
    def create(
        mesh: MeshKey,
        mesh_name: str,
        *,
        now: float,
        expires_in_s: float,
        uses: int,
        bootstrap: Iterable[str],
        seed: bytes | None = None,
    ) -> Invite:
        if uses < 1:
            raise ValueError("an invite needs at least one use")
        ticket_key = Ed25519PrivateKey.from_private_bytes(seed or os.urandom(32))
        draft = Ticket(
            mesh.public_key,
            public_key_bytes(ticket_key.public_key()),
            now + expires_in_s,
            uses,
            ("member",),
        )
        ticket = signed_record(
            draft, mesh.private_key.sign(records.signing_bytes(draft.KIND, draft.fields()))
        )
        return Invite(mesh_name, ticket, NodeIdentity(ticket_key).seed, tuple(bootstrap))

    def redeem(self, peer_id: str, name: str, now: float) -> Redemption:
        if now > self.ticket.expires_at:
            raise MembershipError("this invite has expired; ask an admin for a new one")
        draft = Redemption(self.ticket, peer_id, name, now)
        key = NodeIdentity.from_seed(self.ticket_seed)
        return signed_record(draft, key.sign(records.signing_bytes(draft.KIND, draft.fields())))

    def to_token(self) -> str:
        body = records.encode(
            self.KIND,
            [self.mesh_name, self.ticket.encode(), self.ticket_seed, list(self.bootstrap)],
        )
        return TOKEN_PREFIX + base64.urlsafe_b64encode(body).decode().rstrip("=")

    @staticmethod
    def from_token(token: str) -> Invite:
        token = token.strip()
        if len(token) > MAX_TOKEN_CHARS or not token.startswith(TOKEN_PREFIX):
            raise RecordError("not a SharedLLM invite token (it should start with 'sllm1-')")
        text = token[len(TOKEN_PREFIX) :]
        try:
            body = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        except ValueError:
            raise RecordError("invite token is damaged (bad base64)") from None
        name, ticket, seed, bootstrap = records.decode(body, Invite.KIND, [str, bytes, bytes, list])
        if len(seed) != 32:
            raise RecordError("invite token is damaged (bad key)")
        return Invite(
            name, Ticket.decode(ticket), seed, records.string_list(bootstrap, "bootstrap")
        )
