"""Things to piggyback on outgoing messages, each sent a bounded number of times (sans-I/O).

Rumors and new states spread by riding on probes: each message takes a few, those with the most
sends left (the newest news) first. Items sit in buckets by sends left, so taking a few costs
what is taken, not what is queued (in a join storm a node queues a state per newcomer).
"""

from __future__ import annotations

from typing import Generic, TypeVar

T = TypeVar("T")


class SendQueue(Generic[T]):
    """`capacity` bounds memory when news comes faster than messages carry it: the item with
    the fewest sends left (the oldest news) makes room; anti-entropy repairs what it missed."""

    def __init__(self, capacity: int = 1024) -> None:
        self.capacity = capacity
        self._items: dict[str, tuple[T, int]] = {}  # key -> (item, sends left)
        self._buckets: dict[int, dict[str, None]] = {}  # sends left -> keys, oldest first

    def put(self, key: str, item: T, sends: int) -> None:
        """Queues `item` under `key` (replacing what was there) to be sent `sends` times."""
        self.discard(key)
        if sends > 0:
            if len(self._items) >= self.capacity:
                fewest = self._buckets[min(self._buckets)]
                self.discard(next(iter(fewest)))
            self._items[key] = (item, sends)
            self._buckets.setdefault(sends, {})[key] = None

    def discard(self, key: str) -> None:
        entry = self._items.pop(key, None)
        if entry is not None:
            bucket = self._buckets[entry[1]]
            del bucket[key]
            if not bucket:
                del self._buckets[entry[1]]

    def take(self, limit: int) -> list[T]:
        """Up to `limit` items, most sends left first; each counts as sent once more."""
        chosen: list[str] = []
        for left in sorted(self._buckets, reverse=True):
            for key in self._buckets[left]:
                if len(chosen) == limit:
                    break
                chosen.append(key)
            if len(chosen) == limit:
                break
        taken = []
        for key in chosen:
            item, left = self._items[key]
            taken.append(item)
            self.put(key, item, left - 1)
        return taken

    def __len__(self) -> int:
        return len(self._items)
