"""How our changes to the pinned llama.cpp are applied: each whole or not at all.

A change is a set of edits (each replaces the one place its `old` text appears) and of files
added beside the engine's sources. Where any place does not appear exactly once (another
llama.cpp, named by SHAREDLLM_LLAMA_SDIST), the tree is left as it was and the engine is built
without that change.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Edit:
    """Replace the one occurrence of `old` with `new`."""

    old: str
    new: str


@dataclass(frozen=True)
class EnginePatch:
    """A named change: edits per file of the tree, and files added (tree path -> our file)."""

    name: str
    edits: Mapping[str, tuple[Edit, ...]]
    added: Mapping[str, Path] = field(default_factory=dict)


def apply_patch(tree: Path, patch: EnginePatch) -> str | None:
    """Applies `patch` to a llama.cpp source tree; returns why not where it does not fit (the
    tree is then left as it was)."""
    changed: dict[Path, str] = {}
    for name, edits in patch.edits.items():
        try:
            text = (tree / name).read_text()
        except OSError as err:
            return f"{name} unreadable ({err.strerror or err})"
        for index, edit in enumerate(edits):
            found = text.count(edit.old)
            if found != 1:
                return f"{name}: edit {index + 1} matches {found} places, not one"
            text = text.replace(edit.old, edit.new)
        changed[tree / name] = text
    for name in patch.added:
        if (tree / name).exists():
            return f"{name} is already there"
    try:
        added = {tree / name: ours.read_text() for name, ours in patch.added.items()}
    except OSError as err:
        return f"our own file is missing ({err})"
    for path, text in {**changed, **added}.items():
        path.write_text(text)
    return None
