"""A real node runs as many requests at once as the plan gave its engine slots, and a request
beyond them waits for a slot instead of failing."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sharedllm.node.engine.locate import EngineInfo

from .node_process import RunningNode, start_node, status_json

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def two_slot_node(
    tmp_path_factory: pytest.TempPathFactory, engine: EngineInfo, gemma_path: Path
) -> Iterator[tuple[RunningNode, Path]]:
    base = tmp_path_factory.mktemp("two-slots")
    node = start_node(base, "--context-size", "1024", "--parallel-slots", "2", "--threads", "1")
    yield node, base / "data"
    node.stop()


def _status(data_dir: Path) -> dict[str, Any]:
    return status_json(data_dir)


def _stream(api_url: str, index: int, events: list[tuple[float, int, str]]) -> None:
    body = {"prompt": "Once upon a time", "max_tokens": 48, "temperature": 0, "ignore_eos": True}
    body["stream"] = True
    with httpx.stream("POST", f"{api_url}/v1/completions", json=body, timeout=120) as answer:
        answer.raise_for_status()
        started = False
        for line in answer.iter_lines():
            if line.startswith("data: {") and not started:
                events.append((time.monotonic(), index, "first"))
                started = True
    events.append((time.monotonic(), index, "done"))


def test_status_reports_the_slots_and_context_the_engine_runs(
    two_slot_node: tuple[RunningNode, Path],
) -> None:
    models = _status(two_slot_node[1])["models"]
    [entry] = models.values()
    assert (entry["slots"], entry["context"]) == (2, 1024)
    assert entry["planned"]["slots"] == 2


def test_two_streams_run_at_once_and_a_third_waits_for_a_slot(
    two_slot_node: tuple[RunningNode, Path],
) -> None:
    events: list[tuple[float, int, str]] = []
    threads = [
        threading.Thread(target=_stream, args=(two_slot_node[0].api_url, i, events))
        for i in range(3)
    ]
    for thread in threads:
        thread.start()
        time.sleep(0.05)
    for thread in threads:
        thread.join(timeout=180)
    order = [(index, what) for _, index, what in sorted(events)]
    assert len(order) == 6, order
    first_done = next(i for i, (_, what) in enumerate(order) if what == "done")
    started_before = {index for index, what in order[:first_done] if what == "first"}
    assert len(started_before) == 2, order  # two slots: two answers in progress together
    assert (2, "first") in order[first_done:], order  # the third waited for one to finish
