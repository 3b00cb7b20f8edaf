"""Files a node keeps (keys, certificates, revocations, peers) are replaced atomically: a
process killed with SIGKILL at any moment while rewriting them leaves the old or the new
content, never a mix or an empty file; keys are readable by their owner only."""

from __future__ import annotations

import os
import random
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

from sharedllm.mesh.atomic_file import write_atomic
from sharedllm.mesh.identity import load_or_create_identity

_WRITER = """
import sys
from pathlib import Path
from sharedllm.mesh.atomic_file import write_atomic
path = Path(sys.argv[1])
versions = [bytes([65 + i]) * 300_000 for i in range(4)]
print("ready", flush=True)
i = 0
while True:
    write_atomic(path, versions[i % 4])
    i += 1
"""


def test_a_writer_killed_at_any_moment_leaves_a_whole_version(tmp_path: Path) -> None:
    target = tmp_path / "state.bin"
    write_atomic(target, b"A" * 300_000)
    whole = {bytes([65 + i]) * 300_000 for i in range(4)}
    rng = random.Random(5)
    for _ in range(25):
        with subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(target)], stdout=subprocess.PIPE, text=True
        ) as writer:
            assert writer.stdout is not None and writer.stdout.readline().strip() == "ready"
            time.sleep(rng.uniform(0.0, 0.05))
            writer.send_signal(signal.SIGKILL)
            writer.wait()
        assert target.read_bytes() in whole
    print("\n25 kills mid-write: the file always held one whole version")


def test_keys_are_private_to_their_owner(tmp_path: Path) -> None:
    load_or_create_identity(tmp_path)
    keys = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert keys
    for key in keys:
        assert stat.S_IMODE(os.stat(key).st_mode) == 0o600, key
