"""What a node exposes: only the mesh, data-plane and API ports listen beyond loopback (the
engines never do), and an API bound beyond loopback needs a key that every request but
/health must carry."""

from __future__ import annotations

import gc
import os
import socket
import subprocess
import time
from pathlib import Path

import httpx
import multiaddr
import psutil
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st
from sharedllm.mesh.anti_entropy import GOSSIP
from sharedllm.mesh.gossip import Digest, Exchange, SignedState, next_version
from sharedllm.mesh.identity import NodeIdentity
from sharedllm.mesh.mesh_store import load_addresses
from sharedllm.mesh.records import signing_bytes
from sharedllm.mesh.transport.framing import receive_frame, send_frame
from sharedllm.mesh.transport.libp2p_adapter import (
    check_port_free,
    inbound_slot_tokens,
    open_libp2p_transport,
)
from sharedllm.mesh.transport.seam import TransportError
from sharedllm.node.config import load_config
from sharedllm.node.config_checks import ConfigError
from sharedllm.node.mesh_setup import prepare_mesh
from sharedllm.node.setting_values import is_loopback_host

from .member_client import hello_exchange
from .node_process import (
    RunningNode,
    invite_token,
    node_command,
    start_node,
    wait_until_ready,
)

KEY = "k" * 8 + "-test-key-0123456789"


@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.1", "example.org", "::"])
def test_an_api_beyond_loopback_needs_a_key(tmp_path: Path, host: str) -> None:
    with pytest.raises(ConfigError, match="API key"):
        load_config(data_dir=tmp_path, environ={}, overrides={"api_host": host})
    keyed = {"api_host": host, "api_key": KEY}
    config = load_config(data_dir=tmp_path, environ={}, overrides=keyed)
    assert config.api_key == KEY


def test_loopback_needs_no_key_and_short_keys_are_refused(tmp_path: Path) -> None:
    for host in ("127.0.0.1", "127.3.4.5", "::1", "localhost"):
        assert is_loopback_host(host)
        assert load_config(data_dir=tmp_path, environ={}, overrides={"api_host": host})
    with pytest.raises(ConfigError, match="at least 16"):
        load_config(data_dir=tmp_path, environ={"SHAREDLLM_API_KEY": "short"})


