"""Every decoder of network bytes, fed random bytes, random msgpack and mutated valid
encodings: each input is decoded or refused with the decoder's own error types, nothing else.
(`python -m bench --only fuzz` runs 100,000 inputs per decoder.)"""

from __future__ import annotations

import pytest

from bench.fuzz_bench import Target, fuzz, targets

COUNT = 3000


@pytest.mark.parametrize("target", targets(), ids=lambda t: t.name)
def test_a_decoder_refuses_bad_input_only_with_its_own_errors(target: Target) -> None:
    result = fuzz(target, COUNT, seed=1)
    print(f"{target.name}: {result.inputs} inputs, {result.rejected} refused, no findings")
    assert not result.findings, result.findings[:5]
    assert result.rejected > COUNT // 3  # most random input is refused, not accepted
