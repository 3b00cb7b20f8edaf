"""Acting as a member (or a stranger) towards a real node over real libp2p, in tests."""

from __future__ import annotations

from sharedllm.mesh.hello import HELLO
from sharedllm.mesh.transport.framing import receive_frame, send_frame
from sharedllm.mesh.transport.libp2p_adapter import Libp2pTransport


async def hello_exchange(transport: Libp2pTransport, target: str, proof: bytes) -> bytes:
    """Sends our hello with `proof` to the connected `target`: its reply (b"": refused)."""
    stream = await transport.open_stream(target, HELLO)
    try:
        await send_frame(stream, proof)
        return await receive_frame(stream, 10.0)
    finally:
        await stream.aclose()
