"""The mesh's files in a node's data directory: which mesh, this node's proof, the mesh key (on
admins only) and the revocations seen. Every write is atomic with 0600 permissions."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .atomic_file import write_atomic
from .membership import MeshKey, Proof, Revocation
from .records import RecordError


class MeshStoreError(Exception):
    """The mesh files are missing or damaged."""


@dataclass(frozen=True)
class MeshFiles:
    name: str
    mesh_public_key: bytes
    proof: Proof


def _dir(data_dir: Path) -> Path:
    return data_dir / "mesh"


def has_mesh(data_dir: Path) -> bool:
    return (_dir(data_dir) / "mesh.json").exists()


def save_mesh(data_dir: Path, files: MeshFiles) -> None:
    body = {
        "name": files.name,
        "mesh_public_key": files.mesh_public_key.hex(),
        "proof": files.proof.encode().hex(),
    }
    write_atomic(_dir(data_dir) / "mesh.json", json.dumps(body, indent=1).encode())


def load_mesh(data_dir: Path) -> MeshFiles:
    path = _dir(data_dir) / "mesh.json"
    try:
        body = json.loads(path.read_text())
        return MeshFiles(
            body["name"],
            bytes.fromhex(body["mesh_public_key"]),
            Proof.decode(bytes.fromhex(body["proof"])),
        )
    except FileNotFoundError:
        raise MeshStoreError(
            f"this node belongs to no mesh yet ({path} is missing): run "
            "`sharedllm-node mesh create` or `sharedllm-node up --join TOKEN`"
        ) from None
    except (OSError, ValueError, KeyError, TypeError, RecordError) as err:
        raise MeshStoreError(f"{path} is damaged: {err}") from None


def save_mesh_key(data_dir: Path, key: MeshKey) -> None:
    from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

    seed = key.private_key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    write_atomic(_dir(data_dir) / "mesh_key", seed, mode=0o600)


def load_mesh_key(data_dir: Path) -> MeshKey:
    path = _dir(data_dir) / "mesh_key"
    try:
        return MeshKey.generate(path.read_bytes())
    except FileNotFoundError:
        raise MeshStoreError(
            "this node is not an admin of its mesh (it holds no mesh key)"
        ) from None
    except (OSError, ValueError) as err:
        raise MeshStoreError(f"{path} is damaged: {err}") from None


def save_revocation(data_dir: Path, revocation: Revocation) -> None:
    write_atomic(_dir(data_dir) / "revocations" / f"{revocation.peer_id}.rev", revocation.encode())


def load_revocations(data_dir: Path) -> list[Revocation]:
    found = []
    for path in sorted((_dir(data_dir) / "revocations").glob("*.rev")):
        try:
            found.append(Revocation.decode(path.read_bytes()))
        except (OSError, RecordError):
            continue
    return found


def save_addresses(data_dir: Path, addresses: list[str]) -> None:
    """Where the running node listens, for `invite` to put into tokens."""
    write_atomic(_dir(data_dir) / "addresses.json", json.dumps(addresses).encode())


def load_addresses(data_dir: Path) -> list[str]:
    return _load_strings(_dir(data_dir) / "addresses.json")


def save_known_peers(data_dir: Path, addresses: list[str]) -> None:
    """Where other members listened lately: a node that restarts (or whose bootstrap peer is
    gone) finds the mesh again through them."""
    write_atomic(_dir(data_dir) / "known_peers.json", json.dumps(addresses).encode())


def load_known_peers(data_dir: Path) -> list[str]:
    return _load_strings(_dir(data_dir) / "known_peers.json")


def _load_strings(path: Path) -> list[str]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    return [a for a in value if isinstance(a, str)] if isinstance(value, list) else []
