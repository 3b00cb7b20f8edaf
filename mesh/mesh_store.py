"""The mesh's files in a node's data directory: which mesh, this node's proof, the mesh key (on
admins only) and the revocations seen. Every write is atomic with 0600 permissions."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from .atomic_file import write_atomic
from .membership import MAX_REVOCATIONS, MeshKey, Proof, Revocation
from .records import RecordError

_log = logging.getLogger("sharedllm.mesh.store")
_MAX_REVOCATION_FILE_BYTES = 4096
_MAX_MESH_FILE_BYTES = 64 * 1024
_MAX_LIST_FILE_BYTES = 1 << 20  # addresses and known peers: a few KiB in practice
MAX_REMEMBERED_EPOCHS = 1024
_MAX_EPOCH = 2**53


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
        body = json.loads(_read_small(path, _MAX_MESH_FILE_BYTES))
        name, key, proof = body["name"], body["mesh_public_key"], body["proof"]
        if not all(isinstance(text, str) for text in (name, key, proof)):
            raise ValueError("its name, key and proof must be strings")
        return MeshFiles(name, bytes.fromhex(key), Proof.decode(bytes.fromhex(proof)))
    except FileNotFoundError:
        raise MeshStoreError(
            f"this node belongs to no mesh yet ({path} is missing): run "
            "`sharedllm-node mesh create` or `sharedllm-node up --join TOKEN`"
        ) from None
    except (OSError, ValueError, KeyError, TypeError, RecordError, RecursionError) as err:
        raise MeshStoreError(f"{path} is damaged: {err}") from None


def save_mesh_key(data_dir: Path, key: MeshKey) -> None:
    from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

    seed = key.private_key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    write_atomic(_dir(data_dir) / "mesh_key", seed, mode=0o600)


def load_mesh_key(data_dir: Path) -> MeshKey:
    path = _dir(data_dir) / "mesh_key"
    try:
        with path.open("rb") as file:
            return MeshKey.generate(file.read(64))
    except FileNotFoundError:
        raise MeshStoreError(
            "this node is not an admin of its mesh (it holds no mesh key)"
        ) from None
    except (OSError, ValueError) as err:
        raise MeshStoreError(f"{path} is damaged: {err}") from None


def save_revocation(data_dir: Path, revocation: Revocation, *, sync: bool = True) -> None:
    """One file per revoked peer. The admin's own are synced to disk; those learned from peers
    need not be (a peer sends a lost one again)."""
    path = revocations_dir(data_dir) / f"{revocation.peer_id}.rev"
    write_atomic(path, revocation.encode(), sync=sync)


def revocations_dir(data_dir: Path) -> Path:
    return _dir(data_dir) / "revocations"


def count_revocations(data_dir: Path) -> int:
    return sum(1 for _ in revocations_dir(data_dir).glob("*.rev"))


def load_revocations(data_dir: Path, tried: set[str] | None = None) -> list[Revocation]:
    """The revocations saved here (files are named by peer id), but those in `tried`, which
    then lists every file read. A file that is not a revocation (damaged, oversized) is
    skipped with one line naming it: the node starts with the others."""
    found = []
    tried = set() if tried is None else tried
    paths = sorted(revocations_dir(data_dir).glob("*.rev"))[:MAX_REVOCATIONS]
    for path in [p for p in paths if p.stem not in tried]:
        tried.add(path.stem)
        try:
            with path.open("rb") as file:
                data = file.read(_MAX_REVOCATION_FILE_BYTES + 1)
            found.append(Revocation.decode(data))
        except (OSError, RecordError) as err:
            _log.error("ignoring %s: not a usable revocation (%s)", path, err)
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


def save_epochs(data_dir: Path, epochs: dict[str, int]) -> None:
    """The highest epoch seen per model: a claim after a restart (even of every node) must
    outrank every claim before it. Written without sync: a lost update is one the mesh's
    gossiped claims still carry, unless every node crashed within the same second."""
    kept = dict(sorted(epochs.items(), key=lambda item: -item[1])[:MAX_REMEMBERED_EPOCHS])
    write_atomic(_dir(data_dir) / "epochs.json", json.dumps(kept).encode(), sync=False)


def load_epochs(data_dir: Path) -> dict[str, int]:
    """The epochs saved by `save_epochs`; a damaged file is named in one line and ignored."""
    path = _dir(data_dir) / "epochs.json"
    value = _load_json(path)
    if not isinstance(value, dict):
        if value is not None:
            _log.error("ignoring %s: not a table of epochs", path)
        return {}
    epochs = {
        model: epoch
        for model, epoch in list(value.items())[:MAX_REMEMBERED_EPOCHS]
        if isinstance(epoch, int) and not isinstance(epoch, bool) and 0 <= epoch < _MAX_EPOCH
    }
    if len(epochs) != len(value):
        _log.error("ignoring some entries of %s: not epochs", path)
    return epochs


def _load_strings(path: Path) -> list[str]:
    value = _load_json(path)
    if not isinstance(value, list):
        if value is not None:
            _log.error("ignoring %s: not a list of addresses", path)
        return []
    return [a for a in value if isinstance(a, str) and len(a) <= 1024][:1024]


def _load_json(path: Path) -> object:
    """A small JSON file's content; None (with one line naming it) when it is missing,
    oversized or not JSON."""
    try:
        return json.loads(_read_small(path, _MAX_LIST_FILE_BYTES))
    except FileNotFoundError:
        return None
    except OSError as err:
        _log.error("ignoring %s: %s", path, err.strerror or err)
    except (ValueError, RecursionError) as err:
        _log.error("ignoring %s: not a small JSON file (%s)", path, err)
    return None


def _read_small(path: Path, limit: int) -> bytes:
    """The file's bytes, never reading more than `limit` (ValueError past it)."""
    with path.open("rb") as file:
        data = file.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"over {limit} bytes")
    return data
