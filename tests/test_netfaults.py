"""Real nodes on a real (virtual) network: two network namespaces joined by a veth pair, with
`tc netem` adding latency and loss and the link cut and restored. The mesh keeps serving, or
answers 503 cleanly, and serves again once the link is back.

Needs root (network namespaces); without the privilege the tests skip and say so.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sharedllm.node.engine.locate import EngineInfo, free_loopback_port

from .netns import GEMMA_ID, Host, namespaces_unavailable, run

pytestmark = pytest.mark.integration
SUBNET = "10.197.3"  # addresses inside our own namespaces only


@pytest.fixture
def hosts(tmp_path: Path, engine: EngineInfo, gemma_path: Path) -> Iterator[tuple[Host, Host]]:
    why_not = namespaces_unavailable()
    if why_not is not None:
        pytest.skip(f"network fault tests skipped: {why_not}")
    tag = str(os.getpid())[-6:]
    a = Host(f"slla{tag}", f"vslla{tag}", f"{SUBNET}.1", tmp_path / "a", free_loopback_port())
    b = Host(f"sllb{tag}", f"vsllb{tag}", f"{SUBNET}.2", tmp_path / "b", free_loopback_port())
    try:
        for host in (a, b):
            host.base.mkdir()
            run("ip", "netns", "add", host.namespace)
            host.run("ip", "link", "set", "lo", "up")
        run("ip", "link", "add", a.device, "type", "veth", "peer", "name", b.device)
        for host in (a, b):
            run("ip", "link", "set", host.device, "netns", host.namespace)
            host.run("ip", "addr", "add", f"{host.address}/24", "dev", host.device)
            host.run("ip", "link", "set", host.device, "up")
        yield a, b
    finally:
        for host in (a, b):
            host.stop()
            run("ip", "netns", "del", host.namespace, check=False)


def _netem(hosts: tuple[Host, Host], *spec: str) -> None:
    for host in hosts:
        host.run("tc", "qdisc", "replace", "dev", host.device, "root", "netem", *spec)


def _serving_on_both(a: Host, timeout_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        placement: dict[str, Any] = a.status().get("models", {}).get(GEMMA_ID, {})
        workers = {x["node"] for x in placement.get("assignments", ())} - {placement.get("primary")}
        if placement.get("serving") and workers:  # layers on b, through the link
            return placement
        time.sleep(1)
    raise AssertionError(f"not serving over both hosts:\n{a.log()[-3000:]}")


def _netem_missing(host: Host) -> str | None:
    tried = host.run("tc", "qdisc", "replace", "dev", host.device, "root", "netem", check=False)
    if tried.returncode != 0:
        return f"tc netem is not available in this kernel: {tried.stderr.strip()}"
    host.run("tc", "qdisc", "del", "dev", host.device, "root", check=False)
    return None


def _start_pair(a: Host, b: Host) -> None:
    """a holds Gemma with too little memory for it alone; b joins without a file and lends
    memory: the placement needs the link between them."""
    a.start("--name", "a", "--max-memory", "500MiB")
    a.wait_running()
    token = a.invite()
    b.start("--name", "b", "--join", token, "--no-model")
    _serving_on_both(a, 300)


def test_the_mesh_serves_through_latency_and_loss(hosts: tuple[Host, Host]) -> None:
    a, b = hosts
    why_not = _netem_missing(a)
    if why_not is not None:
        pytest.skip(f"latency and loss cases skipped: {why_not}")
    _netem(hosts, "delay", "25ms")  # 50 ms round trips from the start
    _start_pair(a, b)
    for label, spec in (
        ("50 ms RTT", ("delay", "25ms")),
        ("200 ms RTT", ("delay", "100ms")),
        ("50 ms RTT, 5% loss", ("delay", "25ms", "loss", "5%")),
    ):
        _netem(hosts, *spec)
        code, seconds = a.complete()
        print(f"\n{label}: completion {code} in {seconds:.2f} s")
        assert code == 200, (label, code, a.log()[-3000:])


def test_a_cut_link_gives_clean_errors_and_serving_resumes_when_it_heals(
    hosts: tuple[Host, Host],
) -> None:
    a, b = hosts
    _start_pair(a, b)
    code, seconds = a.complete()
    assert code == 200
    a.run("ip", "link", "set", a.device, "down")  # the cut
    cut_code, cut_seconds = a.complete(timeout_s=60)
    assert cut_code in (200, 503), cut_code  # served (before detection) or a clean 503
    time.sleep(15)  # the worker is declared dead meanwhile
    during_code, _ = a.complete(timeout_s=60)
    assert during_code == 503, during_code  # nothing can hold the model without b
    a.run("ip", "link", "set", a.device, "up")
    healed = time.monotonic()
    while a.complete(timeout_s=60)[0] != 200:
        assert time.monotonic() - healed < 180, a.log()[-3000:]
        time.sleep(2)
    recovered = time.monotonic() - healed
    _serving_on_both(a, 60)
    print(f"\nbefore the cut: completion in {seconds:.2f} s")
    print(f"link cut: a request was answered {cut_code} after {cut_seconds:.1f} s; later ones 503")
    print(f"after the link came back: serving over both hosts again in {recovered:.1f} s")
