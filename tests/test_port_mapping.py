"""UPnP port mapping: which gateway answers are usable, and a network without a gateway (a
namespace of our own, so the discovery's multicast stays inside it) costs a few seconds and
changes nothing."""

from __future__ import annotations

import sys
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sharedllm.mesh.transport.port_mapping import usable_external_ip

from .netns import namespaces_unavailable, run, tag


@pytest.mark.parametrize(
    ("answer", "usable"),
    [
        ("8.8.4.4", "8.8.4.4"),
        ("2001:4860::8844", "2001:4860::8844"),
        ("192.168.1.1", None),  # another NAT upstream
        ("100.64.0.1", None),  # carrier-grade NAT
        ("127.0.0.1", None),
        ("0.0.0.0", None),
        ("", None),
        (None, None),
        ("not an address", None),
        ("8.8.4.4\x00", None),
    ],
)
def test_only_a_public_gateway_address_is_advertised(
    answer: str | None, usable: str | None
) -> None:
    assert usable_external_ip(answer) == usable


@given(st.text(max_size=64))
def test_any_gateway_answer_is_judged_without_error(answer: str) -> None:
    found = usable_external_ip(answer)
    assert found is None or found == found.strip()


_NO_GATEWAY = """
import trio, time
from sharedllm.mesh.transport.port_mapping import mapped_ports
async def main():
    started = time.monotonic()
    async with mapped_ports([9338, 9339]) as mapping:
        print(mapping, round(time.monotonic() - started, 1))
trio.run(main)
"""


def test_without_a_gateway_nothing_is_mapped_and_it_ends_soon() -> None:
    why_not = namespaces_unavailable()
    if why_not is not None:
        pytest.skip(f"namespace test skipped: {why_not}")
    namespace = f"sllupnp{tag()}"
    run("ip", "netns", "add", namespace)
    try:
        run("ip", "netns", "exec", namespace, "ip", "link", "set", "lo", "up")
        link = ("ip", "netns", "exec", namespace, "ip", "link")
        run(*link, "add", "e0", "type", "veth", "peer", "name", "e1")
        run(*link, "set", "e1", "up")
        run("ip", "netns", "exec", namespace, "ip", "addr", "add", "10.77.0.2/24", "dev", "e0")
        run("ip", "netns", "exec", namespace, "ip", "link", "set", "e0", "up")
        run("ip", "netns", "exec", namespace, "ip", "route", "add", "224.0.0.0/4", "dev", "e0")
        started = time.monotonic()
        done = run("ip", "netns", "exec", namespace, sys.executable, "-c", _NO_GATEWAY)
        mapping, seconds = done.stdout.split()
        assert mapping == "None", done.stderr
        assert time.monotonic() - started < 30
        print(f"\nno gateway: {seconds} s")
    finally:
        run("ip", "netns", "del", namespace, check=False)
