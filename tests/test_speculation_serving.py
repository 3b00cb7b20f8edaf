"""Speculation on a real node: with the default `speculation = "auto"` the placement starts
speculating (the planner's prior), its engine's counters are read, and the planner weighs the
drafts of a copied list by what they yielded."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from sharedllm.node.engine.locate import EngineInfo, probe_usage
from sharedllm.scheduler.speculation import DraftRate, seconds_per_token

from .node_process import RunningNode, node_command, start_node

pytestmark = pytest.mark.integration
GEMMA_ID = "gemma-3-270m-q4_k_m"
_COLOURS = ("red", "blue", "green", "yellow", "black", "white", "grey", "pink")
INVENTORY = "\n".join(f"- the {c} box holds {i * 7} marbles" for i, c in enumerate(_COLOURS))


def _model(api_url: str) -> dict[str, Any]:
    entry: dict[str, Any] = httpx.get(api_url + "/mesh/peers", timeout=10).json()["models"][
        GEMMA_ID
    ]
    return entry


def test_a_copy_is_speculated_and_its_drafts_are_learned(
    tmp_path: Path, engine: EngineInfo, gemma_path: Path
) -> None:
    node = start_node(tmp_path / "a", "--context-size", "2048", "--threads", "1")
    try:
        assert _model(node.api_url)["speculation"]["mode"] == "ngram"
        assert "--spec-type ngram-mod" in node.log_path.read_text()
        body = {
            "model": GEMMA_ID,
            "prompt": f"Inventory:\n{INVENTORY}\n\nInventory (copy):\n",
            "max_tokens": 96,
            "temperature": 0,
        }
        deadline = time.monotonic() + 90
        while not (entry := _model(node.api_url))["speculation"]["learned_tokens"]:
            assert time.monotonic() < deadline, node.log_path.read_text()[-3000:]
            httpx.post(node.api_url + "/v1/completions", json=body, timeout=120).raise_for_status()
            time.sleep(2)
        learned = entry["speculation"]
        assert learned["accepted_per_token"] >= 0.5, learned  # a copy: most drafts accepted
        assert learned["drafted_per_token"] >= learned["accepted_per_token"]
        time.sleep(6)  # the standing placement is judged again every few seconds
        entry = _model(node.api_url)
        planned, learned = entry["planned"], entry["speculation"]
        assert learned["mode"] == planned["speculation"] == "ngram"
        rate = DraftRate(learned["accepted_per_token"], learned["drafted_per_token"])
        plain = planned["predicted_plain_ms_per_token"]
        per_draft = planned["predicted_ms_per_draft"]
        predicted = seconds_per_token(plain, per_draft, "ngram", rate)
        assert planned["predicted_ms_per_token"] == pytest.approx(predicted)
        assert predicted < plain / 2
        status = subprocess.run(
            [node_command(), "status", "--data-dir", str(tmp_path / "a" / "data")],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        assert "speculation: ngram (the planner's choice: drafts accepted" in status, status
    finally:
        node.stop()


def _never_speculates(
    node: RunningNode, absent: tuple[str, ...] = ("--spec-type",), present: tuple[str, ...] = ()
) -> None:
    """The node's placement runs without speculation and allows none; `absent` flags never
    reach its engine, `present` ones do. Then it stops."""
    try:
        speculation = _model(node.api_url)["speculation"]
        assert speculation["mode"] == "off" and speculation["allowed"] == ["off"]
        log = node.log_path.read_text()
        assert not [flag for flag in absent if f" {flag} " in log]
        assert all(f" {flag} " in log for flag in present)
    finally:
        node.stop()


def test_a_holder_can_turn_speculation_off(
    tmp_path: Path, engine: EngineInfo, gemma_path: Path
) -> None:
    node = start_node(tmp_path / "a", "--context-size", "2048", "--speculation", "off")
    _never_speculates(node, present=("--fit",))  # the node's split needs no fitting


def _engine_without_ngram(directory: Path, engine: EngineInfo) -> Path:
    """The engine behind a llama-server whose usage lists neither n-gram speculation nor
    `--fit` (as an older build of a user's would)."""
    directory.mkdir()
    script = directory / "llama-server"
    script.write_text(
        "#!/bin/sh\n"
        f'if [ "$1" = --help ]; then "{engine.llama_server}" --help 2>&1 | sed -e s/ngram-mod//g'
        " -e '/^-fit,/d';"
        " exit 0; fi\n"
        f'exec "{engine.llama_server}" "$@"\n'
    )
    script.chmod(0o755)
    (directory / engine.rpc_server.name).symlink_to(engine.rpc_server)
    return directory


def test_an_engine_without_ngram_speculation_never_gets_it(
    tmp_path: Path, engine: EngineInfo, gemma_path: Path
) -> None:
    older = _engine_without_ngram(tmp_path / "engine", engine)
    assert probe_usage(older / "llama-server") == (False, False)
    assert probe_usage(engine.llama_server) == (True, True)
    node = start_node(tmp_path / "a", "--context-size", "2048", "--engine-dir", str(older))
    _never_speculates(node, absent=("--spec-type", "--fit"))
