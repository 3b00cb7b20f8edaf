"""A node offering an embedding model: started with the engine flags that kind needs, listed
with its kind, answering embeddings through the official openai client, and refusing chats
with a clear 400 rather than an engine error."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from sharedllm.node.models.model_kind import inferred_kind, kind_args

from .node_process import RunningNode, start_node

pytestmark = pytest.mark.integration


def test_kinds_come_from_the_file_and_need_their_flags() -> None:
    assert inferred_kind("llama", None) == "text"
    assert inferred_kind("bert", 2) == "embedding"
    assert inferred_kind("nomic-bert", None) == "embedding"
    assert inferred_kind("qwen3", 4) == "rerank"
    assert kind_args("embedding", None) == ["--embeddings", "--pooling", "mean"]
    assert kind_args("embedding", 2) == ["--embeddings"]
    assert kind_args("rerank", 4) == ["--reranking"]
    assert kind_args("text", None) == []


def _serving(
    factory: pytest.TempPathFactory, model: Path, name: str, *args: str, **env: str
) -> Iterator[RunningNode]:
    node = start_node(
        factory.mktemp(name), "--model", str(model), "--model-name", name, *args, env=env or None
    )
    yield node
    node.stop()


@pytest.fixture(scope="module")
def embedder(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[RunningNode]:
    # the kind from the environment (as from the config file); the reranker's from the flag
    yield from _serving(
        tmp_path_factory, tiny_model, "tiny-embed", SHAREDLLM_MODEL_KIND="embedding"
    )


def test_an_embedding_model_answers_embeddings(embedder: RunningNode) -> None:
    with openai.OpenAI(base_url=embedder.api_url + "/v1", api_key="x", max_retries=0) as client:
        listed = client.models.list().data
        assert [(m.id, getattr(m, "kind", None)) for m in listed] == [("tiny-embed", "embedding")]
        answer = client.embeddings.create(model="tiny-embed", input=["hello", "mesh"])
    assert len(answer.data) == 2
    assert len(answer.data[0].embedding) > 0
    assert answer.data[0].embedding != answer.data[1].embedding


def test_an_embedding_model_refuses_chats_with_a_clear_400(embedder: RunningNode) -> None:
    chat = httpx.post(
        embedder.api_url + "/v1/chat/completions",
        json={"model": "tiny-embed", "messages": [{"role": "user", "content": "hi"}]},
        timeout=30,
    )
    assert chat.status_code == 400
    assert "is a embedding model" not in chat.json()["error"]["message"]
    assert "embedding model" in chat.json()["error"]["message"]


@pytest.fixture(scope="module")
def reranker(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[RunningNode]:
    yield from _serving(tmp_path_factory, tiny_model, "tiny-rerank", "--kind", "rerank")


def test_a_reranker_ranks_documents_and_says_what_it_is(reranker: RunningNode) -> None:
    """`--kind rerank` starts the engine with ranking; `/v1/rerank` (the Jina/Cohere shape)
    answers one score per document, best first, and Ollama's face says it does not chat."""
    documents = ["a cat sat", "dogs bark", "the sky", "cats purr"]
    answer = httpx.post(
        reranker.api_url + "/v1/rerank",
        json={"model": "tiny-rerank", "query": "cat", "documents": documents, "top_n": 3},
        timeout=60,
    )
    assert answer.status_code == 200, answer.text
    results = answer.json()["results"]
    assert len(results) == 3 and len({r["index"] for r in results}) == 3
    assert all(0 <= r["index"] < len(documents) for r in results)
    scores = [r["relevance_score"] for r in results]
    assert scores == sorted(scores, reverse=True)
    listed = httpx.get(reranker.api_url + "/v1/models", timeout=30).json()["data"]
    assert [(m["id"], m["kind"]) for m in listed] == [("tiny-rerank", "rerank")]
    shown = httpx.post(reranker.api_url + "/api/show", json={"model": "tiny-rerank"}, timeout=30)
    assert shown.json()["capabilities"] == [] and shown.json()["details"]["family"] == "llama"
    chat = httpx.post(
        reranker.api_url + "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "hi"}]},
        timeout=30,
    )
    assert chat.status_code == 400 and "rerank" in chat.json()["error"]["message"]
