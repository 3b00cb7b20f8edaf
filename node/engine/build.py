"""Building the pinned llama.cpp into the per-user cache, once per machine.

The source is the llama.cpp tree vendored in the llama-cpp-python sdist (fetched with pip, the
one registry every user of this Python package can reach). The build runs cmake with RPC
enabled and without anything that would download at build time, for one compute backend: CUDA
where its compiler is installed, Metal on macOS, else the CPU; each backend has its own build.
Several nodes on one machine share the result: a file lock makes the second wait for the first
instead of building twice.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

from ...mesh.atomic_file import write_atomic
from .locate import (
    LLAMA_SERVER,
    PINNED_SDIST,
    PINNED_SDIST_VERSION,
    EngineInfo,
    built_engine_dir,
    describe_binaries,
    detect_backend,
    find_nvcc,
    load_built_engine,
)
from .patch import ENGINE_PATCHES
from .patch_edits import apply_patch

ProgressCallback = Callable[[str, float], None]
"""Called with a step name and the fraction of that step done (0.0 to 1.0)."""

_CMAKE_FLAGS = (
    "-DGGML_RPC=ON",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DCMAKE_BUILD_TYPE=Release",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DBUILD_SHARED_LIBS=OFF",  # self-contained binaries that can live anywhere
)
_TARGETS = ("ggml-rpc-server", LLAMA_SERVER)
_PERCENT = re.compile(r"^\[\s*(\d+)%\]")
_VENDOR_PREFIX = "vendor/llama.cpp/"
WHAT_TO_INSTALL = (
    "a C++17 compiler, CMake >= 3.14 and make "
    "(Debian/Ubuntu: `apt-get install g++ cmake make`; macOS: `xcode-select --install` and "
    "`brew install cmake`)"
)


class EngineBuildError(Exception):
    """The build failed; the message names the log and what to install."""


def build_engine(
    cache_dir: Path,
    *,
    jobs: int | None = None,
    progress: ProgressCallback | None = None,
    force: bool = False,
    sdist: Path | None = None,
    backend: str | None = None,
) -> EngineInfo:
    """Builds (or waits for another process's build of) the pinned engine and returns it.

    `backend` defaults to what this machine supports (`detect_backend`): CUDA where nvcc is
    installed, Metal on macOS, else the CPU."""
    report = progress or (lambda _step, _fraction: None)
    backend = backend or detect_backend()
    target = built_engine_dir(cache_dir, backend)
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(target.parent / f"{target.name}.lock", report):
        existing = load_built_engine(cache_dir, backend)
        if existing is not None and not force:
            return existing
        log_path = target.parent / f"{target.name}.build.log"
        work = target.parent / f"{target.name}.work"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        try:
            with log_path.open("w") as log:
                source = _fetch_source(work, sdist or _sdist_from_env(), log, report)
                patches = _patch(source, log)
                build_dir = work / "build"
                configure = configure_command(source, build_dir, backend)
                _run_logged(configure, log, log_path, "configure", report)
                _run_logged(_build_command(build_dir, jobs), log, log_path, "compile", report)
            info = _install(build_dir / "bin", target, patches)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        report("done", 1.0)
        return info


def _sdist_from_env() -> Path | None:
    value = os.environ.get("SHAREDLLM_LLAMA_SDIST")
    return Path(value) if value else None


@contextmanager
def _exclusive_lock(path: Path, report: ProgressCallback) -> Iterator[None]:
    with path.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            report("waiting for another build", 0.0)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _fetch_source(work: Path, sdist: Path | None, log: TextIO, report: ProgressCallback) -> Path:
    report("download source", 0.0)
    if sdist is None:
        download_dir = work / "download"
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            "--dest",
            str(download_dir),
            f"{PINNED_SDIST}=={PINNED_SDIST_VERSION}",
        ]
        _run_logged(command, log, Path(log.name), "download source", report)
        archives = sorted(download_dir.glob("*.tar.gz"))
        if not archives:
            raise EngineBuildError(f"pip downloaded no source archive of {PINNED_SDIST}")
        sdist = archives[0]
    report("unpack source", 0.0)
    return _extract_llama_tree(sdist, work / "src")


def _extract_llama_tree(sdist: Path, dest: Path) -> Path:
    """Unpacks only the vendored llama.cpp tree, refusing links and paths that escape."""
    try:
        with tarfile.open(sdist, "r:gz") as archive:
            members = [m for m in archive.getmembers() if _VENDOR_PREFIX in m.name]
            archive.extractall(dest, members=members, filter="data")
    except (OSError, tarfile.TarError) as err:
        raise EngineBuildError(f"cannot unpack {sdist}: {err}") from None
    roots = [p for p in dest.glob(f"*/{_VENDOR_PREFIX}") if (p / "CMakeLists.txt").exists()]
    if not roots:
        raise EngineBuildError(f"{sdist} does not contain {_VENDOR_PREFIX}CMakeLists.txt")
    return roots[0]


def configure_command(
    source: Path,
    build_dir: Path,
    backend: str,
    env: Mapping[str, str] = os.environ,
    machine: str = platform.machine(),
) -> list[str]:
    """cmake's configure step. Metal is on by default on Apple machines; CUDA builds for the
    GPUs present at build time unless SHAREDLLM_CUDA_ARCHITECTURES names others."""
    flags = [*_CMAKE_FLAGS, *_cpu_flags(machine)]
    if backend == "cuda":
        nvcc = find_nvcc(env)
        if nvcc is None:
            raise EngineBuildError(
                "a CUDA build needs CUDA's compiler (nvcc): install the CUDA toolkit or set "
                "CUDA_HOME to where it is"
            )
        flags += ["-DGGML_CUDA=ON", f"-DCMAKE_CUDA_COMPILER={nvcc}"]
        if architectures := env.get("SHAREDLLM_CUDA_ARCHITECTURES"):
            flags.append(f"-DCMAKE_CUDA_ARCHITECTURES={architectures}")
    elif backend == "cpu":
        flags.append("-DGGML_METAL=OFF")
    return ["cmake", "-S", str(source), "-B", str(build_dir), *flags]


def _cpu_flags(machine: str) -> list[str]:
    """The build targets this machine's CPU (llama.cpp's default), but never Intel AMX on x86:
    some virtual machines advertise AMX yet trap when it runs (this project's CI machines do),
    and llama.cpp uses it only to speed up a few quantised matrix products."""
    if machine.lower() not in ("x86_64", "amd64"):
        return []
    no_amx = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
    return [f"-DCMAKE_C_FLAGS={no_amx}", f"-DCMAKE_CXX_FLAGS={no_amx}"]


def _build_command(build_dir: Path, jobs: int | None) -> list[str]:
    parallel = jobs or os.cpu_count() or 2
    return ["cmake", "--build", str(build_dir), "--target", *_TARGETS, "-j", str(parallel)]


def _run_logged(
    command: list[str], log: TextIO, log_path: Path, step: str, report: ProgressCallback
) -> None:
    log.write(f"$ {' '.join(command)}\n")
    log.flush()
    env = dict(os.environ, PIP_NO_INPUT="1")
    try:
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        )
    except FileNotFoundError:
        raise EngineBuildError(
            f"{command[0]} is not installed; the engine build needs {WHAT_TO_INSTALL}"
        ) from None
    with process:
        assert process.stdout is not None
        for line in process.stdout:
            log.write(line)
            match = _PERCENT.match(line)
            if match:
                report(step, int(match.group(1)) / 100)
    if process.returncode != 0:
        log.flush()
        raise EngineBuildError(
            f"engine build failed during {step} (exit code {process.returncode}); full log: "
            f"{log_path}\nlast lines:\n{_tail(log_path)}\nThe build needs {WHAT_TO_INSTALL}."
        )
    report(step, 1.0)


def _patch(source: Path, log: TextIO) -> list[str]:
    """Our changes to the engine (engine/patch.py), each whole or not at all; a tree a change
    does not fit is built without it, and the build log says why."""
    applied = []
    for patch in ENGINE_PATCHES:
        problem = apply_patch(source, patch)
        if problem is None:
            log.write(f"sharedllm: applied {patch.name}\n")
            applied.append(patch.name)
        else:
            log.write(f"sharedllm: {patch.name} not applied: {problem}\n")
    return applied


def _install(build_bin: Path, target: Path, patches: list[str]) -> EngineInfo:
    """Copies the binaries into place and writes the manifest last, so a half copy is ignored."""
    staging = target.with_name(target.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "bin").mkdir(parents=True)
    for name in _TARGETS:
        shutil.copy2(build_bin / name, staging / "bin" / name)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    probed = describe_binaries(target / "bin" / LLAMA_SERVER, target / "bin" / _TARGETS[0], "built")
    info = dataclasses.replace(probed, changes=",".join(patches))
    manifest = {
        "llama_server": str(info.llama_server),
        "rpc_server": str(info.rpc_server),
        "version": info.version,
        "rpc_protocol": info.rpc_protocol,
        "source": f"{PINNED_SDIST}=={PINNED_SDIST_VERSION} vendor/llama.cpp",
        "patches": patches,
    }
    write_atomic(target / "engine.json", json.dumps(manifest, indent=1).encode(), mode=0o644)
    return info


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(log unreadable)"
