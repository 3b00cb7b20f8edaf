"""Crashes and restarts as users meet them, against real nodes: no engine outlives a killed
node, a restarted node takes its ports back at once, and epochs never go back."""

from __future__ import annotations

import signal
import socket
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from sharedllm.node.config import default_cache_dir
from sharedllm.node.engine.locate import free_loopback_port

from .node_process import (
    RunningNode,
    gone,
    invite_token,
    start_node,
    up_that_stops,
    wait_gone,
)
from .test_mesh import _wait

pytestmark = pytest.mark.integration


def _cache_without_speed(tmp: Path) -> Path:
    """A cache directory sharing the real engine and models but with no remembered speed, so
    the node times its engine at start-up."""
    cache = tmp / "cache"
    cache.mkdir(parents=True)
    for name in ("engine", "models", "native"):
        if (default_cache_dir() / name).exists():
            (cache / name).symlink_to(default_cache_dir() / name)
    return cache


def _wait_for_child(pid: int, name: str, timeout_s: float = 60.0) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            for child in psutil.Process(pid).children(recursive=True):
                if name in child.name():
                    return child.pid
        except psutil.NoSuchProcess:
            break
        time.sleep(0.05)
    raise AssertionError(f"no {name} child of {pid} within {timeout_s} s")


def test_a_node_killed_while_timing_its_engine_leaves_no_engine_behind(tmp_path: Path) -> None:
    """The first-start speed timing's llama-server lived on with parent pid 1 after kill -9."""
    cache = _cache_without_speed(tmp_path)
    node = start_node(
        tmp_path / "a", "--no-model", wait_ready=False, env={"SHAREDLLM_CACHE_DIR": str(cache)}
    )
    timing = _wait_for_child(node.process.pid, "llama-server")
    node.process.send_signal(signal.SIGKILL)
    node.process.wait()
    left = wait_gone([timing], timeout_s=10)
    for pid in left:  # do not leave it running for the other tests
        psutil.Process(pid).kill()
    assert not left, "the speed-timing llama-server outlived its node"
    assert gone(timing)


def _placement(node: RunningNode, model_id: str) -> dict[str, Any]:
    view = httpx.get(node.api_url + "/mesh/peers", timeout=10).json()
    found: dict[str, Any] = view["models"].get(model_id, {})
    return found


def _chat(node: RunningNode, model_id: str) -> httpx.Response:
    body = {"model": model_id, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    return httpx.post(node.api_url + "/v1/chat/completions", json=body, timeout=120)


def test_the_only_holder_s_crash_and_restart(tmp_path: Path, tiny_model: Path) -> None:
    """While the only holder was down, the others answered 404 (final, to OpenAI clients);
    restarted at once on its port it failed ("Address already in use", TIME_WAIT); and its new
    claim went back to epoch 1. Now: 503 with Retry-After, a restart at once, a higher epoch."""
    model_id = tiny_model.stem
    listen = f"/ip4/127.0.0.1/tcp/{free_loopback_port()}"
    holder_args = ("--name", "a", "--model", str(tiny_model), "--listen", listen)
    a = start_node(tmp_path / "a", *holder_args, "--context-size", "256")
    b: RunningNode | None = None
    try:
        token = invite_token(tmp_path / "a" / "data")
        b = start_node(tmp_path / "b", "--name", "b", "--no-model", "--join", token)
        assert _chat(b, model_id).status_code == 200
        first_epoch = _placement(b, model_id)["epoch"]
        a.process.send_signal(signal.SIGKILL)
        a.process.wait()
        _wait(lambda: "reachable" in str(_health(b)), 60, "b to see the holder gone")
        refused = _chat(b, model_id)
        assert refused.status_code == 503, refused.text
        assert refused.headers["retry-after"].isdigit()
        assert refused.json()["error"]["code"] == "model_not_ready"
        # at once, on the same ports (the killed node's connections sit in TIME_WAIT)
        a = start_node(tmp_path / "a", *holder_args, "--context-size", "256")
        _wait(lambda: _placement(b, model_id).get("serving") is True, 120, "serving again")
        assert _placement(b, model_id)["epoch"] > first_epoch
        assert _chat(b, model_id).status_code == 200
    finally:
        a.stop()
        if b is not None:
            b.stop()


def _health(node: RunningNode) -> dict[str, Any]:
    answer: dict[str, Any] = httpx.get(node.api_url + "/health", timeout=10).json()
    return answer


def test_a_busy_port_is_refused_before_any_slow_work(tmp_path: Path) -> None:
    """The busy-port error came only after ~6 s of engine probing and timing."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        env = {"SHAREDLLM_CACHE_DIR": str(_cache_without_speed(tmp_path))}
        done = up_that_stops(tmp_path / "data", "--api-port", str(port), env=env)
    assert done.returncode != 0
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr
    assert "Traceback" not in done.stderr
    assert "engine" not in done.stderr.lower()  # it found, probed and timed no engine
