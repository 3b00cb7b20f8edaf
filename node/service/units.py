"""The service definitions themselves (pure): a systemd unit and a launchd property list that
start `sharedllm-node up` at boot (or login), restart it when it fails, and stop it with
SIGTERM, which the node answers by leaving the mesh cleanly."""

from __future__ import annotations

import plistlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

SERVICE_NAME = "sharedllm-node"
LAUNCHD_LABEL = "org.sharedllm.node"
RESTART_DELAY_S = 5
STOP_TIMEOUT_S = 45  # the node leaves the mesh and stops its engines within 30 s


@dataclass(frozen=True)
class ServiceSpec:
    """What the service runs: the node's program, its arguments and where its logs go."""

    program: Path
    arguments: tuple[str, ...]  # after `up`
    data_dir: Path
    user: str | None = None  # system units only: the account the node runs as

    @property
    def command(self) -> tuple[str, ...]:
        return (str(self.program), "up", "--data-dir", str(self.data_dir), *self.arguments)


def systemd_quote(argument: str) -> str:
    """One ExecStart argument, quoted for systemd (which also expands `%` and `$`)."""
    if any(ord(c) < 32 for c in argument):
        raise ValueError(f"a service argument cannot hold control characters: {argument!r}")
    escaped = argument.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + escaped.replace("%", "%%").replace("$", "$$") + '"'


def systemd_unit(spec: ServiceSpec, system: bool) -> str:
    lines = [
        "[Unit]",
        f"Description=SharedLLM node ({_one_line(str(spec.data_dir))})",
        "Wants=network-online.target",
        "After=network-online.target",
        "",
        "[Service]",
        "Type=simple",
        "ExecStart=" + " ".join(systemd_quote(a) for a in spec.command),
        "Restart=on-failure",
        f"RestartSec={RESTART_DELAY_S}",
        "KillSignal=SIGTERM",
        f"TimeoutStopSec={STOP_TIMEOUT_S}",
    ]
    if system and spec.user:
        lines.append(f"User={_one_line(spec.user)}")
    lines += ["", "[Install]", f"WantedBy={'multi-user.target' if system else 'default.target'}"]
    return "\n".join(lines) + "\n"


def launchd_agent(spec: ServiceSpec, log_dir: Path) -> bytes:
    """A launch agent: started at login, started again whenever it exits with a failure."""
    return plistlib.dumps(
        {
            "Label": LAUNCHD_LABEL,
            "ProgramArguments": list(spec.command),
            "RunAtLoad": True,
            "KeepAlive": {"SuccessfulExit": False},
            "ThrottleInterval": RESTART_DELAY_S,
            "ExitTimeOut": STOP_TIMEOUT_S,
            "StandardOutPath": str(log_dir / "node.log"),
            "StandardErrorPath": str(log_dir / "node.log"),
        }
    )


def _one_line(text: str) -> str:
    if any(ord(c) < 32 for c in text):
        raise ValueError(f"cannot hold control characters: {text!r}")
    return text.replace("%", "%%")


def unit_arguments(extra: Sequence[str]) -> tuple[str, ...]:
    """The `up` arguments a service keeps: those given after `--`, without `--data-dir`,
    which the service sets itself."""
    kept = list(extra[1:] if extra[:1] == ["--"] else extra)
    if "--data-dir" in kept or any(a.startswith("--data-dir=") for a in kept):
        raise ValueError("give --data-dir before `--`, to `service install` itself")
    return tuple(kept)
