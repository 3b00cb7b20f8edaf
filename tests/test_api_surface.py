"""The APIs people's tools speak, asked at a node that is not the model's primary: the official
openai, anthropic and ollama clients and raw HTTP, through a two-node mesh on 127.0.0.1 with an
API key and CORS, and the default model answering a first request sensibly in seconds."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anthropic
import httpx
import ollama
import openai
import psutil
import pytest
from openai.types.chat import ChatCompletionFunctionToolParam

from .node_process import RunningNode, invite_token, start_node

pytestmark = pytest.mark.integration
GEMMA_ID = "gemma-3-270m-q4_k_m"
KEY = "api-surface-test-key-0123456789"
ORIGIN = "http://localhost:5173"
CITY: dict[str, object] = {  # a JSON schema: an object naming a city
    "type": "object",
    "properties": {"city": {"type": "string"}},
    "required": ["city"],
}


@dataclass(frozen=True)
class Mesh:
    primary: RunningNode
    member: RunningNode  # clients ask here: the model runs on the primary


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory: pytest.TempPathFactory, gemma_path: Path) -> Iterator[Mesh]:
    """A primary holding the default model and a member without it."""
    base = tmp_path_factory.mktemp("api-surface")
    env = {"SHAREDLLM_CORS_ORIGINS": ORIGIN, "SHAREDLLM_MODEL_ALIASES": "gpt-4o-mini"}
    primary = start_node(base / "primary", "--api-key", KEY, "--context-size", "2048", env=env)
    member = None
    try:
        token = invite_token(base / "primary" / "data")
        strict = {**env, "SHAREDLLM_STRICT_MODEL_NAMES": "true"}  # the member only
        member = start_node(
            base / "member", "--api-key", KEY, "--join", token, "--no-model", env=strict
        )
        yield Mesh(primary, member)
    finally:
        for node in (member, primary):
            if node is not None:
                node.stop()


@pytest.fixture
def mesh(two_nodes: Mesh) -> RunningNode:
    return two_nodes.member


@pytest.fixture
def openai_client(mesh: RunningNode) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=mesh.api_url + "/v1", api_key=KEY, max_retries=0) as client:
        yield client


def _headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {KEY}"}


def test_the_first_chat_without_a_limit_answers_in_seconds(openai_client: openai.OpenAI) -> None:
    """README's first request: no max_tokens. The model's family template (gemma: the file has
    none) and the node's default limit make it end in seconds, not at a full context."""
    client = openai_client
    started = time.monotonic()
    answer = client.chat.completions.create(
        model=GEMMA_ID, messages=[{"role": "user", "content": "Hello!"}]
    )
    seconds = time.monotonic() - started
    text = answer.choices[0].message.content or ""
    print(
        f"first answer in {seconds:.1f} s, {answer.usage and answer.usage.completion_tokens} "
        f"tokens, {answer.choices[0].finish_reason}: {text[:120]!r}"
    )
    assert text.strip() and "<|im_" not in text and "<start_of_turn>" not in text
    assert answer.usage is not None and answer.usage.completion_tokens <= 256


