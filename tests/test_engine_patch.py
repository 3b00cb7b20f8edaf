"""Our changes to the engine: each applied whole to the tree it was written for, never in
part to another, and carried by the engine we build."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from sharedllm.mesh.transport.native_relay import SEALED_RECORDS
from sharedllm.mesh.transport.native_relay import SOURCE as RELAY_SOURCE
from sharedllm.node.engine.locate import EngineInfo
from sharedllm.node.engine.patch import EDITS, PATCH_NAME, apply_engine_patch
from sharedllm.node.engine.patch_edits import apply_patch
from sharedllm.node.engine.sealed_patch import SEALED_PATCH, SEALED_PATCH_NAME

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
    assert {PATCH_NAME, SEALED_PATCH_NAME} <= set(engine.changes.split(","))


def _sealed_tree(tmp_path: Path) -> Path:
    """A tree holding each place the sealed transport edits, in each file it edits."""
    for name, edits in SEALED_PATCH.edits.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("\n// other code\n".join(edit.old for edit in edits))
    return tmp_path


def test_the_sealed_transport_edits_its_files_and_adds_its_own(tmp_path: Path) -> None:
    tree = _sealed_tree(tmp_path)
    assert apply_patch(tree, SEALED_PATCH) is None
    for name, edits in SEALED_PATCH.edits.items():
        assert all(edit.new in (tree / name).read_text() for edit in edits)
    for name, ours in SEALED_PATCH.added.items():
        assert (tree / name).read_text() == ours.read_text()
    # the shared record format is the relay's own file
    assert "sealed_seal" in (tree / "ggml/src/ggml-rpc/sharedllm_sealed_records.h").read_text()


def test_a_tree_that_has_a_file_it_would_add_is_left_as_it_was(tmp_path: Path) -> None:
    tree = _sealed_tree(tmp_path)
    before = {name: (tree / name).read_text() for name in SEALED_PATCH.edits}
    clash = tree / next(iter(SEALED_PATCH.added))
    clash.write_text("// someone else's")
    problem = apply_patch(tree, SEALED_PATCH)
    assert problem is not None and "already there" in problem
    assert {name: (tree / name).read_text() for name in SEALED_PATCH.edits} == before
    assert clash.read_text() == "// someone else's"


def test_a_tree_missing_one_edited_file_is_left_as_it_was(tmp_path: Path) -> None:
    tree = _sealed_tree(tmp_path)
    missing, *others = SEALED_PATCH.edits
    (tree / missing).unlink()
    before = {name: (tree / name).read_text() for name in others}
    assert apply_patch(tree, SEALED_PATCH) is not None
    assert {name: (tree / name).read_text() for name in others} == before


def test_the_files_a_build_reads_ship_with_the_package() -> None:
    """An installed node (a wheel, as on the GPU machine) builds the engine and the relay from
    files beside its modules: each is listed as package data, or the change is left out."""
    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    shipped = project["tool"]["setuptools"]["package-data"]
    needed = [*SEALED_PATCH.added.values(), RELAY_SOURCE, SEALED_RECORDS]
    for path in needed:
        package = "sharedllm." + ".".join(path.parent.relative_to(Path(__file__).parents[1]).parts)
        assert path.name in shipped.get(package, []), f"{path.name} is not shipped in {package}"
