"""`/metrics` on a real node: Prometheus text that a Prometheus parser reads, with requests by
status, the tokens the engine generated, members and the model's placement; and the timings
parser that finds the engine's figures in an answer's tail."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from sharedllm.node.api.metrics import AnswerTail, NodeMetrics, engine_timings

from .node_process import RunningNode, node_command, start_node
from .test_single_node import GEMMA_ID


def _samples(node: RunningNode) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    answer = httpx.get(node.api_url + "/metrics", timeout=10)
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain")
    found = {}
    for family in text_string_to_metric_families(answer.text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [node_command(), *args], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    return done


@pytest.mark.integration
def test_metrics_count_requests_tokens_and_show_the_placement(
    gemma_node: RunningNode,
) -> None:
    before = _samples(gemma_node)
    url = gemma_node.api_url + "/v1/completions"
    body = {"model": GEMMA_ID, "prompt": "Hello", "max_tokens": 5}
    plain = httpx.post(url, json=body, timeout=120).json()
    with httpx.stream("POST", url, json={**body, "stream": True}, timeout=120) as streamed:
        assert streamed.status_code == 200
        "".join(streamed.iter_text())
    assert httpx.get(gemma_node.api_url + "/nowhere").status_code == 404
    after = _samples(gemma_node)

    def grew(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert grew("sharedllm_requests_total", endpoint="/v1/completions", status="200") == 2
    assert grew("sharedllm_requests_total", endpoint="other", status="404") == 1
    generated = grew("sharedllm_generated_tokens_total", model=GEMMA_ID)
    assert plain["usage"]["completion_tokens"] < generated <= 10  # both answers counted
    assert after[("sharedllm_generation_tokens_per_second", (("model", GEMMA_ID),))] > 0
    assert after[("sharedllm_members", (("state", "self"),))] == 1
    assert ("sharedllm_gossip_messages_total", (("direction", "sent"),)) in after
    assert ("sharedllm_gossiped_states_total", (("outcome", "forged"),)) in after
    assert after[("sharedllm_model_serving", (("model", GEMMA_ID),))] == 1
    assert ("sharedllm_model_predicted_tokens_per_second", (("model", GEMMA_ID),)) in after
    data = str(gemma_node.log_path.parent / "data")
    status = _cli("status", "--data-dir", data)
    assert "GiB" in status.stdout and "predicted" in status.stdout, status.stdout
    assert "measured" in status.stdout and "through this node" in status.stdout, status.stdout
    models = json.loads(_cli("status", "--json", "--data-dir", data).stdout)["models"]
    traffic = models[GEMMA_ID]["api_traffic"]
    assert traffic["served"] >= 2 and traffic["tokens"] >= generated


def test_timings_come_from_the_last_event_or_the_whole_answer() -> None:
    timings = {"predicted_n": 7, "predicted_per_second": 3.5}
    whole = json.dumps({"content": "hi", "timings": timings})
    assert engine_timings(whole.encode()) == (7, 3.5)
    events = [
        {"content": "a"},
        {"content": "b", "timings": {"predicted_n": 2, "predicted_per_second": 9.0}},
    ]
    stream = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
    tail = AnswerTail()
    for index in range(0, len(stream), 7):
        tail.add(stream[index : index + 7].encode())
    assert engine_timings(tail.bytes()) == (2, 9.0)
    assert engine_timings(b'{"content": "no timings"}') is None


@given(st.binary(max_size=4096))
def test_any_tail_parses_or_gives_none(data: bytes) -> None:
    found = engine_timings(data)
    assert found is None or (isinstance(found[0], int) and isinstance(found[1], float))


@given(st.lists(st.binary(max_size=20_000), max_size=20))
def test_the_tail_stays_bounded_and_ends_like_the_answer(chunks: list[bytes]) -> None:
    tail = AnswerTail()
    for chunk in chunks:
        tail.add(chunk)
    kept, whole = tail.bytes(), b"".join(chunks)
    assert len(kept) <= 2 * 16 * 1024 + 20_000
    assert whole.endswith(kept) and len(kept) >= min(len(whole), 16 * 1024)


@pytest.mark.integration
def test_log_json_gives_one_object_a_line_with_engine_lines_tagged(
    tmp_path: Path, gemma_path: Path
) -> None:
    node = start_node(tmp_path, "--log-json", "--log-level", "debug", "--context-size", "512")
    node.stop()
    entries = [json.loads(line) for line in node.log().splitlines() if line.startswith("{")]
    assert all(set(e) >= {"time", "level", "logger", "message"} for e in entries)
    loggers = {e["logger"] for e in entries}
    assert {"sharedllm.cli", "sharedllm.node", "sharedllm.serving"} <= loggers
    assert "sharedllm.engine.llama-server" in loggers  # the engine's own output, tagged
    assert any("OpenAI-compatible API" in e["message"] for e in entries)


@pytest.mark.integration
def test_peers_lists_this_node_with_its_capacity(gemma_node: RunningNode) -> None:
    data = str(gemma_node.log_path.parent / "data")
    lines = _cli("peers", "--data-dir", data).stdout.splitlines()
    header = next(line for line in lines if line.startswith("peer "))
    for column in ("state", "rtt ms", "Mbit/s", "RAM GiB", "VRAM GiB", "GFLOPS", "engine"):
        assert column in header
    (me,) = [line for line in lines if " self " in line]
    assert GEMMA_ID in me and "rpc 7.0.0" in me and "/ip4/127.0.0.1/tcp/" in me


def test_every_replica_has_its_readiness_load_and_routed_requests() -> None:
    replicas = [
        {"replica": 1, "primary": "pa", "state": "ready", "in_flight": 2, "routed": 9},
        {"replica": 2, "primary": None, "state": "no nodes free for replica 2", "routed": 0},
    ]
    metrics = NodeMetrics(lambda: {"models": {"m": {"replicas": replicas}}})
    found = {
        (sample.name, sample.labels.get("replica"), sample.labels.get("primary")): sample.value
        for family in text_string_to_metric_families(metrics.render().decode())
        for sample in family.samples
        if sample.name.startswith("sharedllm_replica")
    }
    assert found[("sharedllm_replica_ready", "1", "pa")] == 1
    assert found[("sharedllm_replica_ready", "2", "")] == 0
    assert found[("sharedllm_replica_in_flight_requests", "1", "pa")] == 2
    assert found[("sharedllm_replica_routed_requests_total", "1", "pa")] == 9


def test_speculation_shows_its_mode_and_what_drafts_yielded() -> None:
    learned = {"mode": "ngram", "accepted_per_token": 0.9, "drafted_per_token": 1.0}
    models = {
        "m": {"speculation": {**learned, "learned_tokens": 4000}},
        "n": {"speculation": {"mode": "off", "learned_tokens": 0}},
    }
    metrics = NodeMetrics(lambda: {"models": models})
    found = {
        (sample.name, sample.labels.get("model")): sample.value
        for family in text_string_to_metric_families(metrics.render().decode())
        for sample in family.samples
    }
    assert found[("sharedllm_speculation_on", "m")] == 1
    assert found[("sharedllm_speculation_on", "n")] == 0
    assert found[("sharedllm_draft_accepted_per_token", "m")] == 0.9
    assert ("sharedllm_draft_accepted_per_token", "n") not in found
