"""The hello exchange's decisions, sans I/O: whether to read a hello, what to answer it, and
what an answer to ours means.

When a connection opens, the dialer sends its membership proof and the listener answers with
its own (and, for a joiner's bare invite redemption, the admission it grants); each side checks
the other's proof against the mesh key and the revocations it knows. A revoked member is told
so (the signed revocation), not just turned away. Addresses whose hellos keep failing are not
read at all for a while: checking a proof costs signature checks that strangers could make us
pay at will.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from .handshake_limiter import FailedHandshakeLimiter
from .identity import NodeIdentity
from .membership import Admission, MembershipError, Proof, Revocation
from .membership_state import AdmissionNeeded, MembershipState
from .probe_records import decode_hello_reply, encode_hello_reply
from .records import RecordError


@dataclass(frozen=True)
class HelloAnswer:
    reply: bytes  # what goes back to the peer
    admitted: bool
    refusal: str | None = None  # why not, for the log


@dataclass(frozen=True)
class ReplyVerdict:
    """What the answer to our hello means."""

    admitted: bool
    admission: Admission | None = None  # an admission of our redemption, to adopt
    revocation: Revocation | None = None  # we were revoked: learn it
    waiting: bool = False  # a joiner whose own hello carries what we must admit: no refusal
    refusal: str | None = None


@dataclass
class HelloDesk:
    membership: MembershipState
    identity: NodeIdentity
    proof: Callable[[], Proof]  # ours, as it is now (it changes once we are admitted)
    limiter: FailedHandshakeLimiter = field(default_factory=FailedHandshakeLimiter)

    def may_read(self, source: str | None, now: float) -> bool:
        return source is None or self.limiter.allows(source, now)

    def unreadable(self, source: str | None, now: float) -> None:
        if source is not None:
            self.limiter.failed(source, now)

    def answer(
        self, hello: bytes, peer: str, source: str | None, now: float, wall_now: float
    ) -> HelloAnswer:
        """Our answer to a peer's hello: our proof (and an admission for a joiner) if its
        proof holds, else the revocation that names it, or nothing."""
        try:
            admission = self._admission_for(hello, peer, wall_now)
        except (MembershipError, ValueError, RecordError) as err:
            return self.refuse(peer, source, now, str(err))
        return HelloAnswer(encode_hello_reply(self.proof().encode(), admission), admitted=True)

    def refuse(self, peer: str, source: str | None, now: float, why: str) -> HelloAnswer:
        """A failed hello (a proof that does not hold, or one that never arrived whole)
        counts against its address; a revoked member is told so."""
        self.unreadable(source, now)
        revocation = self.membership.revocations.get(peer)
        refusal = b"" if revocation is None else revocation.encode()
        return HelloAnswer(refusal, admitted=False, refusal=why)

    def _admission_for(self, hello: bytes, peer: str, wall_now: float) -> bytes:
        """Checks a hello's proof; a joiner's bare invite redemption is admitted here, by our
        clock (the encoded admission, else b"")."""
        try:
            self.membership.admit_encoded(hello, peer)
        except AdmissionNeeded:
            redemption = Proof.decode(hello).redemption
            assert redemption is not None
            granted = self.membership.grant(redemption, self.identity, self.proof(), wall_now)
            return granted.encode()
        return b""

    def read_reply(self, reply: bytes, peer: str) -> ReplyVerdict:
        if not reply:
            return ReplyVerdict(False, refusal="the peer refused our membership proof")
        try:
            theirs, admission = decode_hello_reply(reply)
        except RecordError:
            try:
                revocation = Revocation.decode(reply)
            except (RecordError, ValueError) as err:
                return ReplyVerdict(False, refusal=f"a malformed answer: {err}")
            return ReplyVerdict(
                False, revocation=revocation, refusal="the peer refused us: this node is revoked"
            )
        try:
            self.membership.admit_encoded(theirs, peer)
            granted = Admission.decode(admission) if admission else None
        except AdmissionNeeded:
            return ReplyVerdict(False, waiting=True)
        except (MembershipError, ValueError, RecordError) as err:
            return ReplyVerdict(False, refusal=str(err))
        return ReplyVerdict(True, admission=granted)