@pytest.mark.integration
def test_up_refuses_a_public_api_without_a_key(tmp_path: Path) -> None:
    done = subprocess.run(
        [node_command(), "up", "--data-dir", str(tmp_path), "--api-host", "0.0.0.0"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={k: v for k, v in os.environ.items() if k != "SHAREDLLM_API_KEY"},
    )
    assert done.returncode != 0
    assert "API key" in done.stderr and "Traceback" not in done.stderr


def _listeners(node: RunningNode) -> dict[int, list[tuple[str, int]]]:
    """Listening TCP sockets by process, for the node and every process it started."""
    root = psutil.Process(node.process.pid)
    found: dict[int, list[tuple[str, int]]] = {}
    for process in [root, *root.children(recursive=True)]:
        sockets = process.net_connections(kind="tcp")
        found[process.pid] = [
            (s.laddr.ip, s.laddr.port) for s in sockets if s.status == psutil.CONN_LISTEN
        ]
    return found


@pytest.mark.integration
def test_only_mesh_and_api_ports_listen_beyond_loopback_and_the_key_is_required(
    tmp_path: Path, gemma_path: Path
) -> None:
    node = start_node(
        tmp_path,
        *("--listen", "/ip4/0.0.0.0/tcp/0", "--api-host", "0.0.0.0", "--api-key", KEY),
        *("--context-size", "512"),
        timeout_s=240,
    )
    try:
        api_port = int(node.api_url.rsplit(":", 1)[1])
        listeners = _listeners(node)
        engines = set(node.engine_pids())
        assert engines, "the node runs its engine"
        for pid in engines:
            assert all(ip == "127.0.0.1" for ip, _ in listeners[pid]), listeners[pid]
        public = sorted(
            port
            for pid, sockets in listeners.items()
            for ip, port in sockets
            if not is_loopback_host(ip)
        )
        # the mesh (libp2p), the data plane beside it, and the API
        assert api_port in public and len(public) == 3, (public, listeners)
        print(f"\nlistening beyond loopback: ports {public}; engines on 127.0.0.1 only")

        models = node.api_url + "/v1/models"
        assert httpx.get(models).status_code == 401
        wrong = httpx.get(models, headers={"authorization": "Bearer not-the-key"})
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(models, headers={"authorization": f"Bearer {KEY}"}).status_code == 200
        assert httpx.get(node.api_url + "/health").status_code == 200
        assert httpx.get(node.api_url + "/metrics").status_code == 401
        status = subprocess.run(
            [node_command(), "status", "--data-dir", str(tmp_path / "data")],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env={**os.environ, "SHAREDLLM_API_KEY": KEY},
        )
        assert status.returncode == 0, status.stderr
    finally:
        node.stop()


async def test_a_hostile_member_cannot_forge_replay_or_smuggle_in_gossip(tmp_path: Path) -> None:
    """A member process (ours, on real libp2p) sends a running node forged states: one claiming
    to come from the node itself but signed by another key, a replay of the node's own state,
    and one from a stranger that proves no membership. The node keeps its own view, counts
    each kind, and keeps running."""
    node = start_node(tmp_path / "a", "--name", "a", "--no-model", wait_ready=False)
    try:
        await trio.to_thread.run_sync(lambda: wait_until_ready(node, 60, serving=False))
        token = await trio.to_thread.run_sync(invite_token, tmp_path / "a" / "data")
        plan = prepare_mesh(tmp_path / "hostile", "hostile", token, time.time())
        async with open_libp2p_transport(plan.identity, ["/ip4/127.0.0.1/tcp/0"]) as transport:
            target = await transport.connect(plan.bootstrap[0])
            # admitted: its proof came back
            assert await hello_exchange(transport, target, plan.files.proof.encode())
            gossip = await transport.open_stream(target, GOSSIP)
            await send_frame(gossip, Digest({}).encode())
            theirs = Exchange.decode(await receive_frame(gossip)).states
            own = next(s for s in theirs if s.origin == target)
            spoofed = SignedState(target, own.version + 10**9, own.payload)
            spoofed = SignedState(
                target,
                spoofed.version,
                spoofed.payload,
                plan.identity.sign(signing_bytes(SignedState.KIND, spoofed.fields())),
            )
            stranger = SignedState.publish(
                NodeIdentity.from_seed(b"\x66" * 32),
                next_version(0, time.time()),
                {"name": "stranger"},
            )
            await send_frame(gossip, Exchange((spoofed, own, stranger), (), False).encode())
            await gossip.aclose()
            await transport.disconnect(target)
        gc.collect()  # a socket libp2p left open would be reported here, in this test
        await trio.sleep(1)
        async with httpx.AsyncClient(timeout=10) as client:
            view = (await client.get(node.api_url + "/mesh/peers")).json()
        counted = view["gossiped_states"]
        assert counted["forged"] >= 1 and counted["stale"] >= 1 and counted["refused"] >= 1
        me = next(p for p in view["peers"] if p["state"] == "self")
        assert me["peer_id"] == target and me["name"] == "a"
        assert node.process.poll() is None
        print(f"\nrejected and counted: {counted}")
    finally:
        node.stop()


def test_a_flood_of_silent_connections_to_the_mesh_port_does_not_lock_members_out(
    tmp_path: Path,
) -> None:
    node = start_node(tmp_path / "a", "--name", "a", "--no-model", wait_ready=False)
    flood: list[socket.socket] = []
    joiner = None
    try:
        wait_until_ready(node, 60, serving=False)
        token = invite_token(tmp_path / "a" / "data")
        port = _mesh_port(tmp_path / "a" / "data")
        for _ in range(300):  # connections that never start the libp2p handshake
            flood.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        joiner = start_node(
            tmp_path / "b", "--name", "b", "--join", token, "--no-model", wait_ready=False
        )
        deadline = time.monotonic() + 60
        while "admitted" not in joiner.log():
            assert time.monotonic() < deadline, joiner.log()[-2000:]
            time.sleep(0.5)
        assert httpx.get(node.api_url + "/health", timeout=10).status_code in (200, 503)
        print("\n300 silent connections to the mesh port; a member still joined")
    finally:
        for connection in flood:
            connection.close()
        node.stop()
        if joiner is not None:
            joiner.stop()


def _mesh_port(data_dir: Path) -> int:
    """The libp2p port the node recorded (its addresses: /ip4/127.0.0.1/tcp/PORT/p2p/ID)."""
    address = next(a for a in load_addresses(data_dir) if a.startswith("/ip4/127.0.0.1/tcp/"))
    return int(address.split("/")[4])


@given(st.integers(1, 500), st.integers(0, 2000), st.integers(0, 2000))
def test_inbound_slots_of_closed_connections_come_back(base: int, borrowed: int, live: int) -> None:
    tokens = inbound_slot_tokens(base, borrowed, live)
    assert tokens >= base
    # free slots for new handshakes: all of `base` unless that many connections really live
    assert tokens - borrowed >= base - live


async def test_a_node_still_accepts_after_many_connections_have_come_and_gone() -> None:
    """py-libp2p keeps each inbound connection's slot until the host stops; ours returns the
    slots of closed connections, so reconnecting members never use them up."""
    ours, theirs = NodeIdentity.from_seed(b"\x07" * 32), NodeIdentity.from_seed(b"\x08" * 32)
    loopback = ["/ip4/127.0.0.1/tcp/0"]
    async with (
        open_libp2p_transport(ours, loopback) as node,
        open_libp2p_transport(theirs, loopback) as member,
    ):
        for _ in range(40):
            await member.connect(node.listen_addrs()[0])
            await member.disconnect(ours.peer_id)
        await trio.sleep(2.5)  # one round of giving slots back
        assert node.free_inbound_slots() >= 250


def test_the_port_check_passes_time_wait_but_not_a_listener() -> None:
    """A node killed with connections open could not start again on its port for up to 60 s
    ("Address already in use"): the check bound without SO_REUSEADDR."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    accepted, _ = listener.accept()
    accepted.close()  # the server side closes first: its end of the port goes to TIME_WAIT
    client.recv(1)
    client.close()
    address = multiaddr.Multiaddr(f"/ip4/127.0.0.1/tcp/{port}")
    with pytest.raises(TransportError, match="cannot listen"):
        check_port_free(address)  # while something listens there, refused
    listener.close()
    check_port_free(address)
