"""The native tunnel relay: a tunnel's bytes copied in C, not by the interpreter per message.

The node authenticates a data-plane stream (TLS, membership proof, the tunnel's request) in
Python as always. When both ends have the relay, the opener's request carries 32 random bytes
and the answer 32 more, both inside TLS; both ends then close TLS cleanly (close_notify), keep
the TCP socket, and hand it with the local connection to `sharedllm_relay` (native_relay.c),
which seals each chunk with AES-256-GCM under keys derived from those 64 bytes (fresh for every
tunnel, one per direction). The C call runs on a thread of its own without the GIL; the node
reads its counters (bytes, round trips, llama.cpp RPC requests by command) when asked.

The library is compiled per machine by the node (the mesh starts no processes); `NativeRelay`
loads it. Where it cannot be built or loaded, tunnels stay on the Python path.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import trio

SOURCE = Path(__file__).with_name("native_relay.c")
SEALED_RECORDS = Path(__file__).with_name("sealed_records.h")  # shared with the engine patch
SECRET_BYTES = 32
RPC_COMMANDS = 32  # command numbers the C side counts (llama.cpp's RPC has fewer)
MAX_RELAYS = 64  # tunnels relayed natively at once (a thread each); more take the Python path
SPIN_US = 50  # after activity, how long a relay looks again before it sleeps (spare cores only)
SPIN_MIN_CORES = 8
_ERROR_BYTES = 256
_KEY_INFO = b"sharedllm tunnel relay 1 "


class HasFileno(Protocol):
    def fileno(self) -> int: ...


class NativeRelayError(Exception):
    """The relay stopped on a failure (the message says which); the tunnel is closed."""


class RelayCounters(ctypes.Structure):
    """What the C relay counts for one tunnel connection, read while it runs (sampled)."""

    _fields_ = [
        ("bytes_out", ctypes.c_uint64),
        ("bytes_back", ctypes.c_uint64),
        ("wire_out", ctypes.c_uint64),
        ("wire_back", ctypes.c_uint64),
        ("round_trips", ctypes.c_uint64),
        ("rpc_lost", ctypes.c_uint64),
        ("rpc_requests", ctypes.c_uint64 * RPC_COMMANDS),
        ("rpc_bytes", ctypes.c_uint64 * RPC_COMMANDS),
    ]


@dataclass(frozen=True)
class TunnelKeys:
    """One tunnel's AES-256 keys, one per direction."""

    send: bytes
    receive: bytes

    @staticmethod
    def derive(opener_secret: bytes, answer_secret: bytes, opener: bool) -> TunnelKeys:
        """HKDF-SHA256 (RFC 5869) of both ends' secrets: neither end alone picks the keys."""
        key = hmac.new(b"\x00" * 32, opener_secret + answer_secret, hashlib.sha256).digest()

        def expand(direction: bytes) -> bytes:
            return hmac.new(key, _KEY_INFO + direction + b"\x01", hashlib.sha256).digest()

        out, back = expand(b"out"), expand(b"back")
        return TunnelKeys(out, back) if opener else TunnelKeys(back, out)


def new_secret() -> bytes:
    return secrets.token_bytes(SECRET_BYTES)


@functools.cache
def libcrypto_path() -> str | None:
    """The libcrypto this process's ssl module uses (to link the relay against the same one),
    else the system's, else None. Read once: every engine start asks (engine_handoff)."""
    import ssl  # noqa: F401  (loads libcrypto, so that the process's maps name it)

    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            for line in maps:
                path = line.split()[-1]
                if "/libcrypto" in path and os.path.exists(path):
                    return path
    except OSError:
        pass
    return ctypes.util.find_library("crypto")


def spin_for(cores: int | None, engine_on_gpus: bool) -> int:
    """How long a relay keeps looking after activity. Where the engine computes on GPUs its
    CPU cores mostly wait: on the 16-core GPU machine a thread's wake-up cost more than a
    token's messages. Where the engine computes on the CPU, a looking thread takes a core it
    needs (on 2 cores a tunnel round trip took 238 us with a 50 us look, 159 us without)."""
    return SPIN_US if engine_on_gpus and (cores or 1) >= SPIN_MIN_CORES else 0


class NativeRelay:
    """The compiled relay, and the threads it may use."""

    def __init__(self, library: Path, spin_us: int = 0) -> None:
        function = ctypes.CDLL(str(library)).sharedllm_relay
        function.restype = ctypes.c_int
        function.argtypes = (
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_char_p,
            ctypes.c_char_p,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.POINTER(RelayCounters),
            ctypes.c_char_p,
            ctypes.c_size_t,
        )
        self._function = function
        self._spin_us = spin_us
        self._threads = trio.CapacityLimiter(MAX_RELAYS)

    def has_room(self) -> bool:
        return self._threads.borrowed_tokens < self._threads.total_tokens

    async def relay(
        self,
        local: HasFileno,
        remote: HasFileno,
        keys: TunnelKeys,
        counters: RelayCounters,
        rpc_commands: int = 0,
    ) -> None:
        """Relays both ways until both directions end (returns) or one fails (raises
        `NativeRelayError`); cancelling stops it. Both sockets must be non-blocking (trio's
        are); they stay the caller's to close."""
        stop_read, stop_write = os.pipe()
        error = ctypes.create_string_buffer(_ERROR_BYTES)

        def run() -> int:
            return int(
                self._function(
                    local.fileno(),
                    remote.fileno(),
                    stop_read,
                    keys.send,
                    keys.receive,
                    rpc_commands,
                    self._spin_us,
                    ctypes.byref(counters),
                    error,
                    _ERROR_BYTES,
                )
            )

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_stop_when_cancelled, stop_write)
                result = await trio.to_thread.run_sync(run, limiter=self._threads)
                nursery.cancel_scope.cancel()
        finally:
            os.close(stop_read)
            os.close(stop_write)
        if result != 0:
            raise NativeRelayError(error.value.decode(errors="replace"))


async def _stop_when_cancelled(stop_write: int) -> None:
    """Sleeps; when cancelled (the relay finished, or its caller was cancelled) wakes the C
    side, which returns at once if it is still running."""
    try:
        await trio.sleep_forever()
    finally:
        os.write(stop_write, b"x")
