"""Process supervision with real child processes: readiness, restart with backoff, clean stop."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

import psutil
import trio
from hypothesis import given
from hypothesis import strategies as st
from sharedllm.node.engine.supervisor import ProcessSpec, RestartBackoff, ServiceState, Supervisor

_log = logging.getLogger("test.supervisor")


@given(st.lists(st.floats(min_value=0, max_value=1000, allow_nan=False), max_size=40))
def test_backoff_stays_within_bounds_and_resets_after_healthy_run(runs: list[float]) -> None:
    backoff = RestartBackoff(initial_s=0.5, maximum_s=30.0, healthy_after_s=60.0)
    previous: float | None = None
    for ran_for in runs:
        delay = backoff.delay_after_exit(ran_for)
        assert 0.5 <= delay <= 30.0
        if ran_for >= 60.0:
            assert delay == 0.5
        elif previous is not None:
            assert delay == min(previous * 2, 30.0) or delay == 0.5
        previous = delay


def test_backoff_doubles_while_crashing() -> None:
    backoff = RestartBackoff(initial_s=1.0, maximum_s=8.0, healthy_after_s=60.0)
    assert [backoff.delay_after_exit(0.1) for _ in range(6)] == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]


def _python_spec(code: str, marker: Path) -> ProcessSpec:
    """The child gets its readiness marker as argv[1] and touches it when it is ready."""
    return ProcessSpec(
        name="child", argv=(sys.executable, "-c", code, str(marker)), endpoint=str(marker)
    )


def _fresh_markers(directory: Path) -> Callable[[], Path]:
    count = iter(range(1000))
    return lambda: directory / f"ready-{next(count)}"


async def _file_exists(spec: ProcessSpec) -> bool:
    assert spec.endpoint is not None
    return Path(spec.endpoint).exists()  # noqa: ASYNC240 - a stat is instant


async def test_ready_then_restart_after_crash(tmp_path: Path) -> None:
    marker = _fresh_markers(tmp_path)
    starts = tmp_path / "starts"
    code = (
        "import pathlib,sys,time\n"
        f"s=pathlib.Path({str(starts)!r}); n=len(s.read_text()) if s.exists() else 0\n"
        "s.write_text('x'*(n+1))\n"
        "pathlib.Path(sys.argv[1]).touch()\n"
        "print('child running', flush=True)\n"
        "time.sleep(0.3) if n == 0 else time.sleep(60)\n"
        "sys.exit(3)\n"
    )
    supervisor = Supervisor(
        lambda: _python_spec(code, marker()),
        _file_exists,
        logger=_log,
        backoff=RestartBackoff(initial_s=0.05),
        stop_grace_s=2.0,
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(supervisor.run)
        with trio.fail_after(20):
            while not (supervisor.restarts == 1 and supervisor.state is ServiceState.READY):
                await supervisor.wait_changed()
        assert supervisor.last_failure is not None
        assert "exit code 3" in supervisor.last_failure
        assert "child running" in supervisor.last_failure  # the log tail is reported
        pid = supervisor.pid
        assert pid is not None
        nursery.cancel_scope.cancel()
    assert not _alive(pid)
    assert starts.read_text() == "xx"


async def test_stop_kills_a_child_that_ignores_sigterm(tmp_path: Path) -> None:
    marker = tmp_path / "ready"
    code = (
        "import pathlib,signal,sys,time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "pathlib.Path(sys.argv[1]).touch()\n"
        "time.sleep(120)\n"
    )
    supervisor = Supervisor(
        lambda: _python_spec(code, marker), _file_exists, logger=_log, stop_grace_s=0.5
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(supervisor.run)
        with trio.fail_after(20):
            while supervisor.state is not ServiceState.READY:
                await supervisor.wait_changed()
        pid = supervisor.pid
        assert pid is not None
        nursery.cancel_scope.cancel()
    assert not _alive(pid)


async def test_unstartable_program_is_reported_and_retried(tmp_path: Path) -> None:
    spec = ProcessSpec(name="ghost", argv=(str(tmp_path / "no-such-program"),))
    supervisor = Supervisor(
        lambda: spec, _file_exists, logger=_log, backoff=RestartBackoff(initial_s=0.01)
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(supervisor.run)
        with trio.fail_after(10):
            while supervisor.restarts < 2:
                await supervisor.wait_changed()
        nursery.cancel_scope.cancel()
    assert supervisor.last_failure is not None
    assert "could not start" in supervisor.last_failure


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_no_leftover_children() -> None:
    me = psutil.Process(os.getpid())
    assert [c for c in me.children(recursive=True) if c.status() != psutil.STATUS_ZOMBIE] == []
