"""Our change to the engine's rpc-server: applied whole to the tree it was written for, never in
part to another, and carried by the engine we build."""

from __future__ import annotations

from pathlib import Path

import pytest
from sharedllm.node.engine.locate import EngineInfo
from sharedllm.node.engine.patch import EDITS, PATCH_NAME, apply_engine_patch

_FILE = Path("ggml/src/ggml-rpc/ggml-rpc.cpp")


def _tree(tmp_path: Path, text: str) -> Path:
    path = tmp_path / _FILE
    path.parent.mkdir(parents=True)
    path.write_text(text)
    return tmp_path


def _fitting_source() -> str:
    """A file that holds each place the change edits once, with other code around them."""
    return "\n// other code\n".join(edit.old for edit in EDITS)


def test_a_fitting_tree_gets_every_edit(tmp_path: Path) -> None:
    tree = _tree(tmp_path, _fitting_source())
    assert apply_engine_patch(tree) is None
    patched = (tree / _FILE).read_text()
    assert all(edit.new in patched for edit in EDITS)
    assert patched.count("// other code") == len(EDITS) - 1


def test_a_tree_it_does_not_fit_is_left_as_it_was(tmp_path: Path) -> None:
    source = _fitting_source().replace(EDITS[2].old, "// this llama.cpp copies hits its own way")
    tree = _tree(tmp_path, source)
    problem = apply_engine_patch(tree)
    assert problem is not None and "edit 3" in problem
    assert (tree / _FILE).read_text() == source


def test_a_tree_where_a_place_appears_twice_is_left_as_it_was(tmp_path: Path) -> None:
    source = _fitting_source() + EDITS[3].old
    tree = _tree(tmp_path, source)
    assert apply_engine_patch(tree) is not None
    assert (tree / _FILE).read_text() == source


def test_a_patched_tree_is_not_patched_twice(tmp_path: Path) -> None:
    tree = _tree(tmp_path, _fitting_source())
    assert apply_engine_patch(tree) is None
    once = (tree / _FILE).read_text()
    assert apply_engine_patch(tree) is not None
    assert (tree / _FILE).read_text() == once


def test_a_missing_source_file_is_reported(tmp_path: Path) -> None:
    problem = apply_engine_patch(tmp_path)
    assert problem is not None and "unreadable" in problem


@pytest.mark.integration
def test_the_engine_we_build_carries_the_change(engine: EngineInfo) -> None:
    if engine.source != "built":
        pytest.skip(f"the engine in use comes from {engine.source}, not our build")
    assert PATCH_NAME in engine.changes.split(",")
