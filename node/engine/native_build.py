"""Small C sources compiled once per machine into the node's cache, for ctypes to load.

The compiler is the one the engine build already needs. A library is named by a digest of its
source and build flags, so a changed source builds anew and concurrent builds agree on it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import trio

from ...mesh.transport.native_relay import SEALED_RECORDS, NativeRelay, libcrypto_path, spin_for
from ...mesh.transport.native_relay import SOURCE as RELAY_SOURCE

_BUILD_TIMEOUT_S = 120.0
_log = logging.getLogger("sharedllm.engine")


class NativeBuildFailed(Exception):
    """The library could not be built (the message says why and what to install)."""


def built_library(
    cache_dir: Path,
    name: str,
    source: str,
    link: Sequence[str] = (),
    *,
    purpose: str = "",
    headers: Mapping[str, str] | None = None,
) -> Path:
    """The compiled library of `source` (with `headers`, name -> text, beside it) in
    `cache_dir/native`, built on first use."""
    flags = ["-O2", "-shared", "-fPIC"]
    included = sorted((headers or {}).items())
    parts = [source, *flags, *link, *(f"{n}\0{t}" for n, t in included)]
    digest = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:12]
    target = cache_dir / "native" / f"{name}-{digest}-{platform.machine()}.so"
    if target.exists():
        return target
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise NativeBuildFailed(f"no C compiler found to build {purpose or name} (install gcc)")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as work:
        source_file = Path(work) / f"{name}.c"
        source_file.write_text(source)
        for header_name, text in included:
            (Path(work) / header_name).write_text(text)
        built = Path(work) / target.name
        command = [compiler, *flags, "-o", str(built), str(source_file), *link]
        try:
            done = subprocess.run(
                command, capture_output=True, text=True, check=False, timeout=_BUILD_TIMEOUT_S
            )
        except (OSError, subprocess.TimeoutExpired) as err:
            raise NativeBuildFailed(f"building {purpose or name} failed: {err}") from None
        if done.returncode != 0:
            raise NativeBuildFailed(f"building {purpose or name} failed: {done.stderr[-2000:]}")
        os.replace(built, target)  # atomic: a concurrent build just wins the same name
    return target


def native_relay_library(cache_dir: Path) -> Path:
    """The tunnels' native relay (`mesh.transport.native_relay`), linked against the libcrypto
    that this process's ssl module uses."""
    crypto = libcrypto_path()
    if crypto is None:
        raise NativeBuildFailed("no libcrypto found for the native tunnel relay")
    link = [crypto] if os.path.isabs(crypto) else [f"-l:{crypto}"]
    source = RELAY_SOURCE.read_text()
    headers = {SEALED_RECORDS.name: SEALED_RECORDS.read_text()}
    return built_library(
        cache_dir, "relay", source, link, purpose="the native tunnel relay", headers=headers
    )


async def load_native_relay(
    cache_dir: Path, wanted: bool = True, *, engine_on_gpus: bool = False
) -> NativeRelay | None:
    """The native tunnel relay (built off the event loop on first use), or None where it is
    not wanted or cannot be built or loaded (logged: rpc tunnels then take the Python path)."""
    if not wanted:
        return None
    try:
        library = await trio.to_thread.run_sync(native_relay_library, cache_dir)
        return NativeRelay(library, spin_for(os.cpu_count(), engine_on_gpus))
    except (NativeBuildFailed, OSError, AttributeError) as err:
        _log.warning("rpc tunnels take the Python path: %s", err)
        return None
