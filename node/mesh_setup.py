"""Joining or founding a mesh from the command line: the files in the data directory."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

from ..mesh.addresses import MAX_ADVERTISED
from ..mesh.identity import NodeIdentity, load_or_create_identity
from ..mesh.invite import Invite
from ..mesh.membership import Certificate, MembershipError, MeshKey, Proof
from ..mesh.mesh_store import (
    MeshFiles,
    has_mesh,
    load_mesh,
    load_mesh_key,
    save_known_peers,
    save_mesh,
    save_mesh_key,
)
from ..mesh.records import RecordError

DEFAULT_LISTEN = "/ip4/0.0.0.0/tcp/9338"
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd]?)$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


class MeshSetupError(Exception):
    """The mesh cannot be joined or created as asked."""


@dataclass(frozen=True)
class MeshPlan:
    identity: NodeIdentity
    files: MeshFiles
    bootstrap: tuple[str, ...]
    created: bool


def parse_duration(text: str) -> float:
    """'90', '30s', '15m', '1h', '2d' -> seconds."""
    match = _DURATION.match(text.strip())
    if match is None or float(match.group(1)) <= 0:
        raise MeshSetupError(f"bad duration {text!r}: use e.g. 30m, 1h or 2d")
    return float(match.group(1)) * _UNITS[match.group(2)]


def create_mesh(
    data_dir: Path, identity: NodeIdentity, mesh_name: str, node_name: str, now: float
) -> MeshFiles:
    if has_mesh(data_dir):
        raise MeshSetupError(f"{data_dir} already belongs to mesh {load_mesh(data_dir).name!r}")
    key = MeshKey.generate()
    cert = Certificate.issue(key, identity.peer_id, node_name, ["admin", "member"], now)
    files = MeshFiles(mesh_name, key.public_key, Proof(certificate=cert))
    save_mesh_key(data_dir, key)
    save_mesh(data_dir, files)
    return files


def prepare_mesh(data_dir: Path, node_name: str, join_token: str | None, now: float) -> MeshPlan:
    """The node's identity and mesh: joined with `join_token`, loaded, or founded on first run."""
    identity = load_or_create_identity(data_dir)
    if join_token is None:
        if has_mesh(data_dir):
            return MeshPlan(identity, load_mesh(data_dir), (), created=False)
        files = create_mesh(data_dir, identity, "sharedllm", node_name, now)
        return MeshPlan(identity, files, (), created=True)
    try:
        invite = Invite.from_token(join_token)
    except RecordError as err:
        raise MeshSetupError(f"bad invite token: {err}") from None
    if has_mesh(data_dir):
        files = load_mesh(data_dir)
        if files.mesh_public_key != invite.ticket.mesh_public_key:
            raise MeshSetupError(f"{data_dir} already belongs to another mesh ({files.name!r})")
        same_ticket = files.proof.redemption is not None and (
            files.proof.redemption.ticket_id == invite.ticket.ticket_public_key
        )
        if files.proof.certificate is not None or same_ticket:
            return MeshPlan(identity, files, invite.bootstrap, created=False)
    try:
        redemption = invite.redeem(identity.peer_id, node_name, now)
    except MembershipError as err:
        raise MeshSetupError(str(err)) from None
    files = MeshFiles(invite.mesh_name, invite.ticket.mesh_public_key, Proof(redemption=redemption))
    save_mesh(data_dir, files)
    # Until the running node saves the members it met, the token's addresses are where a
    # restart (without the token) finds the mesh again.
    save_known_peers(data_dir, list(invite.bootstrap))
    return MeshPlan(identity, files, invite.bootstrap, created=False)


def make_invite(
    data_dir: Path, addresses: list[str], *, uses: int, expires_in_s: float, now: float
) -> str:
    """An invite token for `uses` joiners (admins only: it is signed with the mesh key)."""
    files = load_mesh(data_dir)
    key = load_mesh_key(data_dir)  # MeshStoreError for a member that is not an admin
    suffix = f"/p2p/{load_or_create_identity(data_dir).peer_id}"
    bootstrap = [a if "/p2p/" in a else a + suffix for a in addresses][:MAX_ADVERTISED]
    invite = Invite.create(
        key, files.name, now=now, expires_in_s=expires_in_s, uses=uses, bootstrap=bootstrap
    )
    return invite.to_token()


JOIN_FILE_WAIT_S = 600.0
MAX_TOKEN_BYTES = 64 * 1024


def join_token_from(
    value: str | None, data_dir: Path, wait_s: float = JOIN_FILE_WAIT_S
) -> str | None:
    """`--join`'s token: as given, or read from the file named after an `@` (waiting up to
    `wait_s` for another node to write it, as a container stack does). A node that already
    belongs to a mesh does not wait: it goes on with its saved membership."""
    if value is None or not value.startswith("@"):
        return value
    path = Path(value[1:])
    deadline = time.monotonic() + wait_s
    while not path.exists():
        if has_mesh(data_dir):
            return None
        if time.monotonic() >= deadline:
            raise MeshSetupError(f"no invite appeared in {path} within {wait_s:.0f} s")
        time.sleep(1.0)
    try:
        with path.open("rb") as file:
            data = file.read(MAX_TOKEN_BYTES + 1)
        token = data.decode("ascii").strip()
    except (OSError, UnicodeDecodeError) as err:
        raise MeshSetupError(f"cannot read the invite in {path}: {err}") from None
    if len(data) > MAX_TOKEN_BYTES or not token:
        raise MeshSetupError(f"{path} does not hold an invite token")
    return token
