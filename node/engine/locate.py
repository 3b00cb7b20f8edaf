"""Finding the llama.cpp engine and learning its versions.

The node needs two programs: `llama-server` (serves a model, drives remote layers) and the RPC
worker (`ggml-rpc-server`, called `rpc-server` in older builds). They come from, in order: a
directory the user configured, the PATH, or our own build of the pinned llama.cpp in the per-user
cache. Their versions are probed once and remembered, because the mesh must never mix RPC
protocol versions in one placement.
"""

from __future__ import annotations

import json
import os
import pty
import re
import secrets
import select
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from ...mesh.atomic_file import write_atomic

# The llama.cpp tree we build and test against: the one vendored in this llama-cpp-python sdist.
PINNED_SDIST = "llama-cpp-python"
PINNED_SDIST_VERSION = "0.3.36"
BUILD_REVISION = (
    "b4"  # b2: no Intel AMX; b3: cache hits copied in the background; b4: sealed handoff
)
LLAMA_SERVER = "llama-server"
RPC_SERVER_NAMES = ("ggml-rpc-server", "rpc-server")
BACKENDS = ("cpu", "cuda", "metal")

_VERSION_LINE = re.compile(r"version:\s*(\S+)")
_COMMIT = re.compile(r"\((?:.*commit\s+)?([0-9a-f]{6,40})\)")
_RPC_BANNER = re.compile(r"Starting RPC server v(\d+\.\d+\.\d+)")
_PROBE_TIMEOUT_S = 20.0


class EngineNotFoundError(Exception):
    """No usable llama.cpp binaries were found."""


class EngineProbeError(Exception):
    """A binary was found but does not behave like the llama.cpp program it should be."""


@dataclass(frozen=True)
class EngineInfo:
    """Where the engine's programs are and which versions they speak."""

    llama_server: Path
    rpc_server: Path
    version: str
    rpc_protocol: str
    source: str  # "configured", "PATH" or "built"
    changes: str = ""  # our changes to the engine, comma-separated (our build); "" if stock
    # llama-server takes `--spec-type ngram-mod` (our pinned build does; an older one of the
    # user's would not start with it, so its node never speculates)
    ngram_speculation: bool = True
    # llama-server takes `--fit off`: the node sets the split itself, and llama.cpp's own fitting
    # (a trial load that measures device memory) only delays every load (0.5 s on a CPU)
    fit_switch: bool = True

    def as_dict(self) -> dict[str, str]:
        return {k: str(v) for k, v in asdict(self).items()}


def pinned_build_key(backend: str = "cpu") -> str:
    """Names our own build in the cache: pinned source version, our build recipe's revision
    (a new one rebuilds every cached engine) and compute backend."""
    return f"llama.cpp-{PINNED_SDIST}-{PINNED_SDIST_VERSION}-{BUILD_REVISION}-{backend}"


def built_engine_dir(cache_dir: Path, backend: str = "cpu") -> Path:
    return cache_dir / "engine" / pinned_build_key(backend)


def find_nvcc(env: Mapping[str, str] = os.environ) -> Path | None:
    """CUDA's compiler: on PATH, else under CUDA_HOME (or CUDA_PATH, or the usual place)."""
    on_path = shutil.which("nvcc", path=env.get("PATH"))
    if on_path is not None:
        return Path(on_path)
    root = Path(env.get("CUDA_HOME") or env.get("CUDA_PATH") or "/usr/local/cuda")
    return root / "bin" / "nvcc" if _is_executable(root / "bin" / "nvcc") else None


def detect_backend(
    env: Mapping[str, str] = os.environ, system: str = sys.platform, devices: Path = Path("/dev")
) -> str:
    """The backend our own build uses: SHAREDLLM_ENGINE_BACKEND if set, else Metal on macOS,
    CUDA where its compiler is installed and an NVIDIA GPU is present, else the CPU.

    A toolkit alone is not enough: machines without a GPU often have one installed, and a
    build for no GPU would neither configure (it targets the GPUs present) nor help."""
    chosen = env.get("SHAREDLLM_ENGINE_BACKEND")
    if chosen:
        if chosen not in BACKENDS:
            raise EngineNotFoundError(
                f"SHAREDLLM_ENGINE_BACKEND={chosen!r} is not one of {', '.join(BACKENDS)}"
            )
        return chosen
    if system == "darwin":
        return "metal"
    has_gpu = any(devices.glob("nvidia[0-9]*"))
    return "cuda" if has_gpu and find_nvcc(env) is not None else "cpu"


