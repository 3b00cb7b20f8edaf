"""Engine build failures name the log and what to install; the build lock serialises builders."""

from __future__ import annotations

import socket
import tarfile
from pathlib import Path

import pytest
from sharedllm.node.engine.build import EngineBuildError, build_engine, configure_command
from sharedllm.node.engine.locate import (
    EngineNotFoundError,
    built_engine_dir,
    detect_backend,
    free_loopback_port,
)


def _sdist_with(tmp_path: Path, cmake_text: str) -> Path:
    tree = tmp_path / "llama_cpp_python-0.0.0" / "vendor" / "llama.cpp"
    tree.mkdir(parents=True)
    (tree / "CMakeLists.txt").write_text(cmake_text)
    archive = tmp_path / "fake.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "llama_cpp_python-0.0.0", arcname="llama_cpp_python-0.0.0")
    return archive


def test_failed_build_names_its_log_and_what_to_install(tmp_path: Path) -> None:
    sdist = _sdist_with(
        tmp_path, 'cmake_minimum_required(VERSION 3.14)\nproject(x)\nmessage(FATAL_ERROR "boom")\n'
    )
    cache = tmp_path / "cache"
    with pytest.raises(EngineBuildError) as caught:
        build_engine(cache, sdist=sdist)
    message = str(caught.value)
    assert "engine build failed during configure" in message
    log = Path(message.split("full log: ")[1].split(maxsplit=1)[0])
    assert log.exists() and "boom" in log.read_text()
    assert "apt-get install g++ cmake make" in message
    assert not list((cache / "engine").glob("*/engine.json"))  # nothing half-installed


def test_archive_without_llama_tree_is_refused(tmp_path: Path) -> None:
    archive = tmp_path / "empty.tar.gz"
    with tarfile.open(archive, "w:gz"):
        pass
    with pytest.raises(EngineBuildError, match=r"does not contain vendor/llama\.cpp"):
        build_engine(tmp_path / "cache", sdist=archive)


def _fake_nvcc(tmp_path: Path) -> Path:
    nvcc = tmp_path / "cuda" / "bin" / "nvcc"
    nvcc.parent.mkdir(parents=True)
    nvcc.write_text("#!/bin/sh\n")
    nvcc.chmod(0o755)
    return nvcc


def test_backend_follows_the_machine_unless_the_user_chooses(tmp_path: Path) -> None:
    bare = {"PATH": str(tmp_path / "empty"), "CUDA_HOME": str(tmp_path / "none")}
    no_gpu, gpu = tmp_path / "dev-without", tmp_path / "dev-with"
    no_gpu.mkdir()
    gpu.mkdir()
    (gpu / "nvidia0").touch()
    assert detect_backend(bare, "darwin", gpu) == "metal"
    assert detect_backend(bare, "linux", gpu) == "cpu"  # a GPU but no compiler
    nvcc = _fake_nvcc(tmp_path)
    with_cuda = {**bare, "CUDA_HOME": str(nvcc.parents[1])}
    assert detect_backend(with_cuda, "linux", no_gpu) == "cpu"  # a compiler but no GPU
    assert detect_backend(with_cuda, "linux", gpu) == "cuda"
    assert detect_backend({"PATH": str(nvcc.parent)}, "linux", gpu) == "cuda"
    forced = {"PATH": str(nvcc.parent), "SHAREDLLM_ENGINE_BACKEND": "cpu"}
    assert detect_backend(forced, "linux", gpu) == "cpu"
    with pytest.raises(EngineNotFoundError, match="not one of cpu, cuda, metal"):
        detect_backend({"SHAREDLLM_ENGINE_BACKEND": "rocm"})


def test_cuda_build_turns_on_cuda_with_the_found_compiler(tmp_path: Path) -> None:
    nvcc = _fake_nvcc(tmp_path)
    env = {"PATH": str(nvcc.parent)}
    command = configure_command(tmp_path / "src", tmp_path / "build", "cuda", env)
    assert "-DGGML_RPC=ON" in command and "-DGGML_CUDA=ON" in command
    assert f"-DCMAKE_CUDA_COMPILER={nvcc}" in command
    assert not any(flag.startswith("-DCMAKE_CUDA_ARCHITECTURES") for flag in command)
    chosen = configure_command(
        tmp_path, tmp_path, "cuda", {**env, "SHAREDLLM_CUDA_ARCHITECTURES": "90"}
    )
    assert "-DCMAKE_CUDA_ARCHITECTURES=90" in chosen
    cpu = configure_command(tmp_path, tmp_path, "cpu", env)
    assert "-DGGML_METAL=OFF" in cpu and not any("CUDA" in flag for flag in cpu)
    # x86 builds leave out Intel AMX (it traps on some virtual machines); others get no x86 flag
    x86 = configure_command(tmp_path, tmp_path, "cpu", env, machine="x86_64")
    assert any(f.startswith("-DCMAKE_CXX_FLAGS=") and "-mno-amx-int8" in f for f in x86)
    arm = configure_command(tmp_path, tmp_path, "metal", env, machine="arm64")
    assert not any("amx" in flag for flag in arm)
    with pytest.raises(EngineBuildError, match="needs CUDA's compiler"):
        configure_command(
            tmp_path, tmp_path, "cuda", {"PATH": str(tmp_path), "CUDA_PATH": str(tmp_path)}
        )


def test_each_backend_is_built_and_found_in_its_own_place(tmp_path: Path) -> None:
    assert built_engine_dir(tmp_path, "cuda") != built_engine_dir(tmp_path, "cpu")
    assert built_engine_dir(tmp_path, "cuda").name.endswith("-cuda")


def test_ports_for_engines_are_free_and_outside_the_kernels_own_range() -> None:
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(20):
        port = free_loopback_port()
        assert port < low
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", port))
