"""Engine build failures name the log and what to install; the build lock serialises builders."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest
from sharedllm.node.engine_build import EngineBuildError, build_engine


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
