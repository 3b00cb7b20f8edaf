"""A built engine as one archive: `engine pack` writes it once, `engine install` puts it in
another machine's cache after checking that it runs there, so five machines need one build.

Our build links llama.cpp statically (only the system's C/C++ runtime and OpenMP are shared), so
the two programs run from any directory: the archive holds them and a manifest (format, build
key, backend, version, RPC protocol, our engine changes, platform, C library, and each file's
SHA-256). Installing trusts nothing in the archive: members are read only by the names we
write, sizes and counts are bounded, links and paths are refused, every hash is checked, and
the programs must run and report the manifest's versions before the engine is put in place.
"""

from __future__ import annotations

import hashlib
import io
import json
import platform
import shutil
import sys
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...mesh.atomic_file import write_atomic
from .locate import (
    LLAMA_SERVER,
    EngineInfo,
    EngineProbeError,
    built_engine_dir,
    describe_binaries,
    load_built_engine,
    pinned_build_key,
)

ARCHIVE_FORMAT = 1
RPC_SERVER = "ggml-rpc-server"
PROGRAMS = (LLAMA_SERVER, RPC_SERVER)
MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 64 * 1024
MAX_PROGRAM_BYTES = 2 * 1024**3
MAX_MEMBERS = 16


class EngineArchiveError(Exception):
    """The archive cannot be packed or installed here; the message says why."""


# Instruction sets llama.cpp's CPU build uses when the building machine has them (it builds
# for that machine's CPU): an engine from a machine with one of them dies on a CPU without it.
CPU_FEATURES = frozenset(
    [
        "sse3",
        "ssse3",
        "sse4_1",
        "sse4_2",
        "avx",
        "avx2",
        "fma",
        "f16c",
        "avx512f",
        "avx512bw",
        "avx512vl",
        "avx512dq",
        "avx512cd",
        "avx512_vnni",
        "avx512_bf16",
        "avx512vbmi",
        "avx_vnni",
    ]
)


@dataclass(frozen=True)
class Platform:
    system: str
    machine: str
    libc: str
    cpu_features: frozenset[str] = frozenset()

    @staticmethod
    def here(cpuinfo: Path = Path("/proc/cpuinfo")) -> Platform:
        name, version = platform.libc_ver()
        return Platform(
            sys.platform, platform.machine(), f"{name} {version}".strip(), _cpu_features(cpuinfo)
        )


def _cpu_features(cpuinfo: Path) -> frozenset[str]:
    """This CPU's instruction sets among `CPU_FEATURES` (none known where /proc is absent)."""
    try:
        with cpuinfo.open() as file:
            for line in file:
                if line.startswith("flags"):
                    return CPU_FEATURES & frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return frozenset()


