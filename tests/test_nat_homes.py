"""Real nodes in two homes behind NAT routers and one public host (network namespaces of our
own): both homes join through the public member, which relays for them; a request asked in
one home is answered by the model in the other, over the relay or a hole-punched connection.
The test prints the path it found and the measured round trip and speed of each path.

Needs root (network namespaces, nftables); elsewhere it skips and says why.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import pytest
from sharedllm.node.engine.locate import EngineInfo

from .nat_homes import nat_homes
from .netns import GEMMA_ID, Host, namespaces_unavailable
from .node_process import node_command

pytestmark = pytest.mark.integration
LISTEN = "/ip4/0.0.0.0/tcp/9338"


def _serving_at(host: Host, primary: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    entry: dict[str, Any] = {}
    while time.monotonic() < deadline:
        entry = host.status().get("models", {}).get(GEMMA_ID, {})
        if entry.get("serving") and entry.get("primary") == primary:
            return
        time.sleep(1)
    raise AssertionError(f"not served from {primary}: {entry}\n{host.log()[-3000:]}")


def _row(host: Host, peer: str) -> dict[str, Any]:
    return next(p for p in host.get("/mesh/peers")["peers"] if p["peer_id"] == peer)


def _peer_id(host: Host) -> str:
    return str(host.get("/mesh/peers")["peer_id"])


def _speed(host: Host, tokens: int = 32) -> tuple[float, float]:
    """(seconds for a 1-token answer, tokens/s of a `tokens`-token one) asked at `host`."""
    _, first = host.complete(max_tokens=1)
    code, seconds = host.complete(max_tokens=tokens)
    assert code == 200, host.log()[-3000:]
    return first, tokens / seconds


def _path_settled(host: Host, peer: str, wanted: str, timeout_s: float) -> dict[str, Any]:
    """`host`'s row for `peer` once its path is `wanted` and its data link is measured."""
    deadline = time.monotonic() + timeout_s
    row: dict[str, Any] = {}
    while time.monotonic() < deadline:
        row = _row(host, peer)
        if row.get("path") == wanted and row.get("data_rtt_ms") is not None:
            return row
        time.sleep(1)
    raise AssertionError(f"path to {peer} is not {wanted}: {row}\n{host.log()[-3000:]}")


@pytest.mark.parametrize(
    ("symmetric", "path"), [(False, "hole-punched"), (True, "relayed")], ids=["cone", "symmetric"]
)
def test_two_homes_behind_nats_serve_each_other_through_a_public_relay_member(
    tmp_path: Path, engine: EngineInfo, gemma_path: Path, symmetric: bool, path: str
) -> None:
    """Behind NATs that keep a connection's port (most home routers), hole punching upgrades
    the relayed connection to a direct one; behind NATs that pick a random port per connection
    it cannot, and the homes keep talking through the relay."""
    why_not = namespaces_unavailable() or (None if shutil.which("nft") else "nft is missing")
    if why_not is not None:
        pytest.skip(f"real-network tests skipped: {why_not}")
    with nat_homes(tmp_path, symmetric) as (public, home1, home2):
        public.start("--name", "public", "--relay", "--no-model", listen=LISTEN)
        public.wait_running()
        token = public.invite("--uses", "2")
        home1.start("--name", "home1", "--join", token, "--model", str(gemma_path), listen=LISTEN)
        home2.start("--name", "home2", "--join", token, listen=LISTEN)
        home1.wait_running()
        home2.wait_running()
        model_home = _peer_id(home1)
        _serving_at(home2, model_home, 300)
        code, _ = home2.complete(timeout_s=120)  # asked in home 2, answered in home 1
        assert code == 200, home2.log()[-3000:] + home1.log()[-3000:]
        across = _path_settled(home2, model_home, path, 120)
        assert across["data_path"] == "carried"  # the data port is not reachable across NATs
        assert _row(home1, _peer_id(home2))["path"] == path
        public_row = _path_settled(public, model_home, "direct", 60)  # home 1 dialed out to it
        speeds = {name: _speed(host) for name, host in (("home2", home2), ("public", public))}
        speeds["home1"] = _speed(home1)
        print(
            f"\n{'symmetric' if symmetric else 'cone'} NATs: home2 -> home1 {path} via "
            f"{across['path_address']}"
        )
        print(
            f"  data round trip home2 -> home1 {across['data_rtt_ms']:.2f} ms, "
            f"{across['bandwidth_mbps']:.0f} Mbit/s; public -> home1 "
            f"{public_row['data_rtt_ms']:.2f} ms, {public_row['bandwidth_mbps']:.0f} Mbit/s"
        )
        for name, (first, rate) in speeds.items():
            print(f"  asked at {name}: 1-token answer {first * 1000:.0f} ms, {rate:.1f} tokens/s")


def test_a_split_that_must_cross_a_relayed_link_serves_and_status_warns(
    tmp_path: Path, engine: EngineInfo, gemma_path: Path
) -> None:
    """Behind symmetric NATs, with the model too big for home 1 alone and the public member
    lending no memory, the only split runs through the relay: its rpc streams are carried
    over the relayed connection, it answers, and `status` warns of the relayed link."""
    why_not = namespaces_unavailable() or (None if shutil.which("nft") else "nft is missing")
    if why_not is not None:
        pytest.skip(f"real-network tests skipped: {why_not}")
    with nat_homes(tmp_path, symmetric=True) as (public, home1, home2):
        public.start(
            "--name", "public", "--relay", "--no-model", "--max-memory", "1MiB", listen=LISTEN
        )
        public.wait_running()
        token = public.invite("--uses", "2")
        home1.start(
            "--name",
            "home1",
            "--join",
            token,
            "--model",
            str(gemma_path),
            "--max-memory",
            "500MiB",
            listen=LISTEN,
        )
        home2.start("--name", "home2", "--join", token, "--max-memory", "320MiB", listen=LISTEN)
        home1.wait_running()
        home2.wait_running()
        model_home, worker = _peer_id(home1), _peer_id(home2)
        deadline = time.monotonic() + 400
        entry: dict[str, Any] = {}
        while time.monotonic() < deadline:
            entry = home1.status().get("models", {}).get(GEMMA_ID, {})
            if entry.get("serving") and entry.get("relayed_links"):
                break
            time.sleep(2)
        assert entry.get("relayed_links") == [[model_home, worker]], (
            f"{entry}\n{home1.log()[-3000:]}\n{home2.log()[-3000:]}"
        )
        first, rate = _speed(home1)
        text = home1.run(node_command(), "status", "--data-dir", str(home1.base / "data")).stdout
        assert "warning: layers cross a relayed link, home1 -> home2" in text
        print(
            f"\nsplit home1 -> home2 through the relay: 1-token answer {first * 1000:.0f} ms, "
            f"{rate:.1f} tokens/s"
        )
