"""A data directory holding something a node cannot use: the node starts anyway with one line
naming the file, or refuses with that line; never a traceback, never a crash loop."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from sharedllm.mesh.mesh_store import MAX_REMEMBERED_EPOCHS, load_epochs, save_epochs
from sharedllm.node.serving.offered_recently import RecentlyOffered

from .node_process import node_command, start_node, up_that_stops, wait_until_ready

_DEEP = b"[" * 100_000 + b"]" * 100_000
_NOT_UTF8 = b"\xff\xfe\x00garbage"
_NO_TIMING = {"SHAREDLLM_COMPUTE_GFLOPS": "100"}


def _made_mesh(tmp_path: Path) -> Path:
    data_dir = tmp_path / "data"
    subprocess.run(
        [node_command(), "mesh", "create", "--data-dir", str(data_dir), "--name", "m"],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return data_dir


def _write(path: Path, data: bytes) -> Callable[[Path], None]:
    def damage(data_dir: Path) -> None:
        (data_dir / path).write_bytes(data)

    return damage


REFUSED = {
    "mesh.json not JSON": (_write(Path("mesh/mesh.json"), b"{not json"), "mesh.json"),
    "mesh.json deep": (_write(Path("mesh/mesh.json"), _DEEP), "mesh.json"),
    "mesh.json huge": (_write(Path("mesh/mesh.json"), b" " * 10_000_000), "mesh.json"),
    "mesh.json a list": (_write(Path("mesh/mesh.json"), b"[1, 2]"), "mesh.json"),
    "mesh.json wrong types": (
        _write(Path("mesh/mesh.json"), b'{"name": 1, "mesh_public_key": [], "proof": {}}'),
        "mesh.json",
    ),
    "node_key short": (_write(Path("node_key"), b"abc"), "node_key"),
    "node_key huge": (_write(Path("node_key"), os.urandom(1_000_000)), "node_key"),
    "config deep": (_write(Path("config.toml"), b"a = " + _DEEP), "config.toml"),
    "config not UTF-8": (_write(Path("config.toml"), _NOT_UTF8), "config.toml"),
}


@pytest.mark.integration
@pytest.mark.parametrize("case", sorted(REFUSED))
def test_a_damaged_file_it_needs_is_refused_in_one_line(tmp_path: Path, case: str) -> None:
    damage, name = REFUSED[case]
    data_dir = _made_mesh(tmp_path)
    damage(data_dir)
    done = up_that_stops(data_dir, "--api-port", "0", env=_NO_TIMING)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr, done.stderr
    errors = [line for line in done.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and name in errors[0], done.stderr


@pytest.mark.integration
def test_damaged_files_it_can_do_without_are_named_and_skipped(tmp_path: Path) -> None:
    data_dir = _made_mesh(tmp_path)
    (data_dir / "mesh" / "known_peers.json").write_bytes(_DEEP)
    (data_dir / "mesh" / "epochs.json").write_bytes(b" " * 2_000_000)
    (data_dir / "running.json").write_bytes(_DEEP)
    (data_dir / "mesh" / "revocations").mkdir(exist_ok=True)
    (data_dir / "mesh" / "revocations" / "x.rev").write_bytes(_NOT_UTF8 * 1000)
    node = start_node(tmp_path, "--no-model", wait_ready=False, env=_NO_TIMING)
    try:
        wait_until_ready(node, 60, serving=False)
        log = node.log()
        assert "Traceback" not in log
        for name in ("known_peers.json", "epochs.json", "x.rev"):
            assert any(name in line and "ignoring" in line for line in log.splitlines()), name
    finally:
        node.stop()


def test_epochs_are_kept_bounded_and_damaged_entries_dropped(tmp_path: Path) -> None:
    many = {f"model-{i}": i for i in range(MAX_REMEMBERED_EPOCHS + 50)}
    save_epochs(tmp_path, many)
    kept = load_epochs(tmp_path)
    assert len(kept) == MAX_REMEMBERED_EPOCHS
    assert min(kept.values()) == 50  # the highest epochs are the ones kept
    (tmp_path / "mesh" / "epochs.json").write_text('{"a": 3, "b": -1, "c": true, "d": "7"}')
    assert load_epochs(tmp_path) == {"a": 3}


def test_models_offered_recently_are_remembered_within_the_window_and_bounded() -> None:
    recent = RecentlyOffered(window_s=60.0, max_models=3)
    recent.note(["a", "b"], now=0.0)
    assert recent.gone_for("a", now=30.0) == 30.0
    assert recent.missing(["b"], now=30.0) == ["a"]
    assert recent.gone_for("a", now=61.0) is None and recent.missing([], now=61.0) == []
    recent.note(["c", "d", "e"], now=70.0)
    assert recent.gone_for("b", now=70.0) is None  # the oldest went first
    assert recent.gone_for("e", now=70.0) == 0.0
