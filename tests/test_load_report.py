"""Reading where llama-server put the layers from its log, and comparing with the plan."""

from __future__ import annotations

from sharedllm.node.engine.load_report import LoadReport

LOG = """\
0.01.144.889 I load_tensors: offloading 12 repeating layers to GPU
0.01.144.889 I load_tensors: offloaded 13/19 layers to GPU
0.01.144.899 I load_tensors:   CPU_Mapped model buffer size =   191.72 MiB
0.01.144.900 I load_tensors:   CPU_REPACK model buffer size =     4.22 MiB
0.01.144.901 I load_tensors: RPC0[127.0.0.1:45861] model buffer size =    21.34 MiB
0.01.144.902 I load_tensors: RPC0[127.0.0.1:56109] model buffer size =    22.10 MiB
"""
MIB = 1024**2


def _report() -> LoadReport:
    report = LoadReport()
    for line in LOG.splitlines():
        report.feed(line)
    return report


def test_reads_offloaded_layers_and_rpc_buffers() -> None:
    report = _report()
    assert report.offloaded == 13
    assert report.rpc_buffers() == {
        "127.0.0.1:45861": int(21.34 * MIB),
        "127.0.0.1:56109": int(22.10 * MIB),
    }


def test_matching_plan_has_no_problem() -> None:
    planned = {"127.0.0.1:45861": int(21.2 * MIB), "127.0.0.1:56109": int(22.0 * MIB)}
    assert _report().problem(13, planned) is None
    assert LoadReport().problem(0, {}) is None  # all layers local: nothing to check


def test_differences_are_explained() -> None:
    report = _report()
    planned = {"127.0.0.1:45861": int(21.2 * MIB), "127.0.0.1:56109": int(22.0 * MIB)}
    assert "offloaded 13 layers, the plan says 12" in str(report.problem(12, planned))
    moved = {**planned, "127.0.0.1:56109": 40 * MIB}
    assert "22.1 MiB on 127.0.0.1:56109, the plan says 40.0 MiB" in str(report.problem(13, moved))
    missing = {**planned, "127.0.0.1:1": MIB}
    assert "no weights on 127.0.0.1:1" in str(report.problem(13, missing))
    assert "did not report" in str(LoadReport().problem(13, planned))


DRAFT_LOG = """\
0.01.300.000 I load_tensors: offloading 0 repeating layers to GPU
0.01.300.001 I load_tensors: offloaded 0/2 layers to GPU
0.01.300.002 I load_tensors:   CPU_Mapped model buffer size =     9.50 MiB
"""


def test_a_draft_model_s_load_does_not_hide_the_model_s() -> None:
    report = _report()
    for line in DRAFT_LOG.splitlines():  # the draft model loads after the model
        report.feed(line)
    assert report.offloaded == 13
    assert report.buffers["CPU_Mapped"] == int(191.72 * MIB)
    restarted = report
    restarted.restart()
    assert (restarted.offloaded, restarted.buffers) == (None, {})
    for line in LOG.splitlines():
        restarted.feed(line)
    assert restarted.offloaded == 13  # the restarted engine's own load counts
