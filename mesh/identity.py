"""A node's identity: an Ed25519 key, created on first start, and the peer id derived from it.

The peer id is libp2p's (base58 of the identity multihash of the protobuf-encoded public key,
"12D3KooW..."), so the id the transport authenticates and the id in every signed record are the
same string. It is computed here from the key alone, without libp2p.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import base58
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from .atomic_file import write_atomic

_KEY_FILE = "node_key"
_ED25519_PROTOBUF_PREFIX = b"\x08\x01\x12\x20"  # KeyType = Ed25519, Data = 32 bytes
_IDENTITY_MULTIHASH = b"\x00"


class IdentityError(Exception):
    """The node key file is unreadable or damaged."""


def public_key_bytes(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


@functools.lru_cache(maxsize=8192)
def peer_id_of(public_key: bytes) -> str:
    """libp2p's peer id for a raw 32-byte Ed25519 public key."""
    if len(public_key) != 32:
        raise ValueError("an Ed25519 public key is 32 bytes")
    encoded = _ED25519_PROTOBUF_PREFIX + public_key
    return base58.b58encode(_IDENTITY_MULTIHASH + bytes([len(encoded)]) + encoded).decode()


@functools.lru_cache(maxsize=8192)
def public_key_of_peer_id(peer_id: str) -> bytes:
    """The Ed25519 key inside a peer id (identity multihash), so signatures can be checked
    from the id alone."""
    try:
        raw = base58.b58decode(peer_id)
    except ValueError:
        raise ValueError(f"not a peer id: {peer_id!r}") from None
    prefix = _IDENTITY_MULTIHASH + bytes([36]) + _ED25519_PROTOBUF_PREFIX
    if len(raw) != 38 or not raw.startswith(prefix):
        raise ValueError(f"not an Ed25519 peer id: {peer_id!r}")
    return raw[len(prefix) :]


VERIFIED_CACHE_ENTRIES = 16_384
_verified: OrderedDict[bytes, bool] = OrderedDict()  # digest of (key, signature, message)


def verify(public_key: bytes, signature: bytes, message: bytes) -> bool:
    """Checks an Ed25519 signature. Results are remembered by a digest of what was checked
    (32 bytes an entry, `VERIFIED_CACHE_ENTRIES` at most), never by the message itself: the same
    signed record reaches a node from several peers (and, in the simulator, every node of the
    process), while a stranger's junk must not pin memory."""
    digest = hashlib.sha256(
        len(public_key).to_bytes(2, "big") + public_key + signature + b"|" + message
    ).digest()
    known = _verified.get(digest)
    if known is not None:
        _verified.move_to_end(digest)
        return known
    result = verify_once(public_key, signature, message)
    _verified[digest] = result
    if len(_verified) > VERIFIED_CACHE_ENTRIES:
        _verified.popitem(last=False)
    return result


def verify_once(public_key: bytes, signature: bytes, message: bytes) -> bool:
    """Checks a signature that will never come again (over a fresh nonce): nothing is kept."""
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


@dataclass(frozen=True)
class NodeIdentity:
    private_key: Ed25519PrivateKey

    @functools.cached_property
    def public_key(self) -> bytes:
        return public_key_bytes(self.private_key.public_key())

    @functools.cached_property
    def peer_id(self) -> str:
        return peer_id_of(self.public_key)

    @property
    def seed(self) -> bytes:
        return self.private_key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())

    def sign(self, message: bytes) -> bytes:
        return self.private_key.sign(message)

    @staticmethod
    def from_seed(seed: bytes) -> NodeIdentity:
        return NodeIdentity(Ed25519PrivateKey.from_private_bytes(seed))


def load_or_create_identity(data_dir: Path) -> NodeIdentity:
    """The node's key from `data_dir`, created (0600, atomically) on first use."""
    path = data_dir / _KEY_FILE
    if path.exists():
        try:
            with path.open("rb") as file:
                seed = file.read(64)  # a seed is 32 bytes: never read a huge file whole
            return NodeIdentity.from_seed(seed)
        except (OSError, ValueError) as err:
            raise IdentityError(f"node key {path} is unreadable or damaged: {err}") from None
    identity = NodeIdentity.from_seed(os.urandom(32))
    write_atomic(path, identity.seed, mode=0o600)
    return identity