def find_engine(
    cache_dir: Path, engine_dir: Path | None, path_env: str | None = None
) -> EngineInfo:
    """Finds the engine, probing its versions if they are not known yet."""
    if engine_dir is not None:
        found = _binaries_in(engine_dir)
        if found is None:
            raise EngineNotFoundError(
                f"configured engine directory {engine_dir} has no llama-server together with "
                f"one of {', '.join(RPC_SERVER_NAMES)}"
            )
        return _describe(*found, source="configured", cache_dir=cache_dir)
    on_path = _binaries_on_path(path_env)
    if on_path is not None:
        return _describe(*on_path, source="PATH", cache_dir=cache_dir)
    built = load_built_engine(cache_dir, detect_backend())
    if built is not None:
        return built
    raise EngineNotFoundError(
        "llama.cpp was not found: set engine_dir (or SHAREDLLM_ENGINE_DIR) to a directory with "
        "llama-server and ggml-rpc-server, put them on PATH, or run `sharedllm-node engine build`"
    )


def load_built_engine(cache_dir: Path, backend: str = "cpu") -> EngineInfo | None:
    """Our own build, if a finished one is in the cache (the manifest is written last)."""
    manifest = built_engine_dir(cache_dir, backend) / "engine.json"
    try:
        data = json.loads(manifest.read_text())
        info = EngineInfo(
            llama_server=Path(data["llama_server"]),
            rpc_server=Path(data["rpc_server"]),
            version=str(data["version"]),
            rpc_protocol=str(data["rpc_protocol"]),
            source="built",
            changes=",".join(data.get("patches", [])),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not (_is_executable(info.llama_server) and _is_executable(info.rpc_server)):
        return None
    return info


def describe_binaries(llama_server: Path, rpc_server: Path, source: str) -> EngineInfo:
    """Probes both programs (no cache): used right after a build."""
    ngram, fit = probe_usage(llama_server)
    return EngineInfo(
        llama_server=llama_server,
        rpc_server=rpc_server,
        version=probe_llama_server_version(llama_server),
        rpc_protocol=probe_rpc_protocol(rpc_server),
        source=source,
        ngram_speculation=ngram,
        fit_switch=fit,
    )


def llama_server_output(llama_server: Path, flag: str, timeout_s: float = _PROBE_TIMEOUT_S) -> str:
    """What `llama-server FLAG` prints (stdout and stderr), for probes that exit at once."""
    try:
        done = subprocess.run(
            [str(llama_server), flag],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        raise EngineProbeError(f"{llama_server}: cannot run {flag}: {err}") from None
    return done.stdout + done.stderr


def probe_llama_server_version(llama_server: Path) -> str:
    """`llama-server --version` prints `version: 7100 (0c1e570)` or, in our pinned tree,
    `version: 0.5.0-dev (build 1, commit 0c1e570)`."""
    output = llama_server_output(llama_server, "--version")
    match = _VERSION_LINE.search(output)
    if match is None:
        raise EngineProbeError(f"{llama_server}: --version printed no version line")
    commit = _COMMIT.search(output)
    return f"{match.group(1)}+{commit.group(1)}" if commit else match.group(1)


def probe_usage(llama_server: Path) -> tuple[bool, bool]:
    """Whether `llama-server --help` lists n-gram speculation (`--spec-type ... ngram-mod`),
    and whether it lists `--fit`; neither when it cannot be run."""
    try:
        usage = llama_server_output(llama_server, "--help")
    except EngineProbeError:
        return False, False
    lines = usage.splitlines()
    ngram = any(line.startswith("--spec-type") and "ngram-mod" in line for line in lines)
    return ngram, any(re.match(r"(-fit,\s+)?--fit\s", line) for line in lines)


def probe_rpc_protocol(rpc_server: Path) -> str:
    """Starts the RPC server on a free loopback port just long enough to read its banner.

    The banner is written with stdio, which buffers fully into a pipe and never flushes while
    the server runs; a pseudo-terminal makes it line-buffered.
    """
    port = free_loopback_port()
    env = dict(os.environ, GGML_RPC_NO_RDMA="1")
    controller, terminal = pty.openpty()
    try:
        process = subprocess.Popen(
            [str(rpc_server), "-H", "127.0.0.1", "-p", str(port)],
            stdin=subprocess.DEVNULL,
            stdout=terminal,
            stderr=terminal,
            env=env,
        )
    except OSError as err:
        os.close(controller)
        raise EngineProbeError(f"{rpc_server}: cannot start: {err.strerror}") from None
    finally:
        os.close(terminal)
    try:
        output = _read_until(controller, _RPC_BANNER, _PROBE_TIMEOUT_S)
    finally:
        process.kill()
        process.wait()
        os.close(controller)
    match = _RPC_BANNER.search(output)
    if match is None:
        raise EngineProbeError(f"{rpc_server}: printed no RPC protocol version: {output[-300:]!r}")
    return match.group(1)


def _read_until(fd: int, pattern: re.Pattern[str], timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    output = ""
    while not pattern.search(output):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        ready, _, _ = select.select([fd], [], [], remaining)
        if not ready:
            break
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # the terminal closes with EIO once the child exits
            break
        if not chunk:
            break
        output += chunk.decode(errors="replace")
    return output


_EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_LOWEST_PORT = 10000


def free_loopback_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now, for a child process to bind.

    Where the kernel says which ports it hands out by itself (listeners on port 0, the local
    side of outgoing connections), the port is picked below that range: between our check and
    the child's bind, the kernel cannot give it to anyone else.
    """
    for port in _candidates_below_ephemeral():
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _candidates_below_ephemeral(tries: int = 64) -> list[int]:
    try:
        low = int(_EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return []
    if low - _LOWEST_PORT < 1000:
        return []
    return [_LOWEST_PORT + secrets.randbelow(low - _LOWEST_PORT) for _ in range(tries)]


# What a remembered probe holds (an entry from an older node lacks some: probed again).
_PROBED = frozenset({"version", "rpc_protocol", "ngram_speculation", "fit_switch"})


def _describe(llama_server: Path, rpc_server: Path, *, source: str, cache_dir: Path) -> EngineInfo:
    """Versions of binaries we did not build, remembered per (path, size, mtime)."""
    cache_file = cache_dir / "engine" / "probes.json"
    key = "|".join(_fingerprint(p) for p in (llama_server, rpc_server))
    try:
        known = json.loads(cache_file.read_text())
    except (OSError, ValueError, RecursionError):
        known = {}
    if not isinstance(known, dict):
        known = {}
    entry = known.get(key)
    if isinstance(entry, dict) and entry.keys() >= _PROBED:
        return EngineInfo(
            llama_server,
            rpc_server,
            entry["version"],
            entry["rpc_protocol"],
            source,
            ngram_speculation=entry["ngram_speculation"] is True,
            fit_switch=entry["fit_switch"] is True,
        )
    info = describe_binaries(llama_server, rpc_server, source)
    known[key] = {
        "version": info.version,
        "rpc_protocol": info.rpc_protocol,
        "ngram_speculation": info.ngram_speculation,
        "fit_switch": info.fit_switch,
    }
    write_atomic(cache_file, json.dumps(known, indent=1).encode())
    return info


def _fingerprint(path: Path) -> str:
    stat = path.stat()
    return f"{path}:{stat.st_size}:{stat.st_mtime_ns}"


def _binaries_in(directory: Path) -> tuple[Path, Path] | None:
    server = directory / LLAMA_SERVER
    if not _is_executable(server):
        return None
    for name in RPC_SERVER_NAMES:
        if _is_executable(directory / name):
            return server, directory / name
    return None


def _binaries_on_path(path_env: str | None) -> tuple[Path, Path] | None:
    server = shutil.which(LLAMA_SERVER, path=path_env)
    if server is None:
        return None
    for name in RPC_SERVER_NAMES:
        rpc = shutil.which(name, path=path_env)
        if rpc is not None:
            return Path(server).resolve(), Path(rpc).resolve()
    return None


def _is_executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)
