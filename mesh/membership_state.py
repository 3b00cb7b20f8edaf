"""What a node knows of the mesh's membership, and its verdict on a peer's proof (pure: the
caller gives `now` and its own identity).

Revocations only grow. A ticket's uses go to its earliest admissions, ranked by the time the
admitting member read on its own clock (then peer id), so a redemption the joiner back-dates
never outranks an earlier one, and an expired or used-up ticket gets no new admission. For
each ticket only its best `uses` admissions are kept: anything ranked below them is refused
anyway, so a flood of redemptions with fresh peer ids costs no memory.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field

from .identity import NodeIdentity, public_key_of_peer_id
from .membership import (
    ADMITTED_PROOFS_CACHED,
    MAX_REVOCATIONS,
    Admission,
    MembershipError,
    Proof,
    Redemption,
    Revocation,
)

ADMISSION_DEPTH = 4  # an admitter admitted by an admitter ... at most this deep
MAX_TRACKED_TICKETS = 4096
MAX_USES_TRACKED = 1024  # per ticket; an invite with more uses admits only that many


class AdmissionNeeded(MembershipError):
    """A bare redemption: the peer asks to be admitted (only the hello exchange grants that)."""


@dataclass
class MembershipState:
    mesh_public_key: bytes
    revocations: dict[str, Revocation] = field(default_factory=dict)
    # ticket id -> {peer id: admitted at}, the best `uses` of each ticket only
    admissions: dict[bytes, dict[str, float]] = field(default_factory=dict)
    # Proofs that admitted their peer, by a digest of their encoding: every state a member
    # gossips carries the same proof, decoded and checked once. A refused proof is never kept,
    # so a stranger's hellos cost no memory.
    _admitted: OrderedDict[bytes, tuple[str, Proof]] = field(default_factory=OrderedDict)

    def add_revocation(self, revocation: Revocation) -> bool:
        """Records a valid revocation; returns whether it was new. A full set takes no more
        (`MAX_REVOCATIONS`; `sharedllm-node revoke` says so before signing one)."""
        if revocation.peer_id in self.revocations or len(self.revocations) >= MAX_REVOCATIONS:
            return False
        try:
            public_key_of_peer_id(revocation.peer_id)
        except ValueError:
            return False
        if not revocation.is_valid_for(self.mesh_public_key):
            return False
        self.revocations[revocation.peer_id] = revocation
        return True

    def admit_encoded(self, data: bytes, peer_id: str) -> Proof:
        """`admit` for a proof as it came from the network; returns it decoded."""
        digest = hashlib.sha256(data).digest()
        known = self._admitted.get(digest)
        if known is not None and known[0] == peer_id:
            self._admitted.move_to_end(digest)
            proof = known[1]
        else:
            proof = Proof.decode(data)
        self.admit(proof, peer_id)
        if known is None:
            self._admitted[digest] = (peer_id, proof)
            if len(self._admitted) > ADMITTED_PROOFS_CACHED:
                self._admitted.popitem(last=False)
        return proof

    def admit(self, proof: Proof, peer_id: str) -> None:
        """Raises `MembershipError` unless `peer_id` is a current member by `proof`
        (`AdmissionNeeded` for a valid redemption that no member has admitted yet)."""
        public_key_of_peer_id(peer_id)  # a malformed id fails here, not later
        if peer_id in self.revocations:
            raise MembershipError(f"peer {peer_id} has been revoked")
        if proof.certificate is not None:
            proof.certificate.check(self.mesh_public_key, peer_id)
            return
        if proof.redemption is None:
            raise MembershipError("no membership proof")
        proof.redemption.check(self.mesh_public_key, peer_id)
        if proof.admission is None:
            raise AdmissionNeeded("this invite redemption has not been admitted by a member")
        proof.admission.check(
            self.mesh_public_key, proof.redemption, self.revocations, ADMISSION_DEPTH
        )
        if not self._ranks_in(proof.redemption, proof.admission.admitted_at):
            raise MembershipError("invite already used up by other peers")

    def grant(
        self, redemption: Redemption, identity: NodeIdentity, own_proof: Proof, now: float
    ) -> Admission:
        """Admits a joiner by its bare redemption, judged on our clock: refused once the
        ticket has expired or its uses are taken (a peer already admitted gets its old time
        again)."""
        redemption.check(self.mesh_public_key, redemption.peer_id)
        if redemption.peer_id in self.revocations:
            raise MembershipError(f"peer {redemption.peer_id} has been revoked")
        earlier = self.admissions.get(redemption.ticket_id, {}).get(redemption.peer_id)
        at = now if earlier is None else min(earlier, now)
        if at > redemption.ticket.expires_at:
            raise MembershipError("this invite has expired")
        if not self._ranks_in(redemption, at):
            raise MembershipError("invite already used up by other peers")
        return Admission.issue(identity, own_proof, redemption, at)

    def _ranks_in(self, redemption: Redemption, admitted_at: float) -> bool:
        """Records the admission and says whether it is among the ticket's first `uses`."""
        ticket = redemption.ticket
        uses = min(ticket.uses, MAX_USES_TRACKED)
        best = self.admissions.get(ticket.ticket_public_key)
        if best is None:
            if len(self.admissions) >= MAX_TRACKED_TICKETS:
                self.admissions.pop(next(iter(self.admissions)))
            best = self.admissions[ticket.ticket_public_key] = {}
        peer = redemption.peer_id
        best[peer] = min(admitted_at, best.get(peer, admitted_at))
        ranked = sorted(best.items(), key=lambda item: (item[1], item[0]))[:uses]
        kept = dict(ranked)
        if len(kept) < len(best):
            self.admissions[ticket.ticket_public_key] = kept
        return peer in kept
