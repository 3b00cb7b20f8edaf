"""Which engine a primary connects an API tunnel to: the placement the sender named, or, when
the sender's view is behind a re-plan of this node, the newest one it leads that takes requests."""

from __future__ import annotations

from dataclasses import dataclass

from sharedllm.node.serving.reconciler import JobKey
from sharedllm.node.serving.worker import api_endpoint

ME = "12D3KooWprimary"


@dataclass
class _Engine:
    epoch: int
    verified: bool = True
    ready: bool = True

    def endpoint(self) -> str | None:
        return f"unix:/engine-{self.epoch}" if self.ready else None


def _jobs(*entries: tuple[str, _Engine]) -> dict[JobKey, _Engine]:
    return {(model, (engine.epoch, ME)): engine for model, engine in entries}


def test_the_named_placement_answers_when_it_serves() -> None:
    jobs = _jobs(("m", _Engine(3)), ("m", _Engine(7)))
    assert api_endpoint(jobs, set(), ME, "m", 3) == "unix:/engine-3"


def test_a_behind_sender_reaches_the_newer_placement_of_the_same_model() -> None:
    jobs = _jobs(("m", _Engine(5)), ("m", _Engine(9)), ("other", _Engine(11)))
    assert api_endpoint(jobs, set(), ME, "m", 1) == "unix:/engine-9"


def test_no_older_unready_unverified_or_retiring_placement_takes_it() -> None:
    jobs = _jobs(
        ("m", _Engine(2)),
        ("m", _Engine(6, verified=False)),
        ("m", _Engine(7, ready=False)),
        ("m", _Engine(8)),
    )
    winding: set[JobKey] = {("m", (8, ME))}
    assert api_endpoint(jobs, winding, ME, "m", 4) is None
    assert api_endpoint(jobs, winding, ME, "other", 1) is None
