"""The members' gossiped states as the election reads them, indexed by what it looks for.

In a mesh of a thousand nodes, every node reads the states several times a second to find the
few that hold a model, claim one or report a problem. Scanning all of them each time made the
election cost every node work for every other node; the index keeps that work proportional to
the few that matter. Contents are shared with the service that keeps them: never modify one.
"""

from __future__ import annotations

from collections.abc import Iterator, KeysView, Mapping
from typing import Any

# The keys the election looks members up by; a member is listed under a key when its state
# has a non-empty value there.
INDEXED_KEYS = ("claims", "demand", "drafts", "models", "problems")


class MemberStates(Mapping[str, Mapping[str, Any]]):
    """peer id -> decoded state content, with an index of members by `INDEXED_KEYS`."""

    def __init__(self) -> None:
        self._contents: dict[str, Mapping[str, Any]] = {}
        self._having: dict[str, dict[str, None]] = {key: {} for key in INDEXED_KEYS}

    @staticmethod
    def of(contents: Mapping[str, Mapping[str, Any]]) -> MemberStates:
        if isinstance(contents, MemberStates):
            return contents
        states = MemberStates()
        for origin, content in contents.items():
            states.put(origin, content)
        return states

    def put(self, origin: str, content: Mapping[str, Any]) -> None:
        self._contents[origin] = content
        for key, holders in self._having.items():
            if content.get(key):
                holders[origin] = None
            else:
                holders.pop(origin, None)

    def drop(self, origin: str) -> None:
        if self._contents.pop(origin, None) is not None:
            for holders in self._having.values():
                holders.pop(origin, None)

    def having(self, key: str) -> list[tuple[str, Mapping[str, Any]]]:
        """The members whose state has a non-empty `key`, by peer id."""
        return [(origin, self._contents[origin]) for origin in sorted(self._having[key])]

    def ids(self) -> KeysView[str]:
        """The peer ids, as a set-like view (compares with a set at C speed)."""
        return self._contents.keys()

    def __getitem__(self, origin: str) -> Mapping[str, Any]:
        return self._contents[origin]

    def __contains__(self, origin: object) -> bool:
        return origin in self._contents

    def __iter__(self) -> Iterator[str]:
        return iter(self._contents)

    def __len__(self) -> int:
        return len(self._contents)
