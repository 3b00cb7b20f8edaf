"""The real Gemma model split over three `sharedllm-node` processes on 127.0.0.1.

Memory caps leave the planner one choice: six layers on each node. The founder holds the file and
leads; the two others join without a model file and lend memory. Clients talk to a node that is
not the primary.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil
import pytest
import trio
from sharedllm.mesh.identity import load_or_create_identity
from sharedllm.mesh.membership_state import MembershipState
from sharedllm.mesh.mesh_store import load_mesh
from sharedllm.mesh.transport.data_plane import DataPlane
from sharedllm.mesh.transport.tunnel import TUNNEL, TunnelRefused, TunnelRequest, open_tunnel
from sharedllm.node.engine.locate import EngineInfo

from .node_process import RunningNode, node_command, start_node, wait_until_ready

pytestmark = pytest.mark.integration
GEMMA_ID = "gemma-3-270m-q4_k_m"
PROMPT = "The three primary colours are"
# Memory caps (see the planner's cost model: 256 MiB of buffers per node, 5 % headroom, the
# 170 MiB embedding table on the primary, ~7.8 MiB per layer with its 4096-token KV cache).
FOUNDER_CAP, WORKER_CAP = "500MiB", "320MiB"


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [node_command(), *args], capture_output=True, text=True, timeout=60, check=False
    )


def _greedy(base_url: str, stream: bool = False) -> str:
    client = openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0)
    if not stream:
        answer = client.completions.create(
            model=GEMMA_ID, prompt=PROMPT, max_tokens=16, temperature=0, seed=7
        )
        return answer.choices[0].text
    pieces = client.completions.create(
        model=GEMMA_ID, prompt=PROMPT, max_tokens=16, temperature=0, seed=7, stream=True
    )
    return "".join(piece.choices[0].text for piece in pieces if piece.choices)


@pytest.fixture(scope="module")
def single_answer(tmp_path_factory: pytest.TempPathFactory, engine: EngineInfo) -> str:
    node = start_node(tmp_path_factory.mktemp("alone"))
    try:
        return _greedy(node.api_url)
    finally:
        node.stop()


@pytest.fixture(scope="module")
def mesh(
    tmp_path_factory: pytest.TempPathFactory, engine: EngineInfo, gemma_path: Path
) -> Iterator[list[RunningNode]]:
    base = tmp_path_factory.mktemp("split")
    nodes: list[RunningNode] = []
    try:
        founder = start_node(
            base / "a", "--name", "a", "--max-memory", FOUNDER_CAP, wait_ready=False
        )
        nodes.append(founder)
        wait_until_ready(founder, 180, serving=False)  # alone it cannot hold the model
        done = _cli("invite", "--data-dir", str(base / "a" / "data"), "--uses", "2")
        assert done.returncode == 0, done.stderr
        token = done.stdout.strip()
        for name in ("b", "c"):
            nodes.append(
                start_node(
                    base / name,
                    *("--name", name, "--join", token, "--max-memory", WORKER_CAP),
                    wait_ready=False,
                )
            )
        for node in nodes:
            wait_until_ready(node, 180)
        yield nodes
    finally:
        for node in nodes:
            node.stop()


def _status(node: RunningNode) -> dict[str, Any]:
    done = _cli("status", "--json", "--data-dir", str(node.log_path.parent / "data"))
    assert done.returncode == 0, done.stderr
    answer: dict[str, Any] = json.loads(done.stdout)
    return answer


def test_the_planner_uses_all_three_nodes(mesh: list[RunningNode]) -> None:
    views = [_status(node) for node in mesh]
    ids = [view["peer_id"] for view in views]
    placements = [view["models"][GEMMA_ID] for view in views]
    assert all(p["primary"] == ids[0] and p["serving"] for p in placements)
    assert all(p["epoch"] == placements[0]["epoch"] for p in placements)
    layers = [(a["node"], a["first_layer"], a["last_layer"]) for a in placements[0]["assignments"]]
    assert layers[0] == (ids[0], 0, 5)
    assert {node for node, _, _ in layers[1:]} == set(ids[1:])  # workers in the planner's order
    assert [(first, last) for _, first, last in layers[1:]] == [(6, 11), (12, 17)]


def test_openai_client_through_a_node_that_is_not_the_primary(
    mesh: list[RunningNode], single_answer: str
) -> None:
    client = openai.OpenAI(base_url=mesh[2].api_url + "/v1", api_key="unused", max_retries=0)
    chat = client.chat.completions.create(
        model=GEMMA_ID, messages=[{"role": "user", "content": "Say hello."}], max_tokens=12
    )
    assert chat.choices[0].message.content
    pieces = client.chat.completions.create(
        model=GEMMA_ID,
        messages=[{"role": "user", "content": "Count to five."}],
        max_tokens=12,
        stream=True,
    )
    deltas = [p.choices[0].delta.content for p in pieces if p.choices and p.choices[0].delta]
    assert len([d for d in deltas if d]) > 3, "the answer should arrive in several pieces"
    # Greedy decoding over the split gives the single node's answer: every device is a CPU
    # backend running the same kernels, and each layer's arithmetic is the same wherever it runs.
    assert _greedy(mesh[2].api_url) == single_answer
    assert _greedy(mesh[1].api_url, stream=True) == single_answer


def test_workers_log_their_layers_and_carried_the_weights(mesh: list[RunningNode]) -> None:
    ids = [_status(node)["peer_id"] for node in mesh]
    assignments = _status(mesh[0])["models"][GEMMA_ID]["assignments"]
    held = {a["node"]: (a["first_layer"], a["last_layer"]) for a in assignments}
    for node, peer_id in zip(mesh[1:], ids[1:], strict=True):
        first, last = held[peer_id]
        assert re.search(
            rf"model {GEMMA_ID}: holding layers {first}-{last} for primary {ids[0]}", node.log()
        )
    assert "layers as planned" in mesh[0].log()
    tunnels = _status(mesh[0])["models"][GEMMA_ID]["tunnels"]
    for worker in ids[1:]:
        # six layers of ~3.6 MiB each went up the tunnel when the primary loaded the model
        assert tunnels[worker]["bytes_out"] > 6 * 3 * 2**20
        assert tunnels[worker]["round_trips"] > 0
        requests = tunnels[worker]["requests"]  # the engine's RPC requests, by command
        assert requests["HELLO"]["requests"] >= 1
        assert (
            requests["SET_TENSOR"]["bytes"] + requests.get("SET_TENSOR_HASH", {}).get("bytes", 0)
            <= tunnels[worker]["bytes_out"]
        )
        assert "GRAPH_COMPUTE" in requests  # it has answered requests with this worker
    for node in mesh[1:]:  # and each worker counted the same tunnels from its side
        served = httpx.get(node.api_url + "/mesh/peers", timeout=5).json()["tunnels_served"]
        assert served[ids[0]]["bytes_out"] > 6 * 3 * 2**20  # "out" as the primary sent it


def test_engines_listen_on_loopback_only(mesh: list[RunningNode]) -> None:
    engines = 0
    for node in mesh:
        for pid in node.engine_pids():
            engines += 1
            for conn in psutil.Process(pid).net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN:
                    assert conn.laddr.ip == "127.0.0.1", (pid, conn)
    assert engines == 3  # one llama-server, two rpc-servers


def test_a_member_that_is_not_the_primary_cannot_open_a_tunnel(mesh: list[RunningNode]) -> None:
    """Acting as node b (a member, not the primary) towards node c's rpc-server."""
    b_data = mesh[1].log_path.parent / "data"
    identity = load_or_create_identity(b_data)
    files = load_mesh(b_data)
    c_view = httpx.get(mesh[2].api_url + "/mesh/peers", timeout=5).json()
    c_self = next(p for p in c_view["peers"] if p["peer_id"] == c_view["peer_id"])
    host, port = c_self["data_addrs"][0]
    epoch = c_view["models"][GEMMA_ID]["epoch"]
    plane = DataPlane(identity, files.proof, MembershipState(files.mesh_public_key).admit_encoded)

    async def attempt() -> str:
        async def opener() -> Any:
            return await plane.open_stream(c_view["peer_id"], host, port, TUNNEL)

        try:
            opened = await open_tunnel(opener, TunnelRequest("rpc", GEMMA_ID, epoch))
        except TunnelRefused as err:
            return str(err)
        await opened.stream.aclose()
        return "accepted"

    started = time.monotonic()
    assert "is not the primary" in trio.run(attempt)
    assert time.monotonic() - started < 30