def test_openai_sdk_json_schema_logprobs_completions_responses(
    openai_client: openai.OpenAI,
) -> None:
    client = openai_client
    chunks = client.chat.completions.create(
        model="gpt-4o-mini",  # an alias the primary gossips
        messages=[{"role": "user", "content": "Count to three."}],
        max_tokens=16,
        stream=True,
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    schema: Any = CITY
    shaped = client.chat.completions.create(
        model=GEMMA_ID,
        messages=[{"role": "user", "content": "Name a city as JSON."}],
        max_tokens=200,
        response_format=schema_format(schema),
    )
    content = shaped.choices[0].message.content or ""
    assert content.lstrip().startswith("{")  # the grammar holds from the first token...
    if shaped.choices[0].finish_reason == "stop":  # ...and a finished answer is the schema's
        assert isinstance(json.loads(content)["city"], str)
    scored = client.chat.completions.create(
        model=GEMMA_ID,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=4,
        logprobs=True,
        top_logprobs=2,
    )
    assert scored.choices[0].logprobs is not None
    plain = client.completions.create(model=GEMMA_ID, prompt="The sky is", max_tokens=8)
    assert plain.choices[0].text
    reply = client.responses.create(model=GEMMA_ID, input="Say hi.", max_output_tokens=16)
    assert reply.output_text


def test_anthropic_sdk_with_its_own_key_header(mesh: RunningNode) -> None:
    with anthropic.Anthropic(base_url=mesh.api_url, api_key=KEY, max_retries=0) as client:
        _anthropic_calls(client)
    with (
        anthropic.Anthropic(base_url=mesh.api_url, api_key="wrong-key", max_retries=0) as wrong,
        pytest.raises(anthropic.AuthenticationError) as refused,
    ):
        wrong.messages.create(
            model=GEMMA_ID, max_tokens=4, messages=[{"role": "user", "content": "x"}]
        )
    assert refused.value.body["type"] == "error"  # type: ignore[index]


def _anthropic_calls(client: anthropic.Anthropic) -> None:
    message = client.messages.create(
        model=GEMMA_ID, max_tokens=16, messages=[{"role": "user", "content": "Hello!"}]
    )
    assert message.content and message.content[0].type == "text"
    with client.messages.stream(
        model=GEMMA_ID, max_tokens=16, messages=[{"role": "user", "content": "Hi"}]
    ) as stream:
        assert "".join(stream.text_stream)
    counted = client.messages.count_tokens(
        model=GEMMA_ID, messages=[{"role": "user", "content": "Hello there"}]
    )
    assert counted.input_tokens > 0


def test_ollama_client_lists_chats_and_generates(mesh: RunningNode) -> None:
    with ollama.Client(host=mesh.api_url, headers=_headers()) as client:
        _ollama_calls(client)


def _ollama_calls(client: ollama.Client) -> None:
    assert [m.model for m in client.list().models] == [GEMMA_ID]
    answer = client.chat(
        model=GEMMA_ID,
        messages=[{"role": "user", "content": "Hello!"}],
        options={"num_predict": 16},
    )
    assert answer.message.content and answer.done and (answer.eval_count or 0) > 0
    pieces = list(
        client.generate(
            model=GEMMA_ID, prompt="The sky is", stream=True, options={"num_predict": 8}
        )
    )
    assert pieces[-1].done and "".join(p.response or "" for p in pieces)
    shown = client.show(GEMMA_ID)
    assert shown.details is not None and shown.details.family == "gemma3"
    assert shown.modelinfo is not None and shown.modelinfo["gemma3.block_count"] == 18
    assert "completion" in (shown.capabilities or [])
    assert (client.list().models[0].size or 0) > 100_000_000  # the weights' bytes


def test_names_the_mesh_does_not_know(two_nodes: Mesh) -> None:
    """The only model answers any name, unless the node asked is set to strict names."""
    body: dict[str, Any] = {"model": "whatever-the-tool-says", "max_tokens": 4}
    body["messages"] = [{"role": "user", "content": "hi"}]
    lenient = httpx.post(
        two_nodes.primary.api_url + "/chat/completions", json=body, headers=_headers(), timeout=60
    )
    assert lenient.status_code == 200
    member = two_nodes.member.api_url + "/v1"
    with (
        openai.OpenAI(base_url=member, api_key=KEY, max_retries=0) as client,
        pytest.raises(openai.NotFoundError) as caught,
    ):
        client.chat.completions.create(
            model="no-such-model", messages=[{"role": "user", "content": "hi"}]
        )
    assert caught.value.body == {
        "message": "The model 'no-such-model' does not exist",
        "type": "invalid_request_error",
        "param": "model",
        "code": "model_not_found",
    }


def test_native_endpoints(mesh: RunningNode) -> None:
    url, headers = mesh.api_url, _headers()
    native = httpx.post(
        url + "/completion", json={"prompt": "Hello", "n_predict": 8}, headers=headers, timeout=60
    )
    assert native.status_code == 200 and native.json()["content"]
    unprefixed = httpx.post(
        url + "/chat/completions",
        json={"model": GEMMA_ID, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
        headers=headers,
        timeout=60,
    )
    assert unprefixed.status_code == 200
    assert httpx.get(url + "/models", headers=headers).json()["data"][0]["id"] == GEMMA_ID
    props = httpx.get(url + "/props", headers=headers, timeout=30).json()
    assert props["model_alias"] == GEMMA_ID and "model_path" not in props
    assert "endpoint_slots" not in props and props["default_generation_settings"]
    tokens = httpx.post(url + "/tokenize", json={"content": "Hello"}, headers=headers).json()
    text = httpx.post(url + "/detokenize", json=tokens, headers=headers).json()["content"]
    assert text.strip() == "Hello"
    templated = httpx.post(
        url + "/apply-template",
        json={"messages": [{"role": "user", "content": "hi"}]},
        headers=headers,
    ).json()
    assert "<start_of_turn>user" in templated["prompt"]  # gemma's template, not ChatML
    for path in ("/slots", "/lora-adapters", "/metrics-engine"):
        assert httpx.get(url + path, headers=headers).status_code == 404


def test_bad_requests_and_refusals_in_each_api_s_shape(mesh: RunningNode) -> None:
    url, headers = mesh.api_url, _headers()
    anthropic_missing = httpx.post(url + "/v1/messages", json={"model": GEMMA_ID}, headers=headers)
    assert anthropic_missing.status_code == 400
    assert anthropic_missing.json()["error"]["type"] == "invalid_request_error"
    ollama_bad = httpx.post(url + "/api/chat", json={"messages": "hi"}, headers=headers)
    assert ollama_bad.status_code == 400 and "messages" in ollama_bad.json()["error"]
    no_key = httpx.post(url + "/v1/messages", json={})
    assert no_key.status_code == 401 and no_key.json()["type"] == "error"
    assert httpx.get(url + "/v1/embeddings", headers=headers).status_code == 405
    rerank = httpx.post(url + "/v1/rerank", json={"query": "q"}, headers=headers)
    assert rerank.status_code == 400 and "documents" in rerank.json()["error"]["message"]


def test_browser_preflight_and_cors_headers(mesh: RunningNode) -> None:
    preflight = httpx.options(
        mesh.api_url + "/v1/chat/completions",
        headers={
            "Origin": ORIGIN,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == ORIGIN
    listed = httpx.get(mesh.api_url + "/v1/models", headers={**_headers(), "Origin": ORIGIN})
    assert listed.headers["access-control-allow-origin"] == ORIGIN
    other = httpx.options(
        mesh.api_url + "/v1/models",
        headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "GET"},
    )
    assert "access-control-allow-origin" not in other.headers


def schema_format(schema: Any) -> Any:
    return {"type": "json_schema", "json_schema": {"name": "c", "schema": schema}}


def _engine_slots(primary_pid: int) -> list[dict[str, Any]]:
    """The primary's llama-server slots, over its private Unix socket (found from its argv)."""
    for child in psutil.Process(primary_pid).children(recursive=True):
        argv = child.cmdline()
        if "--host" in argv and argv[argv.index("--host") + 1].endswith(".sock"):
            socket_path = argv[argv.index("--host") + 1]
            transport = httpx.HTTPTransport(uds=socket_path)
            with httpx.Client(transport=transport, base_url="http://engine") as engine:
                slots: list[dict[str, Any]] = engine.get("/slots", timeout=5).json()
                return slots
    raise AssertionError("no llama-server with a Unix socket")


def test_a_client_that_gives_up_frees_the_engine(two_nodes: Mesh) -> None:
    """A non-streamed request whose client leaves must not keep generating."""
    body = {
        "model": GEMMA_ID,
        "messages": [{"role": "user", "content": "Write a long story."}],
        "max_tokens": 4000,
        "ignore_eos": True,
    }
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            two_nodes.member.api_url + "/v1/chat/completions",
            json=body,
            headers=_headers(),
            timeout=httpx.Timeout(5.0, read=2.0),
        )
    # 4,000 tokens take over a minute here: an engine still busy after 30 s kept the work.
    left = time.monotonic()
    while any(s.get("is_processing") for s in _engine_slots(two_nodes.primary.process.pid)):
        assert time.monotonic() < left + 30, "the engine still generates for a client that left"
        time.sleep(0.5)
    print(f"the engine stopped {time.monotonic() - left:.1f} s after the client left")


def _curl_stream(url: str, path: str, body: dict[str, Any]) -> list[str]:
    headers = ["-H", f"Authorization: Bearer {KEY}", "-H", "content-type: application/json"]
    done = subprocess.run(
        ["curl", "-sSN", "--max-time", "60", *headers, "-d", json.dumps(body), url + path],
        capture_output=True,
        text=True,
        timeout=90,
        check=True,
    )
    return [line for line in done.stdout.splitlines() if line.strip()]


def test_curl_streams_events_and_ndjson(mesh: RunningNode) -> None:
    chat = {"model": GEMMA_ID, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}
    events = _curl_stream(mesh.api_url, "/v1/chat/completions", {**chat, "stream": True})
    assert events[-1] == "data: [DONE]" and len(events) >= 3
    assert all(event.startswith("data: ") for event in events)
    lines = _curl_stream(mesh.api_url, "/api/chat", {**chat, "options": {"num_predict": 8}})
    parsed = [json.loads(line) for line in lines]  # NDJSON: Ollama streams by default
    assert parsed[-1]["done"] is True and len(parsed) >= 2
    assert all(not p["done"] for p in parsed[:-1])


def test_the_default_model_s_template_renders_tools_calls_and_results(mesh: RunningNode) -> None:
    """Tool calls need a template that renders them (llama.cpp derives the call format and its
    grammar from it): the gemma template shipped with the node does."""
    url, headers = mesh.api_url, _headers()
    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {}}}
    history = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ]
    body = {"messages": history, "tools": [weather]}
    prompt = httpx.post(url + "/apply-template", json=body, headers=headers).json()["prompt"]
    assert '"get_weather"' in prompt.split("<end_of_turn>")[0]  # offered in the first turn
    assert (
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>' in prompt
    )
    assert "<tool_response>sunny</tool_response>" in prompt
    props = httpx.get(url + "/props", headers=headers, timeout=30).json()
    assert props["chat_template_caps"]["supports_tool_calls"] is True


def test_openai_sdk_gets_a_tool_call_it_can_run(openai_client: openai.OpenAI) -> None:
    """With a tool required, the engine's grammar (from the gemma template) makes even the
    270M model answer with a call the SDK parses: a known function and JSON arguments."""
    weather: ChatCompletionFunctionToolParam = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": CITY,
        },
    }
    answer = openai_client.chat.completions.create(
        model=GEMMA_ID,
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=[weather],
        tool_choice="required",
        parallel_tool_calls=False,  # else it may go on to a second call, cut at max_tokens
        temperature=0,  # a 270M model's sampled calls do not always parse
        max_tokens=64,
    )
    calls = answer.choices[0].message.tool_calls or []
    assert calls, answer.choices[0].message
    call = calls[0]
    assert call.type == "function" and call.function.name == "get_weather"
    assert isinstance(json.loads(call.function.arguments).get("city"), str)
