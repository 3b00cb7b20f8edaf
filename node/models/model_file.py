"""Reading a GGUF model file: its architecture, layer sizes and identity.

This is the only module that parses GGUF metadata. It turns a file into a `ModelProfile` (the
planner's input) plus facts a user wants to see (quantisation, hash). Anything wrong with the
file becomes a `ModelFileError` whose message fits on one line.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf

from ...mesh.atomic_file import write_atomic
from ...scheduler.model_profile import ModelProfile
from .chat_template import builtin_template
from .gguf_header import ArrayInfo, GgufFormatError, GgufHeader, read_header
from .model_kind import inferred_kind

_BLOCK_TENSOR = re.compile(r"^blk\.(\d+)\.")
_GGUF_MAGIC = b"GGUF"
_KV_CACHE_ELEMENT_BYTES = 2  # llama.cpp's default KV cache type is f16
_HASH_CHUNK = 4 * 1024 * 1024


class ModelFileError(Exception):
    """The file is missing, not a GGUF model, or damaged."""


@dataclass(frozen=True)
class ModelInfo:
    """A GGUF file as the node sees it."""

    path: Path
    size_bytes: int
    profile: ModelProfile
    file_type: str
    tensor_types: dict[str, int]
    tensor_count: int
    has_chat_template: bool = False  # the file carries its own (Jinja) chat template
    tokenizer_pre: str | None = None  # the tokenizer's pre-tokenizer name (picks a template)
    pooling_type: int | None = None  # declared by embedding and reranking models
    # A digest of the tokenizer (its tokens and special tokens): a draft model must match it.
    vocabulary: str = ""

    def as_dict(self) -> dict[str, Any]:
        p = self.profile
        return {
            "path": str(self.path),
            "name": p.name,
            "architecture": p.architecture,
            "layer_count": p.layer_count,
            "layer_weight_bytes": list(p.layer_weight_bytes),
            "embedding_bytes": p.embedding_bytes,
            "output_bytes": p.output_bytes,
            "other_bytes": p.other_bytes,
            "total_weight_bytes": p.total_weight_bytes,
            "kv_bytes_per_token_per_layer": p.kv_bytes_per_token_per_layer,
            "embedding_length": p.embedding_length,
            "vocab_size": p.vocab_size,
            "context_length": p.context_length,
            "file_type": self.file_type,
            "tensor_types": self.tensor_types,
            "tensor_count": self.tensor_count,
            "size_bytes": self.size_bytes,
            "kind": inferred_kind(p.architecture, self.pooling_type),
            "has_chat_template": self.has_chat_template,
            "builtin_chat_template": None
            if self.has_chat_template
            else builtin_template(p.architecture, self.tokenizer_pre),
        }


def inspect_model(path: Path) -> ModelInfo:
    """Reads the metadata and tensor table of a GGUF file (weights are not read)."""
    size = _check_file(path)
    header = _read_header(path)
    fields = _read_fields(header)
    arch = _require_str(fields, "general.architecture", path)
    tensors = _read_tensors(header, size, path)
    layer_count = _require_int(fields, f"{arch}.block_count", path)
    profile = ModelProfile(
        name=_model_name(fields, path),
        architecture=arch,
        layer_weight_bytes=_layer_bytes(tensors, layer_count, path),
        embedding_bytes=_sum_named(tensors, "token_embd."),
        output_bytes=_sum_named(tensors, "output."),
        other_bytes=_other_bytes(tensors),
        kv_bytes_per_token_per_layer=_kv_bytes_per_token(fields, arch, path),
        embedding_length=_require_int(fields, f"{arch}.embedding_length", path),
        vocab_size=_vocab_size(fields),
        context_length=_require_int(fields, f"{arch}.context_length", path),
    )
    return ModelInfo(
        path=path,
        size_bytes=size,
        profile=profile,
        file_type=_file_type_name(fields),
        tensor_types=dict(sorted(Counter(t[1] for t in tensors).items())),
        tensor_count=len(tensors),
        has_chat_template=isinstance(fields.get("tokenizer.chat_template"), str),
        tokenizer_pre=_optional_str(fields, "tokenizer.ggml.pre"),
        pooling_type=_optional_int(fields, f"{arch}.pooling_type"),
        vocabulary=_vocabulary_digest(fields),
    )


def file_sha256(path: Path) -> str:
    """The file's SHA-256, read in large chunks (a model is gigabytes)."""
    digest = hashlib.sha256()
    try:
        with path.open("rb") as handle:
            while chunk := handle.read(_HASH_CHUNK):
                digest.update(chunk)
    except OSError as err:
        raise ModelFileError(f"{path}: cannot read: {err.strerror}") from None
    return digest.hexdigest()


def cached_sha256(path: Path, cache_dir: Path) -> str:
    """The file's SHA-256, remembered per (path, size, modification time): hashing a model of
    tens of gigabytes takes minutes, and the file rarely changes."""
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    cache = cache_dir / "model_hashes.json"
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError, RecursionError):
        known = {}
    if not isinstance(known, dict):
        known = {}
    digest = known.get(key)
    if isinstance(digest, str):
        return digest
    digest = file_sha256(path)
    known[key] = digest
    write_atomic(cache, json.dumps(known, indent=1).encode(), mode=0o644)
    return digest


def _check_file(path: Path) -> int:
    if not path.exists():
        raise ModelFileError(f"{path}: no such file")
    if not path.is_file():
        raise ModelFileError(f"{path}: not a regular file")
    try:
        with path.open("rb") as handle:
            magic = handle.read(4)
        size = path.stat().st_size
    except OSError as err:
        raise ModelFileError(f"{path}: cannot read: {err.strerror}") from None
    if magic != _GGUF_MAGIC:
        raise ModelFileError(f"{path}: not a GGUF file (it does not start with 'GGUF')")
    return size


