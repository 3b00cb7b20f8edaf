"""An engine built once serves other machines: `engine pack` writes the build to one archive,
and `--engine-archive` (or `engine install`) puts it into a fresh cache, where a node finds it
and serves; archives that are damaged, hostile or for another machine are refused whole."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from sharedllm.node.config import default_cache_dir
from sharedllm.node.engine.archive import (
    MANIFEST,
    EngineArchiveError,
    Platform,
    _check_platform,
    install_engine,
    pack_engine,
)
from sharedllm.node.engine.locate import (
    EngineInfo,
    built_engine_dir,
    detect_backend,
    find_engine,
)

from .node_process import invite_token, start_node

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return pack_engine(
        default_cache_dir(), detect_backend(), tmp_path_factory.mktemp("pack") / "engine.tar.gz"
    )


def test_a_node_with_a_fresh_cache_installs_the_packed_engine_and_serves(
    packed: Path, engine: EngineInfo, gemma_path: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    env = {"SHAREDLLM_CACHE_DIR": str(cache)}
    node = start_node(
        tmp_path / "node", "--model", str(gemma_path), "--engine-archive", str(packed), env=env
    )
    try:
        installed = find_engine(cache, None)
        assert installed.llama_server.is_relative_to(cache)
        assert (installed.version, installed.rpc_protocol) == (engine.version, engine.rpc_protocol)
        assert installed.changes == engine.changes
        body = {"model": gemma_path.stem, "prompt": "Hello", "max_tokens": 4}
        answer = httpx.post(f"{node.api_url}/v1/completions", json=body, timeout=120)
        assert answer.status_code == 200, node.log()[-2000:]
        assert "building llama.cpp" not in node.log()
    finally:
        node.stop()


def _rewrite(
    packed: Path, out: Path, change: Callable[[str, bytes], tuple[str, bytes] | None]
) -> Path:
    """A copy of the archive with each (name, data) passed through `change` (None: dropped)."""
    with tarfile.open(packed, "r:gz") as source, tarfile.open(out, "w:gz") as target:
        for member in source:
            reader = source.extractfile(member)
            assert reader is not None
            changed = change(member.name, reader.read())
            if changed is not None:
                entry = tarfile.TarInfo(changed[0])
                entry.size, entry.mode = len(changed[1]), 0o755
                target.addfile(entry, io.BytesIO(changed[1]))
    return out


def _manifest_edit(
    edit: Callable[[dict[str, Any]], None],
) -> Callable[[str, bytes], tuple[str, bytes]]:
    def change(name: str, data: bytes) -> tuple[str, bytes]:
        if name != MANIFEST:
            return name, data
        manifest = json.loads(data)
        edit(manifest)
        return name, json.dumps(manifest).encode()

    return change


def _tamper(name: str, data: bytes) -> tuple[str, bytes]:
    return name, data + b"\0" if name == "bin/llama-server" else data


def _other_machine(manifest: dict[str, Any]) -> None:
    manifest["platform"]["machine"] = "riscv128"


def _other_build(manifest: dict[str, Any]) -> None:
    manifest["build_key"] = "llama.cpp-something-else-cpu"


HOSTILE: dict[str, Callable[[str, bytes], tuple[str, bytes] | None]] = {
    "escaping path": lambda name, data: ("../" + name if name.startswith("bin/") else name, data),
    "tampered program": _tamper,
    "another machine": _manifest_edit(_other_machine),
    "another build": _manifest_edit(_other_build),
    "manifest not json": lambda name, data: (name, b"{not json" if name == MANIFEST else data),
    "missing program": lambda name, data: None if name == "bin/ggml-rpc-server" else (name, data),
    "manifest too large": lambda name, data: (
        name,
        data + b" " * 70_000 if name == MANIFEST else data,
    ),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_hostile_or_foreign_archive_is_refused_and_installs_nothing(
    packed: Path, tmp_path: Path, case: str
) -> None:
    archive = _rewrite(packed, tmp_path / "bad.tar.gz", HOSTILE[case])
    cache = tmp_path / "cache"
    with pytest.raises(EngineArchiveError):
        install_engine(archive, cache)
    assert not built_engine_dir(cache, detect_backend()).exists()
    assert not (tmp_path / "bin").exists()  # nothing escaped either


def test_links_garbage_and_missing_files_are_refused(tmp_path: Path) -> None:
    link = tmp_path / "link.tar.gz"
    with tarfile.open(link, "w:gz") as archive:
        entry = tarfile.TarInfo("bin/llama-server")
        entry.type, entry.linkname = tarfile.SYMTYPE, "/bin/sh"
        archive.addfile(entry)
    garbage = tmp_path / "garbage.tar.gz"
    garbage.write_bytes(hashlib.sha256(b"x").digest() * 100)
    for archive_path in (link, garbage, tmp_path / "missing.tar.gz"):
        with pytest.raises(EngineArchiveError):
            install_engine(archive_path, tmp_path / "cache")
    assert not built_engine_dir(tmp_path / "cache", detect_backend()).exists()


def test_an_engine_for_a_cpu_with_more_instruction_sets_is_refused(tmp_path: Path) -> None:
    """llama.cpp builds for the building machine's CPU: an engine that uses AVX-512 must not be
    installed where the CPU lacks it (it would die on its first matrix product)."""
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor : 0\nflags : fpu sse3 avx avx2 fma f16c\n")
    here = Platform.here(cpuinfo)
    assert here.cpu_features == {"sse3", "avx", "avx2", "fma", "f16c"}
    manifest = {"platform": {"system": here.system, "machine": here.machine}}
    _check_platform({"platform": {**manifest["platform"], "cpu_features": ["avx2"]}}, here)
    with pytest.raises(EngineArchiveError, match="avx512f"):
        _check_platform(
            {"platform": {**manifest["platform"], "cpu_features": ["avx2", "avx512f"]}}, here
        )


def test_a_joiner_with_no_engine_takes_a_members_build_over_the_mesh(
    engine: EngineInfo, gemma_path: Path, tmp_path: Path
) -> None:
    """--engine-from-mesh: the joiner's cache is empty; it joins, finds the member's offer for
    its platform, takes the archive over the data plane and serves with it."""
    member = start_node(tmp_path / "a", "--model", str(gemma_path), "--name", "a")
    try:
        token = invite_token(tmp_path / "a" / "data")
        cache = tmp_path / "fresh-cache"
        joiner = start_node(
            tmp_path / "b",
            "--join",
            token,
            "--engine-from-mesh",
            "--name",
            "b",
            env={"SHAREDLLM_CACHE_DIR": str(cache)},
            timeout_s=300,
        )
        try:
            installed = find_engine(cache, None)
            assert installed.llama_server.is_relative_to(cache)
            assert (installed.version, installed.rpc_protocol) == (
                engine.version,
                engine.rpc_protocol,
            )
            assert "building llama.cpp" not in joiner.log()
            body = {"model": gemma_path.stem, "prompt": "Hello", "max_tokens": 4}
            answer = httpx.post(f"{joiner.api_url}/v1/completions", json=body, timeout=120)
            assert answer.status_code == 200, joiner.log()[-2000:]
        finally:
            joiner.stop()
    finally:
        member.stop()