def _answer_to(address: tuple[str, int], request: bytes) -> bytes:
    """What a local process that is not the engine gets back for `request` (b"": closed)."""
    with socket.create_connection(address, timeout=5) as sock:
        sock.sendall(request)
        received = b""
        with contextlib.suppress(TimeoutError, ConnectionError):
            while chunk := sock.recv(4096):
                received += chunk
        return received


def test_local_processes_cannot_use_the_tunnels(mesh: list[RunningNode]) -> None:
    """Any local process could reach the workers' rpc-servers through the primary's tunnel
    listeners (HELLO answered), and the primary's llama-server through another node's API
    tunnel or on its own loopback port (no API key asked)."""
    hello = bytes([14]) + (24).to_bytes(8, "little") + bytes(24)  # RPC_CMD_HELLO
    llama = next(psutil.Process(pid) for pid in mesh[0].engine_pids())
    rpc = llama.cmdline()[llama.cmdline().index("--rpc") + 1].split(",")
    assert len(rpc) == 2
    for endpoint in rpc:
        host, _, port = endpoint.rpartition(":")
        assert _answer_to((host, int(port)), hello) == b""
    # (an rpc-server serves one connection at a time, so silence alone proves nothing)
    assert mesh[0].log().count("refused 1 local connections not opened by its engine") == 2
    assert _greedy(mesh[1].api_url)  # a request through node b opens b's API tunnel
    api_port = int(mesh[1].api_url.rsplit(":", 1)[1])
    listening = {
        conn.laddr.port
        for conn in psutil.Process(mesh[1].process.pid).net_connections(kind="tcp")
        if conn.status == psutil.CONN_LISTEN and conn.laddr.ip == "127.0.0.1"
    }
    request = b"GET /slots HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    for other in sorted(listening - {api_port}):
        assert not _answer_to(("127.0.0.1", other), request).startswith(b"HTTP/"), other
    assert _greedy(mesh[1].api_url)  # the node itself still serves
    # the primary's llama-server has no TCP port: a Unix socket in a directory of this user's
    listens = [c for c in llama.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
    assert listens == []
    engine_socket = Path(llama.cmdline()[llama.cmdline().index("--host") + 1])
    assert engine_socket.is_socket() and engine_socket.parent.stat().st_mode & 0o777 == 0o700


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


def _browser(*args: str) -> subprocess.CompletedProcess[str]:
    """Headless chromium; `--virtual-time-budget` lets the page's script fetch and draw."""
    assert CHROMIUM is not None
    argv = [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run"]
    argv += ["--enable-logging=stderr", "--v=0", "--virtual-time-budget=6000", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)


def _mesh_view(node: RunningNode) -> dict[str, Any]:
    view: dict[str, Any] = httpx.get(node.api_url + "/mesh/peers", timeout=10).json()
    return view


def test_the_status_page_shows_the_mesh_in_a_real_browser(mesh: list[RunningNode]) -> None:
    if CHROMIUM is None:
        pytest.skip("chromium is not installed here (.ci/run installs it with apt)")
    page = mesh[1].api_url + "/"  # a worker's page: it sees the whole mesh too
    deadline = time.monotonic() + 60
    while sum(p["state"] in ("alive", "self") for p in _mesh_view(mesh[1])["peers"]) < 3:
        assert time.monotonic() < deadline, "the worker does not see three live members"
        time.sleep(1)
    rendered = _browser("--dump-dom", page)
    assert rendered.returncode == 0, rendered.stderr[-2000:]
    console = [line for line in rendered.stderr.splitlines() if ":CONSOLE" in line]
    assert not console, console
    dom = rendered.stdout
    assert dom.count('class="peer"') == 3 and dom.count('class="node"') == 3
    for name in ("a", "b", "c"):
        assert f">{name}: layers " in dom  # each node's part of the placement bar
        assert f'class="node-name">{name} (' in dom
    assert 'class="link"' in dom  # links from the gossiped measurements
    assert dom.count('class="replica"') == 1 and 'class="demand">demand: ' in dom
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "status-page.png"
    shot.unlink(missing_ok=True)
    taken = _browser("--window-size=1100,1200", f"--screenshot={shot}", page)
    assert taken.returncode == 0 and shot.stat().st_size > 10_000, taken.stderr[-2000:]
    print(f"\nstatus page screenshot: {shot}")


def test_losing_a_worker_is_answered_with_a_clear_503(mesh: list[RunningNode]) -> None:
    """Runs last: kills a worker. The two left cannot hold the model under their caps, so every
    node must say so quickly (503, Retry-After, a reason), never hang."""
    lost = mesh[2]
    lost.process.kill()
    lost.process.wait()
    started = time.monotonic()
    reasons: set[str] = set()
    while time.monotonic() - started < 40:
        for node in mesh[:2]:
            answer = httpx.post(
                node.api_url + "/v1/completions",
                json={"model": GEMMA_ID, "prompt": "Hi", "max_tokens": 4},
                timeout=30,
            )
            if answer.status_code == 503:
                assert answer.headers.get("retry-after")
                reasons.add(answer.json()["error"]["message"])
        if any("GiB" in reason for reason in reasons):
            break
        time.sleep(0.5)
    print(f"reasons seen within {time.monotonic() - started:.1f} s: {sorted(reasons)}")
    assert any("GiB" in reason for reason in reasons), reasons
    engines = [pid for node in mesh[:2] for pid in node.engine_pids()]
    assert _eventually_no_llama_server(mesh[0]), engines


def _eventually_no_llama_server(primary: RunningNode) -> bool:
    """The withdrawn placement's engine is stopped."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        names = [
            psutil.Process(pid).name() for pid in primary.engine_pids() if psutil.pid_exists(pid)
        ]
        if not any("llama-server" in name for name in names):
            return True
        time.sleep(0.5)
    return False
