"""Taking a member's engine: which offers fit this machine, and an archive that is cut, too big
or not what its member announced is refused (a member is trusted to offer, not to be right)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sharedllm.mesh import records
from sharedllm.mesh.transport.framing import _HEADER
from sharedllm.node.engine.archive import Platform
from sharedllm.node.engine_share import (
    MAX_ARCHIVE_BYTES,
    EngineFetchError,
    receive_archive,
    usable_offer,
)

HERE = Platform("linux", "x86_64", "glibc 2.36", frozenset({"avx", "avx2"}))
KEY = "llama.cpp-build-cpu"


def _offer(**changes: object) -> dict[str, object]:
    offer: dict[str, object] = {
        "build_key": KEY,
        "system": "linux",
        "machine": "x86_64",
        "cpu_features": ["avx2"],
    }
    return {"engine_offer": {**offer, **changes}}


def test_only_an_offer_for_this_machine_is_taken() -> None:
    assert usable_offer(_offer(), HERE, KEY)
    for bad in (
        _offer(build_key="other"),
        _offer(machine="aarch64"),
        _offer(cpu_features=["avx512f"]),
        _offer(cpu_features="avx2"),
        _offer(cpu_features=[7]),
        {"engine_offer": "yes"},
        {},
    ):
        assert not usable_offer(bad, HERE, KEY)


@given(st.dictionaries(st.text(max_size=12), st.none() | st.integers() | st.text(max_size=8)))
def test_any_gossiped_offer_is_judged_without_error(offer: dict[str, object]) -> None:
    usable_offer({"engine_offer": offer}, HERE, KEY)


class _Bytes:
    """A stream that yields fixed bytes, as a member's data stream would."""

    remote_peer = "member"
    remote_host = None

    def __init__(self, data: bytes) -> None:
        self._data = data

    async def receive_some(self, max_bytes: int) -> bytes:
        block, self._data = self._data[:max_bytes], self._data[max_bytes:]
        return block

    async def send_all(self, data: bytes) -> None:
        raise AssertionError("nothing is sent")

    async def aclose(self) -> None:
        return None


def _sent(size: int, digest: str, body: bytes) -> _Bytes:
    header = records.encode("engine-archive", [size, digest])
    return _Bytes(_HEADER.pack(len(header)) + header + body)


async def test_an_archive_as_announced_is_kept(tmp_path: Path) -> None:
    body = b"archive" * 1000
    await receive_archive(_sent(len(body), hashlib.sha256(body).hexdigest(), body), tmp_path / "a")
    assert (tmp_path / "a").read_bytes() == body


@pytest.mark.parametrize("case", ["cut", "altered", "too big", "empty"])
async def test_an_archive_not_as_announced_is_refused(tmp_path: Path, case: str) -> None:
    body = b"archive" * 1000
    digest = hashlib.sha256(body).hexdigest()
    stream = {
        "cut": _sent(len(body), digest, body[:-10]),
        "altered": _sent(len(body), digest, body[:-1] + b"X"),
        "too big": _sent(MAX_ARCHIVE_BYTES + 1, digest, body),
        "empty": _sent(0, digest, b""),
    }[case]
    with pytest.raises(EngineFetchError):
        await receive_archive(stream, tmp_path / "a")
