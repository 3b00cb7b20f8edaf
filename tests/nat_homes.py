"""Two homes behind NAT routers and one public host, all in network namespaces of our own:

    public (203.0.113.10) ──┐
    router1 wan .1 ─────────┼── "internet" bridge 203.0.113.0/24
    router2 wan .2 ─────────┘
    router1 lan 192.168.71.1 ── home1 192.168.71.10 (default route via its router)
    router2 lan 192.168.72.1 ── home2 192.168.72.10

Each router masquerades its home behind its wan address (nftables), forwards nothing in that
was not asked for from inside and drops (never refuses) what comes unasked to its own address,
as home routers do; routers have no route to the other home, so a dial from
one home to the other's private address fails at once. The addresses are documentation and
private ranges, used only inside these namespaces.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sharedllm.node.engine.locate import free_loopback_port

from .netns import Host, run, tag

INTERNET = "203.0.113"
_NAT = """
table ip sllnat {
  chain postrouting {
    type nat hook postrouting priority 100; policy accept;
    oifname "wan0" masquerade%s
  }
  chain input {
    type filter hook input priority 0; policy accept;
    iifname "wan0" ct state new drop
  }
  chain forward {
    type filter hook forward priority 0; policy drop;
    ct state established,related accept
    iifname "lan0" oifname "wan0" accept
  }
}
"""


def _veth(one: str, one_end: str, two: str, two_end: str) -> None:
    """A veth pair with `one_end` in namespace `one` and `two_end` in `two`."""
    run("ip", "link", "add", f"t{tag()}a", "type", "veth", "peer", "name", f"t{tag()}b")
    run("ip", "link", "set", f"t{tag()}a", "netns", one)
    run("ip", "link", "set", f"t{tag()}b", "netns", two)
    run("ip", "-n", one, "link", "set", f"t{tag()}a", "name", one_end)
    run("ip", "-n", two, "link", "set", f"t{tag()}b", "name", two_end)


def _up(namespace: str, device: str, address: str) -> None:
    run("ip", "-n", namespace, "addr", "add", address, "dev", device)
    run("ip", "-n", namespace, "link", "set", device, "up")


@contextmanager
def nat_homes(base: Path, symmetric: bool = False) -> Iterator[tuple[Host, Host, Host]]:
    """(the public host, the host in home 1, the host in home 2); all removed afterwards. A
    `symmetric` NAT maps every connection to a random port, so hole punching cannot work."""
    internet, routers = f"sllnet{tag()}", [f"sllr{i}{tag()}" for i in (1, 2)]
    public = Host(f"sllpub{tag()}", "eth0", f"{INTERNET}.10", base / "public", free_loopback_port())
    homes = [
        Host(
            f"sllhome{i}{tag()}",
            "eth0",
            f"192.168.7{i}.10",
            base / f"home{i}",
            free_loopback_port(),
        )
        for i in (1, 2)
    ]
    namespaces = [internet, *routers, public.namespace, *(h.namespace for h in homes)]
    try:
        for namespace in namespaces:
            run("ip", "netns", "add", namespace)
            run("ip", "-n", namespace, "link", "set", "lo", "up")
        run("ip", "-n", internet, "link", "add", "br0", "type", "bridge")
        run("ip", "-n", internet, "link", "set", "br0", "up")
        for index, (namespace, address) in enumerate(
            [
                (public.namespace, public.address),
                *((r, f"{INTERNET}.{i}") for i, r in enumerate(routers, 1)),
            ]
        ):
            device = "eth0" if namespace == public.namespace else "wan0"
            _veth(namespace, device, internet, f"port{index}")
            run("ip", "-n", internet, "link", "set", f"port{index}", "master", "br0", "up")
            _up(namespace, device, f"{address}/24")
        for index, (router, home) in enumerate(zip(routers, homes, strict=True), 1):
            _veth(router, "lan0", home.namespace, "eth0")
            _up(router, "lan0", f"192.168.7{index}.1/24")
            _up(home.namespace, "eth0", f"{home.address}/24")
            run("ip", "-n", home.namespace, "route", "add", "default", "via", f"192.168.7{index}.1")
            run("ip", "netns", "exec", router, "sysctl", "-qw", "net.ipv4.ip_forward=1")
            rules = base / f"nat{index}.nft"
            rules.write_text(_NAT % (" random,fully-random" if symmetric else ""))
            run("ip", "netns", "exec", router, "nft", "-f", str(rules))
        for host in (public, *homes):
            host.base.mkdir(parents=True, exist_ok=True)
        yield public, homes[0], homes[1]
    finally:
        for host in (public, *homes):
            host.stop()
        for namespace in reversed(namespaces):
            run("ip", "netns", "del", namespace, check=False)
