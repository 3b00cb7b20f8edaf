"""The command line as a user runs it: real processes, one-line errors, no tracebacks."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from sharedllm.node.mesh_setup import MAX_TOKEN_BYTES, MeshSetupError, join_token_from

from .node_process import node_command


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [node_command(), *args], capture_output=True, text=True, timeout=120, check=False
    )


def test_model_inspect_reports_gemma_layers(gemma_path: Path) -> None:
    done = _run("model", "inspect", str(gemma_path))
    assert done.returncode == 0, done.stderr
    lines = dict(
        line.split(None, 1) if "  " not in line else [p.strip() for p in line.split("  ", 1)]
        for line in done.stdout.splitlines()
    )
    assert lines["layers"].strip() == "18"
    assert lines["architecture"].strip() == "gemma3"
    assert lines["quantisation"].strip() == "Q4_K_M"


def test_model_inspect_json(gemma_path: Path) -> None:
    done = _run("model", "inspect", "--json", "--no-hash", str(gemma_path))
    data = json.loads(done.stdout)
    assert data["layer_count"] == 18
    assert len(data["layer_weight_bytes"]) == 18
    assert data["embedding_bytes"] == 178_257_920
    assert data["kv_bytes_per_token_per_layer"] == 1024
    assert data["context_length"] == 32768
    assert data["sha256"] is None


def test_model_inspect_errors_are_one_line(tmp_path: Path, tiny_model: Path) -> None:
    text = tmp_path / "readme.gguf"
    text.write_text("not a model")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny_model.read_bytes()[:5000])
    for path, reason in [
        (tmp_path / "absent.gguf", "no such file"),
        (text, "not a GGUF file"),
        (cut, "truncated GGUF file"),
    ]:
        done = _run("model", "inspect", str(path))
        assert done.returncode == 1
        assert done.stdout == ""
        assert done.stderr.count("\n") == 1
        assert done.stderr.startswith(f"sharedllm-node: error: {path}: ")
        assert reason in done.stderr


def test_engine_status_shows_versions() -> None:
    done = _run("engine", "status", "--json")
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    assert info["rpc_protocol"] == "7.0.0"
    assert Path(info["llama_server"]).name == "llama-server"


def test_configured_engine_dir_without_binaries_is_an_error(tmp_path: Path) -> None:
    done = _run("engine", "status", "--engine-dir", str(tmp_path))
    assert done.returncode == 1
    assert "has no llama-server" in done.stderr


def test_bad_config_file_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text("api_port = 'x'\n")
    done = _run("engine", "status", "--data-dir", str(tmp_path))
    assert done.returncode == 1
    assert "setting 'api_port'" in done.stderr
    assert "Traceback" not in done.stderr


def test_no_command_prints_help() -> None:
    done = _run()
    assert done.returncode == 2
    assert "usage: sharedllm-node" in done.stdout


def test_join_reads_the_token_from_a_file_and_refuses_what_is_not_one(tmp_path: Path) -> None:
    token = tmp_path / "token"
    assert join_token_from("sllm1-plain", tmp_path) == "sllm1-plain"
    assert join_token_from(None, tmp_path) is None
    token.write_text("sllm1-from-a-file\n")
    assert join_token_from(f"@{token}", tmp_path) == "sllm1-from-a-file"
    for bad in (b"", b"\xff\xfe", b"x" * (MAX_TOKEN_BYTES + 1)):
        token.write_bytes(bad)
        with pytest.raises(MeshSetupError):
            join_token_from(f"@{token}", tmp_path)
    with pytest.raises(MeshSetupError, match="no invite appeared"):
        join_token_from(f"@{tmp_path / 'never'}", tmp_path, wait_s=0.0)
