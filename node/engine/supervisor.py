"""Running engine processes: start, wait until ready, log, restart with backoff, never orphan.

Each child runs in its own process group and, on Linux, is told by the kernel to die with its
parent (PR_SET_PDEATHSIG), so even `kill -9` of the node leaves no llama-server behind. A child
that dies on its own is reported with the tail of its log and started again after a delay that
grows while it keeps failing.
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import logging
import os
import signal
import subprocess
import sys
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO

import trio

_PR_SET_PDEATHSIG = 1
_LOG_TAIL_LINES = 40
_READY_POLL_S = 0.05  # a health check is one local request; a load waits on the next


@dataclass(frozen=True)
class ProcessSpec:
    """One way to start a child. `endpoint` is where it will listen, if it serves anything."""

    name: str
    argv: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)
    endpoint: str | None = None


class ServiceState(enum.Enum):
    STARTING = "starting"
    READY = "ready"
    WAITING_TO_RESTART = "waiting to restart"
    STOPPED = "stopped"


class RestartBackoff:
    """How long to wait before restarting a child that died (pure: the caller gives durations).

    The delay doubles from `initial_s` up to `maximum_s` while the child keeps dying young, and
    falls back to `initial_s` once it has run for `healthy_after_s`.
    """

    def __init__(
        self, initial_s: float = 0.5, maximum_s: float = 30.0, healthy_after_s: float = 60.0
    ):
        self.initial_s = initial_s
        self.maximum_s = maximum_s
        self.healthy_after_s = healthy_after_s
        self._next = initial_s

    def delay_after_exit(self, ran_for_s: float) -> float:
        if ran_for_s >= self.healthy_after_s:
            self._next = self.initial_s
        delay = self._next
        self._next = min(self._next * 2, self.maximum_s)
        return delay


ReadinessProbe = Callable[[ProcessSpec], Awaitable[bool]]


class Supervisor:
    """Keeps one service running: a fresh `ProcessSpec` from `make_spec` at every (re)start."""

    def __init__(
        self,
        make_spec: Callable[[], ProcessSpec],
        is_ready: ReadinessProbe,
        *,
        logger: logging.Logger,
        backoff: RestartBackoff | None = None,
        ready_timeout_s: float = 600.0,
        stop_grace_s: float = 10.0,
        on_log_line: Callable[[str], None] | None = None,
    ) -> None:
        self._make_spec = make_spec
        self._is_ready = is_ready
        self._log = logger
        self._backoff = backoff or RestartBackoff()
        self._ready_timeout_s = ready_timeout_s
        self._stop_grace_s = stop_grace_s
        self._on_log_line = on_log_line
        self.state = ServiceState.STOPPED
        self.ready_spec: ProcessSpec | None = None
        self.pid: int | None = None
        self.restarts = 0
        self.last_failure: str | None = None
        self._state_changed = trio.Event()

    async def run(self) -> None:
        """Runs until cancelled; the child is stopped on the way out."""
        while True:
            spec = self._make_spec()
            started = trio.current_time()
            failure = await self._run_once(spec)
            self.last_failure = failure
            self.restarts += 1
            delay = self._backoff.delay_after_exit(trio.current_time() - started)
            self._log.warning("%s %s; restarting in %.1f s", spec.name, failure, delay)
            self._set_state(ServiceState.WAITING_TO_RESTART, None)
            await trio.sleep(delay)

    async def wait_changed(self) -> None:
        await self._state_changed.wait()

    async def _run_once(self, spec: ProcessSpec) -> str:
        """Starts the child and returns why it is no longer running."""
        self._set_state(ServiceState.STARTING, None)
        try:
            process = _spawn(spec)
        except OSError as err:
            return f"could not start ({err.strerror or err})"
        self.pid = process.pid
        self._log.info("%s started (pid %d): %s", spec.name, process.pid, " ".join(spec.argv))
        tail: deque[str] = deque(maxlen=_LOG_TAIL_LINES)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(
                    _pump_log,
                    process,
                    logging.getLogger(f"sharedllm.engine.{spec.name}"),
                    tail,
                    self._on_log_line,
                )
                nursery.start_soon(self._await_ready, process, spec)
                code = await process.wait()
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await _stop(process, self._stop_grace_s)
                await process.aclose()
            self.pid = None
        last_lines = "\n    ".join(tail)
        return f"exited with {_describe_exit(code)}; last log lines:\n    {last_lines}"

    async def _await_ready(self, process: ChildProcess, spec: ProcessSpec) -> None:
        with trio.move_on_after(self._ready_timeout_s) as scope:
            while not await self._probe(spec):
                await trio.sleep(_READY_POLL_S)
        if scope.cancelled_caught:
            self._log.error(
                "%s not ready after %.0f s; stopping it", spec.name, self._ready_timeout_s
            )
            _signal_group(process.pid, signal.SIGTERM)
            return
        self._log.info("%s ready at %s", spec.name, spec.endpoint)
        self._set_state(ServiceState.READY, spec)

    async def _probe(self, spec: ProcessSpec) -> bool:
        try:
            return await self._is_ready(spec)
        except OSError:
            return False

    def _set_state(self, state: ServiceState, ready_spec: ProcessSpec | None) -> None:
        self.state = state
        self.ready_spec = ready_spec
        self._state_changed.set()
        self._state_changed = trio.Event()


class ChildProcess:
    """A child started from the main thread, with trio-friendly waiting and output.

    trio's own `open_process` forks from a worker thread, and the kernel's parent-death signal
    fires when the forking *thread* ends, which would kill the child after the thread idles out.
    Forking here, on the thread that runs the event loop, ties the child to the node's lifetime.
    """

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self._popen = popen
        self.pid = popen.pid
        assert popen.stdout is not None
        self.output = trio.lowlevel.FdStream(os.dup(popen.stdout.fileno()))
        popen.stdout.close()

    @property
    def returncode(self) -> int | None:
        return self._popen.poll()

    async def wait(self) -> int:
        """Waits for the exit without a thread: a pidfd where the kernel has one, else polling."""
        try:
            pidfd = os.pidfd_open(self.pid)
        except (AttributeError, OSError):
            while self._popen.poll() is None:
                await trio.sleep(0.05)
            return self._popen.returncode
        try:
            await trio.lowlevel.wait_readable(pidfd)
        finally:
            trio.lowlevel.notify_closing(pidfd)
            os.close(pidfd)
        return self._popen.wait()

    async def aclose(self) -> None:
        await self.output.aclose()


def _spawn(spec: ProcessSpec) -> ChildProcess:
    env = dict(os.environ)
    env.update(spec.env)
    # Forked from the event loop's thread on purpose (see ChildProcess); no other thread forks.
    return ChildProcess(popen_tied_to_node(spec.argv, stdout=subprocess.PIPE, env=env))


def popen_tied_to_node(
    argv: Sequence[str], *, stdout: int | IO[bytes], env: Mapping[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Starts a child in its own process group that the kernel kills when the node dies.

    Call it from the thread that lives as long as the node (the main thread, which also runs
    the event loop): the parent-death signal fires when the forking thread ends.
    """
    return subprocess.Popen(
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=stdout,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
        preexec_fn=_die_with_parent if sys.platform == "linux" else None,  # noqa: PLW1509
    )


def stop_group(popen: subprocess.Popen[bytes], grace_s: float) -> None:
    """SIGTERM to the child's group, then SIGKILL after `grace_s` (blocking: for start-up work
    that runs before the event loop)."""
    _signal_group(popen.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        popen.wait(timeout=grace_s)
    _signal_group(popen.pid, signal.SIGKILL)
    popen.wait()


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGKILL it when the node dies, however it dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)


async def _pump_log(
    process: ChildProcess,
    logger: logging.Logger,
    tail: deque[str],
    on_line: Callable[[str], None] | None,
) -> None:
    pending = b""
    async for chunk in process.output:
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for raw in lines:
            line = raw.decode(errors="replace").rstrip()
            if line:
                tail.append(line)
                logger.debug("%s", line)
                if on_line is not None:
                    on_line(line)


async def _stop(process: ChildProcess, grace_s: float) -> None:
    """SIGTERM to the child's group, then SIGKILL if it is still there after `grace_s`."""
    if process.returncode is None:
        _signal_group(process.pid, signal.SIGTERM)
        with trio.move_on_after(grace_s):
            await process.wait()
    _signal_group(process.pid, signal.SIGKILL)
    await process.wait()


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"
