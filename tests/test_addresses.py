"""Which addresses a node advertises and in which order it dials a peer's (pure), and the race
between attempts (happy eyeballs) under trio's virtual clock."""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st
from sharedllm.mesh.addresses import (
    MAX_ADVERTISED,
    LocalInterface,
    advertised_hosts,
    beyond_this_machine,
    dial_order,
    only_this_machine,
    order_multiaddrs,
)
from sharedllm.mesh.transport.happy_eyeballs import first_to_connect
from sharedllm.mesh.transport.seam import TransportError

# A laptop: loopback, docker's bridge (sorts first as a string), a LAN and a VPN.
LAPTOP = [
    LocalInterface("lo", "127.0.0.1", 8),
    LocalInterface("docker0", "172.17.0.1", 16),
    LocalInterface("wlan0", "192.168.1.20", 24),
    LocalInterface("tailscale0", "100.101.102.103", 32),
    LocalInterface("wlan0", "fe80::1", 64),
    LocalInterface("wlan0", "2001:db8::20", 64),
]


def test_a_wildcard_advertises_the_lan_first_and_bridges_and_loopback_last() -> None:
    assert advertised_hosts("0.0.0.0", LAPTOP) == [
        "192.168.1.20",
        "100.101.102.103",
        "172.17.0.1",
        "127.0.0.1",
    ]
    assert advertised_hosts("::", LAPTOP) == ["2001:db8::20"]  # no link-local: it needs a zone
    assert advertised_hosts("10.1.2.3", LAPTOP) == ["10.1.2.3"]  # one address: itself
    assert advertised_hosts("0.0.0.0", []) == ["0.0.0.0"]


def test_a_peer_s_addresses_are_tried_same_subnet_first_and_our_own_last() -> None:
    peer = ["172.17.0.1", "10.9.9.9", "192.168.1.30", "127.0.0.1"]  # another laptop's
    assert dial_order(peer, LAPTOP) == ["192.168.1.30", "10.9.9.9", "172.17.0.1", "127.0.0.1"]
    assert dial_order(peer, LAPTOP, remembered="10.9.9.9")[0] == "10.9.9.9"
    assert dial_order(["127.0.0.1"], LAPTOP) == ["127.0.0.1"]  # a peer on this machine
    assert dial_order(["not an ip", "192.168.1.9"], LAPTOP) == ["192.168.1.9", "not an ip"]


def test_multiaddrs_are_ordered_by_their_hosts() -> None:
    peer = [
        "/ip4/172.17.0.1/tcp/9338/p2p/Q",
        "/dns4/example.invalid/tcp/9338/p2p/Q",
        "/ip4/192.168.1.30/tcp/9338/p2p/Q",
    ]
    assert order_multiaddrs(peer, LAPTOP) == [peer[2], peer[0], peer[1]]


def test_an_invite_of_loopback_addresses_only_works_here() -> None:
    assert only_this_machine(["127.0.0.1", "::1"])
    assert not only_this_machine(["127.0.0.1", "192.168.1.20"])
    assert not only_this_machine(["example.invalid"])
    assert not only_this_machine([])


_ipv4 = st.ip_addresses(v=4).map(str)
_interfaces = st.lists(
    st.builds(
        LocalInterface,
        st.sampled_from(["lo", "eth0", "docker0", "wg0", "br-1", "wlan0"]),
        _ipv4,
        st.integers(8, 32),
    ),
    max_size=12,
)


@given(_interfaces)
def test_advertised_hosts_are_bounded_unique_and_of_the_machine(
    interfaces: list[LocalInterface],
) -> None:
    hosts = advertised_hosts("0.0.0.0", interfaces)
    assert 1 <= len(hosts) <= MAX_ADVERTISED and len(set(hosts)) == len(hosts)
    known = {i.address for i in interfaces}
    assert hosts == ["0.0.0.0"] or set(hosts) <= known
    loopback = [ipaddress.ip_address(h).is_loopback for h in hosts if h != "0.0.0.0"]
    assert loopback == sorted(loopback)  # loopback ones after every other


