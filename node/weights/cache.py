"""Warm loading: filling a worker's rpc-server weight cache from its own copy of the model.

With `-c`, the pinned `ggml-rpc-server` (RPC protocol 7.0.0) keeps every weight tensor over
10 MiB that it receives in `$LLAMA_CACHE/rpc/`, one file per tensor named by the FNV-1a-64 of
the tensor's bytes (16 lowercase hex digits). At load, llama-server first sends only that hash
(`SET_TENSOR_HASH`) and sends the bytes only when the server has no such file. The bytes are the
tensor's data exactly as stored in the GGUF, so a worker holding the file can compute the same
names for the tensors of its layers and write the entries before the primary loads: then even
the first load sends hashes, not weights.

Entries are written to a temporary file and renamed, so a crash never leaves a partial entry
under a real name. The engine itself writes entries in place on a cache miss; an entry that is
not exactly the tensor it is named after (wrong size, wrong bytes) is found and replaced before
a load relies on it, never served.
"""

from __future__ import annotations

import json
import mmap
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ...mesh.atomic_file import write_atomic
from ..models.gguf_header import read_header
from .native_hash import NativeFnv

# Tensors up to this size are always sent: the engine hashes only larger ones.
HASH_THRESHOLD_BYTES = 10 * 1024 * 1024
_BLOCK = re.compile(r"^blk\.(\d+)\.")
_ENTRY = re.compile(r"^[0-9a-f]{16}$")
_CHECKED = ".checked.json"  # entries verified by us: name -> [size, mtime_ns]
_NAMES = ".names.json"  # model file stamp -> {"offset:size": entry name} of its tensors
MAX_NAMED_MODELS = 16  # model files whose tensor names are remembered


@dataclass(frozen=True)
class TensorSpan:
    """Where a tensor's bytes lie in the model file."""

    name: str
    offset: int
    size: int


@dataclass
class FillReport:
    tensors: int = 0
    already_cached: int = 0
    written: int = 0
    replaced: int = 0  # entries that were damaged and written again
    bytes_written: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        return (
            f"{self.tensors} tensors: {self.already_cached} already cached, {self.written} "
            f"written ({self.bytes_written / 1e6:.0f} MB, {self.replaced} damaged entries "
            f"replaced) in {self.seconds:.1f} s"
        )


def rpc_cache_entries(llama_cache: Path) -> Path:
    """Where an rpc-server started with `LLAMA_CACHE=llama_cache` and `-c` keeps entries."""
    return llama_cache / "rpc"


def cached_layer_tensors(model: Path, first_layer: int, last_layer: int) -> list[TensorSpan]:
    """The tensors of blocks `first_layer`..`last_layer` that the engine sends by hash."""
    spans = []
    for tensor in read_header(model).tensors:
        found = _BLOCK.match(tensor.name)
        if found is None or not first_layer <= int(found.group(1)) <= last_layer:
            continue
        if tensor.n_bytes > HASH_THRESHOLD_BYTES:
            spans.append(TensorSpan(tensor.name, tensor.offset, tensor.n_bytes))
    return spans


def entry_name(fnv: NativeFnv, data: mmap.mmap | memoryview | bytes) -> str:
    return f"{fnv.hash(data):016x}"


def fill_cache(
    entries: Path,
    model: Path,
    spans: Sequence[TensorSpan],
    fnv: NativeFnv,
    *,
    stop: Callable[[], bool] = lambda: False,
) -> FillReport:
    """Makes sure `entries` holds a correct entry for every span; returns what it did.
    Checks `stop()` between tensors so that a cancelled fill ends soon. The tensors' names
    are remembered per model file (its path, size and mtime), so that a fill of a cache that
    is already complete reads neither the model nor the entries again."""
    started = time.monotonic()
    report = FillReport(tensors=len(spans))
    entries.mkdir(parents=True, exist_ok=True)
    checked = read_checked(entries)
    model_key = _model_key(model)
    names = read_names(entries).get(model_key, {})
    with model.open("rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY) as data:
        for span in spans:
            if stop():
                break
            where = f"{span.offset}:{span.size}"
            known = names.get(where)
            if known is not None and entry_matches(entries / known, known, span.size, fnv, checked):
                report.already_cached += 1
                continue
            tensor = memoryview(data)[span.offset : span.offset + span.size]
            try:
                name = names[where] = entry_name(fnv, tensor)
                target = entries / name
                if entry_matches(target, name, span.size, fnv, checked):
                    report.already_cached += 1
                    continue
                report.replaced += target.exists()
                write_atomic(target, tensor, mode=0o644)
            finally:
                tensor.release()
            checked[name] = stamp(target)
            report.written += 1
            report.bytes_written += span.size
    write_checked(entries, checked)
    # Read again: nodes sharing one cache (on one machine) may have added names meanwhile.
    all_names = read_names(entries)
    names = all_names.pop(model_key, {}) | names  # the most recently filled last
    all_names[model_key] = names
    write_names(entries, dict(list(all_names.items())[-MAX_NAMED_MODELS:]))
    report.seconds = time.monotonic() - started
    return report


def _model_key(model: Path) -> str:
    info = model.stat()
    return f"{model.resolve()}|{info.st_size}|{info.st_mtime_ns}"


def entry_matches(
    target: Path, name: str, size: int, fnv: NativeFnv, checked: dict[str, list[int]]
) -> bool:
    """Whether `target` is exactly the tensor it is named after (hashing it only when it
    changed since we last checked)."""
    try:
        found = stamp(target)
    except FileNotFoundError:
        return False
    if found[0] != size:
        return False
    if checked.get(name) == found:
        return True
    with (
        target.open("rb") as handle,
        mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY) as data,
    ):
        good = entry_name(fnv, data) == name
    if good:
        checked[name] = found
    return good


def stamp(path: Path) -> list[int]:
    info = path.stat()
    return [info.st_size, info.st_mtime_ns]


def _json_object(path: Path) -> dict[object, object]:
    """The JSON object in `path`; empty if the file is missing, unreadable or not one."""
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        return {}
    return found if isinstance(found, dict) else {}


def read_checked(entries: Path) -> dict[str, list[int]]:
    known = _json_object(entries / _CHECKED)
    return {
        k: v for k, v in known.items() if isinstance(k, str) and isinstance(v, list) and len(v) == 2
    }


def write_checked(entries: Path, checked: dict[str, list[int]]) -> None:
    write_atomic(entries / _CHECKED, json.dumps(checked).encode(), mode=0o644)


def read_names(entries: Path) -> dict[str, dict[str, str]]:
    """Remembered tensor names by model file; anything malformed is forgotten (the names are
    then computed again, and every entry is still checked against its own name)."""
    known = _json_object(entries / _NAMES)
    return {
        model: {k: v for k, v in names.items() if isinstance(k, str) and _is_entry_name(v)}
        for model, names in known.items()
        if isinstance(model, str) and isinstance(names, dict)
    }


def write_names(entries: Path, names: dict[str, dict[str, str]]) -> None:
    write_atomic(entries / _NAMES, json.dumps(names).encode(), mode=0o644, sync=False)


def _is_entry_name(value: object) -> bool:
    return isinstance(value, str) and _ENTRY.match(value) is not None