def pack_engine(cache_dir: Path, backend: str, output: Path) -> Path:
    """Writes our built engine of `backend` (from the cache) to `output` (.tar.gz)."""
    info = load_built_engine(cache_dir, backend)
    if info is None:
        raise EngineArchiveError(
            f"no built {backend} engine in {cache_dir}: run `sharedllm-node engine build` first"
        )
    here = Platform.here()
    files = {name: _sha256(path) for name, path in _programs_of(info).items()}
    manifest = {
        "format": ARCHIVE_FORMAT,
        "build_key": pinned_build_key(backend),
        "backend": backend,
        "version": info.version,
        "rpc_protocol": info.rpc_protocol,
        "changes": info.changes,
        "platform": {
            "system": here.system,
            "machine": here.machine,
            "libc": here.libc,
            "cpu_features": sorted(here.cpu_features),
        },
        "files": files,
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(output.name + ".partial")
    with tarfile.open(partial, "w:gz") as archive:
        data = json.dumps(manifest, indent=1).encode()
        entry = tarfile.TarInfo(MANIFEST)
        entry.size, entry.mode = len(data), 0o644
        archive.addfile(entry, io.BytesIO(data))
        for name, path in _programs_of(info).items():
            archive.add(path, arcname=f"bin/{name}", recursive=False, filter=_plain_member)
    partial.replace(output)
    return output


def _programs_of(info: EngineInfo) -> dict[str, Path]:
    return {LLAMA_SERVER: info.llama_server, RPC_SERVER: info.rpc_server}


def _plain_member(entry: tarfile.TarInfo) -> tarfile.TarInfo:
    entry.uid = entry.gid = 0
    entry.uname = entry.gname = ""
    entry.mode = 0o755
    return entry


def install_engine(archive: Path, cache_dir: Path) -> EngineInfo:
    """Installs the engine in `archive` as this machine's built engine of its backend;
    raises EngineArchiveError (and changes nothing) if it does not belong here or run here."""
    with _opened(archive) as opened:
        members = _checked_members(opened)
        manifest = _read_manifest(opened, members)
        _check_platform(manifest)
        backend = manifest["backend"]
        target = built_engine_dir(cache_dir, backend)
        staging = target.with_name(target.name + ".installing")
        shutil.rmtree(staging, ignore_errors=True)
        (staging / "bin").mkdir(parents=True)
        try:
            for name in PROGRAMS:
                _extract_checked(opened, members[f"bin/{name}"], staging / "bin" / name, manifest)
            info = _probe(staging, manifest)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return _write_engine_json(target, info, manifest)


@contextmanager
def _opened(archive: Path) -> Iterator[tarfile.TarFile]:
    try:
        opened = tarfile.open(archive, "r:gz")  # noqa: SIM115 - closed below
    except (OSError, tarfile.TarError, EOFError) as err:
        raise EngineArchiveError(f"{archive} is not an engine archive: {err}") from None
    with opened:
        yield opened


def _checked_members(archive: tarfile.TarFile) -> dict[str, tarfile.TarInfo]:
    """Only the names we write, as regular files of bounded size."""
    wanted = {MANIFEST, *(f"bin/{name}" for name in PROGRAMS)}
    found: dict[str, tarfile.TarInfo] = {}
    try:
        for count, member in enumerate(archive):
            if count >= MAX_MEMBERS:
                raise EngineArchiveError(f"the archive has more than {MAX_MEMBERS} entries")
            if member.name not in wanted or member.name in found:
                raise EngineArchiveError(f"unexpected entry in the archive: {member.name!r}")
            if not member.isfile():
                raise EngineArchiveError(f"{member.name!r} in the archive is not a plain file")
            limit = MAX_MANIFEST_BYTES if member.name == MANIFEST else MAX_PROGRAM_BYTES
            if member.size > limit:
                raise EngineArchiveError(f"{member.name!r} in the archive is too large")
            found[member.name] = member
    except (tarfile.TarError, OSError, EOFError) as err:
        raise EngineArchiveError(f"the archive is damaged: {err}") from None
    missing = sorted(wanted - set(found))
    if missing:
        raise EngineArchiveError(f"the archive lacks {', '.join(missing)}")
    return found


def _read_manifest(archive: tarfile.TarFile, members: dict[str, tarfile.TarInfo]) -> dict[str, Any]:
    reader = archive.extractfile(members[MANIFEST])
    try:
        assert reader is not None
        manifest = json.loads(reader.read(MAX_MANIFEST_BYTES + 1))
    except (ValueError, UnicodeDecodeError, tarfile.TarError, OSError, EOFError) as err:
        raise EngineArchiveError(f"the archive's manifest is not valid JSON: {err}") from None
    expected: dict[str, type] = {
        "format": int,
        "backend": str,
        "version": str,
        "rpc_protocol": str,
        "changes": str,
        "platform": dict,
        "files": dict,
        "build_key": str,
    }
    if not isinstance(manifest, dict) or any(
        not isinstance(manifest.get(key), kind) for key, kind in expected.items()
    ):
        raise EngineArchiveError("the archive's manifest lacks fields or has the wrong types")
    if manifest["format"] != ARCHIVE_FORMAT:
        raise EngineArchiveError(f"archive format {manifest['format']} is not {ARCHIVE_FORMAT}")
    if manifest["build_key"] != pinned_build_key(manifest["backend"]):
        raise EngineArchiveError(
            f"the archive holds {manifest['build_key']!r}; this sharedllm uses "
            f"{pinned_build_key(manifest['backend'])!r} (build or pack a matching engine)"
        )
    return manifest


def _check_platform(manifest: dict[str, Any], here: Platform | None = None) -> None:
    packed, here = manifest["platform"], here or Platform.here()
    theirs = (packed.get("system"), packed.get("machine"))
    if theirs != (here.system, here.machine):
        raise EngineArchiveError(
            f"the engine was built for {theirs[0]} {theirs[1]}, this is {here.system} "
            f"{here.machine}"
        )
    features = packed.get("cpu_features", [])
    if not isinstance(features, list) or not all(isinstance(f, str) for f in features):
        raise EngineArchiveError("the archive's manifest lists CPU features wrongly")
    missing = sorted(CPU_FEATURES & set(features) - here.cpu_features)
    if missing and here.cpu_features:
        raise EngineArchiveError(
            f"the engine was built for a CPU with {', '.join(missing)}, which this one lacks: "
            "build the engine here, or pack it on a machine with no more than this one has"
        )


def _extract_checked(
    archive: tarfile.TarFile, member: tarfile.TarInfo, destination: Path, manifest: dict[str, Any]
) -> None:
    """Copies one program out, hashing it on the way; a wrong hash leaves nothing behind."""
    reader = archive.extractfile(member)
    digest = hashlib.sha256()
    try:
        assert reader is not None
        with destination.open("wb") as out:
            while block := reader.read(1024 * 1024):
                digest.update(block)
                out.write(block)
    except (tarfile.TarError, OSError, EOFError) as err:
        raise EngineArchiveError(f"the archive is damaged at {member.name}: {err}") from None
    if digest.hexdigest() != manifest["files"].get(destination.name):
        raise EngineArchiveError(f"{member.name} does not match the manifest's SHA-256")
    destination.chmod(0o755)


def _probe(staging: Path, manifest: dict[str, Any]) -> EngineInfo:
    """Runs both programs here: they must start and report the manifest's versions."""
    bin_dir = staging / "bin"
    try:
        info = describe_binaries(bin_dir / LLAMA_SERVER, bin_dir / RPC_SERVER, "built")
    except EngineProbeError as err:
        raise EngineArchiveError(f"the packed engine does not run on this machine: {err}") from None
    if (info.version, info.rpc_protocol) != (manifest["version"], manifest["rpc_protocol"]):
        raise EngineArchiveError(
            f"the packed engine reports {info.version} (RPC {info.rpc_protocol}), its manifest "
            f"{manifest['version']} (RPC {manifest['rpc_protocol']})"
        )
    return info


def _write_engine_json(target: Path, info: EngineInfo, manifest: dict[str, Any]) -> EngineInfo:
    """The same manifest as a local build's (written last: a half install is ignored)."""
    llama_server, rpc_server = target / "bin" / LLAMA_SERVER, target / "bin" / RPC_SERVER
    changes = [c for c in manifest["changes"].split(",") if c]
    engine = {
        "llama_server": str(llama_server),
        "rpc_server": str(rpc_server),
        "version": info.version,
        "rpc_protocol": info.rpc_protocol,
        "source": f"installed from an engine archive ({manifest['build_key']})",
        "patches": changes,
    }
    write_atomic(target / "engine.json", json.dumps(engine, indent=1).encode(), mode=0o644)
    return EngineInfo(
        llama_server, rpc_server, info.version, info.rpc_protocol, "built", ",".join(changes)
    )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while block := file.read(1024 * 1024):
            digest.update(block)
    return digest.hexdigest()
