"""Racing connection attempts to a peer's addresses (happy eyeballs, RFC 8305's idea): the
next attempt starts when the previous one fails or after a short stagger, the first to succeed
wins and the others are cancelled (or closed, if they succeeded too late). An address that
reaches nothing costs the stagger, not a TCP timeout."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol, TypeVar

import trio

from .seam import TransportError

DEFAULT_STAGGER_S = 0.25


class Closable(Protocol):
    async def aclose(self) -> None: ...


T = TypeVar("T")
R = TypeVar("R", bound=Closable)


async def first_to_connect(
    candidates: Sequence[T],
    attempt: Callable[[T], Awaitable[R]],
    stagger_s: float = DEFAULT_STAGGER_S,
) -> tuple[T, R]:
    """The first candidate whose attempt succeeds, and its result; TransportError naming
    each failure when none does."""
    if not candidates:
        raise TransportError("no address to try")
    won: list[tuple[T, R]] = []
    failures: list[str] = []

    async def run_attempt(candidate: T, failed: trio.Event) -> None:
        try:
            result = await attempt(candidate)
        except TransportError as err:
            failures.append(str(err))
            failed.set()
            return
        if won:  # finished in the same instant as the winner
            with trio.CancelScope(shield=True):
                await result.aclose()
            return
        won.append((candidate, result))
        nursery.cancel_scope.cancel()

    async with trio.open_nursery() as nursery:
        for candidate in candidates:
            failed = trio.Event()
            nursery.start_soon(run_attempt, candidate, failed)
            with trio.move_on_after(stagger_s):
                await failed.wait()
    if not won:
        raise TransportError("; ".join(failures) or "every attempt was cancelled")
    return won[0]
