"""What llama-server asks of a worker's rpc-server, counted by command as it crosses a tunnel.

llama.cpp's RPC requests are `| command (1 byte) | size (8 bytes, little-endian) | payload |`
(ggml-rpc.cpp, protocol 7). Counting them per command shows where a token's bytes and round
trips go: whether the graph is sent again for every token (GRAPH_COMPUTE) or only recomputed
(GRAPH_RECOMPUTE), how many activations are read back (GET_TENSOR), and so on.

The tally only watches: it never changes or holds back the bytes, and a stream that does not
parse (another protocol version) just stops being counted.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping

# The command numbers of RPC protocol 7.0.0, in the engine's order.
COMMANDS = (
    "ALLOC_BUFFER",
    "GET_ALIGNMENT",
    "GET_MAX_SIZE",
    "BUFFER_GET_BASE",
    "FREE_BUFFER",
    "BUFFER_CLEAR",
    "SET_TENSOR",
    "SET_TENSOR_HASH",
    "GET_TENSOR",
    "COPY_TENSOR",
    "GRAPH_COMPUTE",
    "GET_DEVICE_MEMORY",
    "INIT_TENSOR",
    "GET_ALLOC_SIZE",
    "HELLO",
    "DEVICE_COUNT",
    "GRAPH_RECOMPUTE",
    "MEMSET_TENSOR",
)
_HEADER = 9
_SANE_SIZE = 1 << 40  # larger than any tensor: a header that says more is not a header


class RpcTally:
    """Requests and their payload bytes per command, over all connections of one tunnel."""

    def __init__(self) -> None:
        self.counts: dict[str, list[int]] = {}  # command -> [requests, payload bytes]

    def reader(self) -> RequestReader:
        """A parser for one more connection's request stream, counting into this tally."""
        return RequestReader(self.counts)

    def as_dict(
        self, native: Mapping[int, tuple[int, int]] | None = None
    ) -> dict[str, dict[str, int]]:
        """Per command, what this tally counted plus what native relays counted (`native`:
        command number -> requests, payload bytes)."""
        merged = {name: list(entry) for name, entry in self.counts.items()}
        for command, (requests, size) in (native or {}).items():
            if command < len(COMMANDS):
                entry = merged.setdefault(COMMANDS[command], [0, 0])
                entry[0] += requests
                entry[1] += size
        return {name: {"requests": n, "bytes": size} for name, (n, size) in merged.items()}


class RequestReader:
    """Splits one connection's request bytes into requests (sans-I/O) and counts them."""

    def __init__(self, counts: dict[str, list[int]]) -> None:
        self._counts = counts
        self._header = bytearray()
        self._skip = 0
        self.lost = False  # the stream stopped parsing; nothing more is counted

    def __call__(self, data: bytes) -> None:
        view = memoryview(data)
        while view and not self.lost:
            if self._skip:
                step = min(self._skip, len(view))
                self._skip -= step
                view = view[step:]
                continue
            need = _HEADER - len(self._header)
            self._header += view[:need]
            view = view[need:]
            if len(self._header) == _HEADER:
                self._count(bytes(self._header))
                self._header.clear()

    def _count(self, header: bytes) -> None:
        command, size = header[0], struct.unpack("<Q", header[1:])[0]
        if command >= len(COMMANDS) or size > _SANE_SIZE:
            self.lost = True
            return
        entry = self._counts.setdefault(COMMANDS[command], [0, 0])
        entry[0] += 1
        entry[1] += size
        self._skip = size