def _read_header(path: Path) -> GgufHeader:
    try:
        return read_header(path)
    except GgufFormatError as err:
        raise ModelFileError(f"{path}: damaged or truncated GGUF file ({err})") from None
    except OSError as err:
        raise ModelFileError(f"{path}: cannot read: {err.strerror}") from None


def _read_fields(header: GgufHeader) -> dict[str, Any]:
    fields = dict(header.fields)
    tokens = fields.get("tokenizer.ggml.tokens")
    if isinstance(tokens, ArrayInfo | list):
        fields["tokenizer.ggml.tokens.count"] = (
            tokens.length if isinstance(tokens, ArrayInfo) else len(tokens)
        )
    return fields


def _read_tensors(header: GgufHeader, file_size: int, path: Path) -> list[tuple[str, str, int]]:
    tensors: list[tuple[str, str, int]] = []
    for tensor in header.tensors:
        end = tensor.offset + tensor.n_bytes
        if end > file_size:
            raise ModelFileError(
                f"{path}: truncated GGUF file (tensor {tensor.name} ends at byte {end}, "
                f"the file has {file_size})"
            )
        tensors.append((tensor.name, tensor.type_name, tensor.n_bytes))
    if not tensors:
        raise ModelFileError(f"{path}: GGUF file holds no tensors")
    return tensors


def _layer_bytes(
    tensors: list[tuple[str, str, int]], layer_count: int, path: Path
) -> tuple[int, ...]:
    if not 0 < layer_count <= len(tensors):  # every block has tensors; checked before allocating
        raise ModelFileError(
            f"{path}: block_count {layer_count} does not match its {len(tensors)} tensors"
        )
    sizes = [0] * layer_count
    for name, _, n_bytes in tensors:
        match = _BLOCK_TENSOR.match(name)
        if match is None:
            continue
        index = int(match.group(1))
        if index >= layer_count:
            raise ModelFileError(f"{path}: tensor {name} is beyond block_count {layer_count}")
        sizes[index] += n_bytes
    if layer_count == 0 or any(s == 0 for s in sizes):
        raise ModelFileError(f"{path}: some of the {layer_count} blocks have no tensors")
    return tuple(sizes)


def _sum_named(tensors: list[tuple[str, str, int]], prefix: str) -> int:
    return sum(n for name, _, n in tensors if name.startswith(prefix))


def _other_bytes(tensors: list[tuple[str, str, int]]) -> int:
    return sum(
        n
        for name, _, n in tensors
        if not _BLOCK_TENSOR.match(name) and not name.startswith(("token_embd.", "output."))
    )


def _kv_bytes_per_token(fields: dict[str, Any], arch: str, path: Path) -> int:
    heads = _require_int(fields, f"{arch}.attention.head_count", path)
    kv_heads = _optional_int(fields, f"{arch}.attention.head_count_kv") or heads
    embedding = _require_int(fields, f"{arch}.embedding_length", path)
    default_head_dim = embedding // heads if heads else 0
    key_dim = _optional_int(fields, f"{arch}.attention.key_length") or default_head_dim
    value_dim = _optional_int(fields, f"{arch}.attention.value_length") or default_head_dim
    return kv_heads * (key_dim + value_dim) * _KV_CACHE_ELEMENT_BYTES


def _optional_str(fields: dict[str, Any], key: str) -> str | None:
    value = fields.get(key)
    return value if isinstance(value, str) else None


_TOKENIZER_KEYS = (
    "tokenizer.ggml.model",
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.bos_token_id",
    "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.add_bos_token",
    "tokenizer.ggml.add_eos_token",
)


def _vocabulary_digest(fields: dict[str, Any]) -> str:
    """What llama.cpp compares before it drafts with one model for another (the tokens, the
    tokenizer and its special tokens), as one digest; "" for a file without tokens."""
    if "tokenizer.ggml.tokens" not in fields:
        return ""
    parts = [repr(fields.get(key)) for key in _TOKENIZER_KEYS]
    return hashlib.blake2b("\x1f".join(parts).encode(), digest_size=16).hexdigest()


def _vocab_size(fields: dict[str, Any]) -> int:
    count = fields.get("tokenizer.ggml.tokens.count")
    return count if isinstance(count, int) else 0


def _model_name(fields: dict[str, Any], path: Path) -> str:
    name = fields.get("general.name")
    return name if isinstance(name, str) and name else path.stem


def _file_type_name(fields: dict[str, Any]) -> str:
    raw = fields.get("general.file_type")
    if not isinstance(raw, int):
        return "unknown"
    try:
        return str(gguf.LlamaFileType(raw).name).removeprefix("MOSTLY_")
    except ValueError:
        return f"type {raw}"


def _require_int(fields: dict[str, Any], key: str, path: Path) -> int:
    value = _optional_int(fields, key)
    if value is None:
        raise ModelFileError(f"{path}: GGUF metadata lacks {key}")
    return value


def _optional_int(fields: dict[str, Any], key: str) -> int | None:
    value = fields.get(key)
    if isinstance(value, list) and value and all(isinstance(v, int) for v in value):
        return int(max(value))  # some architectures give one value per layer
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return None


def _require_str(fields: dict[str, Any], key: str, path: Path) -> str:
    value = fields.get(key)
    if not isinstance(value, str) or not value:
        raise ModelFileError(f"{path}: GGUF metadata lacks {key}")
    return value
