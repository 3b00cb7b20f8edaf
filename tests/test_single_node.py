"""One real node serving the real Gemma model: the official openai client, streaming and not,
bad input answered with OpenAI-shaped errors, and no engine process left behind."""

from __future__ import annotations

import subprocess
from pathlib import Path

import httpx
import openai
import pytest
from sharedllm.node.engine.locate import EngineInfo

from .node_process import RunningNode, node_command, start_node, wait_gone

pytestmark = pytest.mark.integration
GEMMA_ID = "gemma-3-270m-q4_k_m"


@pytest.fixture
def client(gemma_node: RunningNode) -> openai.OpenAI:
    return openai.OpenAI(base_url=gemma_node.api_url + "/v1", api_key="unused", max_retries=0)


def test_lists_the_default_model(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == [GEMMA_ID]


def test_chat_completion(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(
        model=GEMMA_ID,
        messages=[{"role": "user", "content": "What is the capital of France? One word."}],
        max_tokens=16,
        temperature=0,
    )
    text = answer.choices[0].message.content
    assert isinstance(text, str) and text.strip()
    assert answer.usage is not None and answer.usage.completion_tokens > 0


def test_streaming_chat_completion_arrives_in_pieces(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=GEMMA_ID,
        messages=[{"role": "user", "content": "Count from one to five."}],
        max_tokens=24,
        temperature=0,
        stream=True,
    )
    pieces = [
        c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content
    ]
    assert len(pieces) > 3
    assert "".join(pieces).strip()


def test_text_completion_streaming_and_not(client: openai.OpenAI) -> None:
    plain = client.completions.create(
        model=GEMMA_ID, prompt="The sky is", max_tokens=8, temperature=0
    )
    assert plain.choices[0].text
    streamed = client.completions.create(
        model=GEMMA_ID, prompt="The sky is", max_tokens=8, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == plain.choices[0].text


def test_health(gemma_node: RunningNode) -> None:
    answer = httpx.get(gemma_node.api_url + "/health")
    assert answer.status_code == 200
    assert answer.json() == {"status": "ok", "models": {GEMMA_ID: "ready"}}


def test_a_name_the_mesh_does_not_know_reaches_its_only_model(client: openai.OpenAI) -> None:
    """As llama-server answers any name with its one model (tools often insist on theirs)."""
    answer = client.chat.completions.create(
        model="no-such-model", messages=[{"role": "user", "content": "hi"}], max_tokens=4
    )
    assert answer.choices[0].message.content is not None


def test_malformed_json_is_400(gemma_node: RunningNode) -> None:
    answer = httpx.post(
        gemma_node.api_url + "/v1/chat/completions",
        content=b'{"model": "x", "messages": [',
        headers={"content-type": "application/json"},
    )
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["message"].startswith("request body is not valid JSON")


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"[1, 2]", "request body must be a JSON object"),
        (b'{"model": "gemma-3-270m-q4_k_m"}', "'messages' is a required property"),
        (b'{"model": 7, "messages": []}', "'model' must be a string"),
        (b'{"model": "gemma-3-270m-q4_k_m", "messages": "hi"}', "'messages' has the wrong type"),
    ],
)
def test_bad_request_bodies_are_400(gemma_node: RunningNode, body: bytes, message: str) -> None:
    answer = httpx.post(gemma_node.api_url + "/v1/chat/completions", content=body)
    assert answer.status_code == 400
    assert answer.json()["error"]["message"] == message


def test_unknown_path_and_method(gemma_node: RunningNode) -> None:
    assert httpx.get(gemma_node.api_url + "/v2/nothing").status_code == 404
    assert httpx.delete(gemma_node.api_url + "/v1/models").status_code == 405


def test_engine_listens_on_loopback_only(gemma_node: RunningNode) -> None:
    import psutil

    for pid in gemma_node.engine_pids():
        for conn in psutil.Process(pid).net_connections(kind="inet"):
            if conn.status == psutil.CONN_LISTEN:
                assert conn.laddr.ip == "127.0.0.1"


def _run_up(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [node_command(), "up", "--data-dir", str(tmp_path), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_bad_model_path_is_a_one_line_error(tmp_path: Path) -> None:
    done = _run_up(tmp_path, "--model", str(tmp_path / "missing.gguf"))
    assert done.returncode == 1
    assert (
        done.stderr.strip() == f"sharedllm-node: error: {tmp_path / 'missing.gguf'}: no such file"
    )


def test_non_gguf_model_is_a_one_line_error(tmp_path: Path) -> None:
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"PK\x03\x04 definitely a zip file")
    done = _run_up(tmp_path, "--model", str(fake))
    assert done.returncode == 1
    assert done.stderr.strip() == (
        f"sharedllm-node: error: {fake}: not a GGUF file (it does not start with 'GGUF')"
    )


def test_api_port_in_use_is_a_clear_error(
    tmp_path: Path, gemma_node: RunningNode, tiny_model: Path
) -> None:
    port = gemma_node.api_url.rsplit(":", 1)[1]
    done = _run_up(tmp_path, "--model", str(tiny_model), "--api-port", port)
    assert done.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr
    assert "Traceback" not in done.stderr


def test_kill_9_of_the_node_leaves_no_engine(
    tmp_path: Path, engine: EngineInfo, tiny_model: Path
) -> None:
    node = start_node(tmp_path, "--model", str(tiny_model))
    engine_pids = node.engine_pids()
    assert engine_pids, "the node should run a llama-server"
    node.process.kill()
    node.process.wait()
    assert wait_gone(engine_pids) == []


def test_sigterm_stops_the_node_and_its_engine(
    tmp_path: Path, engine: EngineInfo, tiny_model: Path
) -> None:
    node = start_node(tmp_path, "--model", str(tiny_model))
    engine_pids = node.engine_pids()
    assert engine_pids
    node.stop()
    assert node.process.returncode == 0
    assert wait_gone(engine_pids, timeout_s=1.0) == []


def test_engine_crash_is_restarted(tmp_path: Path, engine: EngineInfo, tiny_model: Path) -> None:
    import os
    import signal
    import time

    node = start_node(tmp_path, "--model", str(tiny_model))
    try:
        first = node.engine_pids()
        os.kill(first[0], signal.SIGKILL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            answer = httpx.post(
                node.api_url + "/v1/completions", json={"prompt": "hello", "max_tokens": 2}
            )
            if answer.status_code == 200:
                break
            assert answer.status_code == 503
            assert answer.headers["retry-after"]
            time.sleep(0.2)
        assert answer.status_code == 200
        assert node.engine_pids() and node.engine_pids() != first
        assert "restarting in" in node.log()
    finally:
        node.stop()
