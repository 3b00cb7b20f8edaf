"""The planner's view of the mesh: what each node offers and what each link costs.

Plain immutable data, built from gossip in the running mesh and from a JSON file in the `plan`
preview. A missing link means the two nodes cannot reach each other.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

GIB = 1024**3


@dataclass(frozen=True)
class NodeCapacity:
    """One node as the planner sees it.

    Layers live in one memory pool per node: VRAM when the node has any (it is much faster), else
    RAM; `gflops` is the measured speed of that pool's device. `memory_cap_bytes` is the user's
    limit (`--max-memory`). `models` are the ids of model files the node holds locally.
    """

    peer_id: str
    ram_bytes: int
    vram_bytes: int = 0
    gflops: float = 100.0
    rpc_protocol: str = "7.0.0"
    models: frozenset[str] = frozenset()
    memory_cap_bytes: int | None = None

    @property
    def usable_bytes(self) -> int:
        pool = self.vram_bytes if self.vram_bytes > 0 else self.ram_bytes
        return pool if self.memory_cap_bytes is None else min(pool, self.memory_cap_bytes)

    @property
    def total_memory_bytes(self) -> int:
        return self.ram_bytes + self.vram_bytes


@dataclass(frozen=True)
class Link:
    """A directed link's measured round-trip time and bandwidth."""

    source: str
    target: str
    rtt_ms: float
    bandwidth_mbps: float


@dataclass(frozen=True)
class ClusterView:
    """Nodes sorted by peer id and links by (source, target): equal views compare equal."""

    nodes: tuple[NodeCapacity, ...]
    links: tuple[Link, ...] = ()
    _index: Mapping[tuple[str, str], Link] = field(default_factory=dict, compare=False, repr=False)
    _degrees: dict[str, int] | None = field(default=None, compare=False, repr=False)
    _by_id: dict[str, NodeCapacity] | None = field(default=None, compare=False, repr=False)
    _neighbours: dict[str, list[str]] | None = field(default=None, compare=False, repr=False)

    @staticmethod
    def build(nodes: Iterable[NodeCapacity], links: Iterable[Link] = ()) -> ClusterView:
        """Sorts the input and fills in the reverse of a link given in one direction only."""
        node_list = sorted(nodes, key=lambda n: n.peer_id)
        ids = [n.peer_id for n in node_list]
        if len(set(ids)) != len(ids):
            raise ValueError("duplicate node id in the cluster view")
        directed: dict[tuple[str, str], Link] = {}
        for link in links:
            directed[(link.source, link.target)] = link
        for (source, target), link in list(directed.items()):
            directed.setdefault(
                (target, source), Link(target, source, link.rtt_ms, link.bandwidth_mbps)
            )
        ordered = tuple(directed[key] for key in sorted(directed))
        return ClusterView(tuple(node_list), ordered, dict(directed))

    def node(self, peer_id: str) -> NodeCapacity:
        return self._nodes_by_id()[peer_id]

    def _nodes_by_id(self) -> dict[str, NodeCapacity]:
        """The nodes by peer id (built once per view: a mesh of a thousand asks often)."""
        if self._by_id is None:
            object.__setattr__(self, "_by_id", {n.peer_id: n for n in self.nodes})
        assert self._by_id is not None
        return self._by_id

    def reachable_count(self, peer_id: str) -> int:
        """How many other nodes `peer_id` has a link to."""
        return self._degree_map().get(peer_id, 0)

    def fully_linked(self) -> bool:
        """Whether every node has a link to every other (as in a small mesh once measured)."""
        others = len(self.nodes) - 1
        return all(self.reachable_count(node.peer_id) == others for node in self.nodes)

    def reachable_from(self, peer_id: str) -> list[NodeCapacity]:
        """The node itself and every node it has links to and from, by peer id: the only
        nodes that can serve it as workers (found once per view, from the links)."""
        if self._neighbours is None:
            present = self._nodes_by_id()
            neighbours: dict[str, list[str]] = {}
            for source, target in self._index:
                if source != target and target in present and (target, source) in self._index:
                    neighbours.setdefault(source, []).append(target)
            object.__setattr__(self, "_neighbours", neighbours)
        assert self._neighbours is not None
        by_id = self._nodes_by_id()
        found = [by_id[peer] for peer in self._neighbours.get(peer_id, ())]
        if peer_id in by_id:
            found.append(by_id[peer_id])
        return sorted(found, key=lambda node: node.peer_id)

    def _degree_map(self) -> dict[str, int]:
        """Links out of each node (computed once per view, and shared with the views that
        differ from it only in memory)."""
        if self._degrees is None:
            present = {node.peer_id for node in self.nodes}
            degrees: dict[str, int] = {}
            for source, target in self._index:
                if target in present and target != source:
                    degrees[source] = degrees.get(source, 0) + 1
            object.__setattr__(self, "_degrees", degrees)
        assert self._degrees is not None
        return self._degrees

    def __contains__(self, peer_id: object) -> bool:
        return isinstance(peer_id, str) and peer_id in self._nodes_by_id()

    def link(self, source: str, target: str) -> Link | None:
        """The link from source to target; None when unreachable. A node reaches itself freely."""
        if source == target:
            return Link(source, target, 0.0, float("inf"))
        return self._index.get((source, target))

    def with_memory_used(self, used: Mapping[str, int]) -> ClusterView:
        """The same view with `used` bytes taken from each node (for placing the next model);
        the nodes untouched and the links are shared with this view."""
        reduced = tuple(
            n
            if not used.get(n.peer_id)
            else NodeCapacity(
                n.peer_id,
                n.ram_bytes,
                n.vram_bytes,
                n.gflops,
                n.rpc_protocol,
                n.models,
                max(0, n.usable_bytes - used[n.peer_id]),
            )
            for n in self.nodes
        )
        self.reachable_from("")  # the links' neighbourhoods, shared
        return ClusterView(
            reduced, self.links, self._index, self._degree_map(), None, self._neighbours
        )