@given(st.lists(_ipv4, max_size=12), _interfaces, st.none() | _ipv4)
def test_dial_order_is_a_permutation_with_the_remembered_first(
    candidates: list[str], interfaces: list[LocalInterface], remembered: str | None
) -> None:
    order = dial_order(candidates, interfaces, remembered)
    assert sorted(order) == sorted(set(candidates))
    if remembered in candidates:
        assert order[0] == remembered


class _Connection:
    def __init__(self, name: str) -> None:
        self.name, self.closed = name, False

    async def aclose(self) -> None:
        self.closed = True


def _attempts(
    delays: dict[str, float | None], opened: list[str]
) -> Callable[[str], Awaitable[_Connection]]:
    """Attempts that succeed after their delay, or fail at once (None)."""

    async def attempt(name: str) -> _Connection:
        delay = delays[name]
        opened.append(name)
        if delay is None:  # refused at once
            raise TransportError(f"{name} refused")
        await trio.sleep(delay)
        return _Connection(name)

    return attempt


async def test_an_address_that_reaches_nothing_costs_the_stagger_not_a_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    opened: list[str] = []
    attempt = _attempts({"decoy": 120.0, "lan": 0.01, "late": 0.01}, opened)
    started = trio.current_time()
    winner, connection = await first_to_connect(["decoy", "lan", "late"], attempt, 0.25)
    assert winner == "lan" and connection.name == "lan" and not connection.closed
    assert trio.current_time() - started == pytest.approx(0.26)
    assert opened == ["decoy", "lan"]  # the third never started


async def test_attempts_that_succeed_too_late_are_closed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    made: list[_Connection] = []

    async def attempt(name: str) -> _Connection:
        await trio.sleep(1.0 if name == "first" else 0.75)  # both end at t = 1.0
        made.append(_Connection(name))
        return made[-1]

    winner, connection = await first_to_connect(["first", "second"], attempt, 0.25)
    assert [c.closed for c in made if c is not connection] == [True] * (len(made) - 1)
    assert not connection.closed and winner == connection.name


async def test_a_refusal_starts_the_next_attempt_at_once_and_all_failing_says_why(
    autojump_clock: trio.testing.MockClock,
) -> None:
    opened: list[str] = []
    attempt = _attempts({"a": None, "b": None}, opened)
    started = trio.current_time()
    with pytest.raises(TransportError, match="a refused; b refused"):
        await first_to_connect(["a", "b"], attempt, 0.25)
    assert trio.current_time() == started  # no stagger waited after a refusal
    with pytest.raises(TransportError, match="no address"):
        await first_to_connect([], attempt, 0.25)


def test_a_peer_elsewhere_is_never_raced_at_this_machine_s_own_addresses() -> None:
    """Racing a peer's loopback address (or one of ours) dials ourselves; such addresses are
    dialed only when the peer has no other (all nodes on one machine)."""
    peer = "/p2p/12D3KooWpeer"
    elsewhere = [f"/ip4/192.168.1.30/tcp/9338{peer}", f"/ip4/10.9.0.1/tcp/9338{peer}"]
    here = [f"/ip4/127.0.0.1/tcp/9338{peer}", f"/ip4/192.168.1.20/tcp/9338{peer}"]
    assert beyond_this_machine([*elsewhere, *here], LAPTOP) == elsewhere
    assert beyond_this_machine(here, LAPTOP) == here
    relayed = f"/ip4/198.51.100.7/tcp/9338/p2p/12D3KooWrelay/p2p-circuit{peer}"
    assert beyond_this_machine([here[0], relayed], LAPTOP) == [relayed]


@given(st.lists(st.sampled_from(["127.0.0.1", "192.168.1.20", "10.1.1.1", "8.8.8.8"]), max_size=6))
def test_there_is_always_something_to_dial_when_there_was(hosts: list[str]) -> None:
    addresses = [f"/ip4/{h}/tcp/1/p2p/x" for h in hosts]
    kept = beyond_this_machine(addresses, LAPTOP)
    assert bool(kept) == bool(addresses) and set(kept) <= set(addresses)
