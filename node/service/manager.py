"""Installing, inspecting and removing the service: the unit file, and systemctl or launchctl
where they answer (in a container or over ssh without a session bus they may not: then the
file is written and the command to start it is printed)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ...mesh.atomic_file import write_atomic
from .units import LAUNCHD_LABEL, SERVICE_NAME, ServiceSpec, launchd_agent, systemd_unit

_TIMEOUT_S = 60


class ServiceError(Exception):
    """The service cannot be installed or removed here; the message says why."""


@dataclass(frozen=True)
class ServiceHome:
    """Where this platform keeps service definitions, for the user or the whole system."""

    platform: str
    system: bool
    home: Path
    config_home: Path

    @staticmethod
    def here(system: bool) -> ServiceHome:
        home = Path.home()
        config = Path(os.environ.get("XDG_CONFIG_HOME") or home / ".config")
        return ServiceHome(sys.platform, system, home, config)

    @property
    def unit_file(self) -> Path:
        if self.platform == "darwin":
            folder = (
                Path("/Library/LaunchDaemons")
                if self.system
                else self.home / "Library/LaunchAgents"
            )
            return folder / f"{LAUNCHD_LABEL}.plist"
        if self.platform.startswith("linux"):
            folder = (
                Path("/etc/systemd/system") if self.system else self.config_home / "systemd/user"
            )
            return folder / f"{SERVICE_NAME}.service"
        raise ServiceError(
            f"services are supported on Linux (systemd) and macOS, not {self.platform}"
        )

    def _control(self, *args: str) -> list[str]:
        if self.platform == "darwin":
            return ["launchctl", *args]
        return ["systemctl", *([] if self.system else ["--user"]), *args]


def install(spec: ServiceSpec, where: ServiceHome) -> list[str]:
    """Writes the unit and asks the service manager to start it now and at every boot."""
    path = where.unit_file
    if where.platform == "darwin":
        content = launchd_agent(spec, spec.data_dir)
    else:
        content = systemd_unit(spec, where.system).encode()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, content, mode=0o644)
    except OSError as err:
        raise ServiceError(f"cannot write {path}: {err.strerror or err}") from None
    said = [f"wrote {path}"]
    steps: list[tuple[str, ...]]
    if where.platform == "darwin":
        steps = [("load", "-w", str(path))]
    else:
        steps = [("daemon-reload",), ("enable", "--now", f"{SERVICE_NAME}.service")]
    said += _run_steps(where, steps)
    if where.platform != "darwin" and not where.system:
        said.append(f"to start it at boot before you log in: loginctl enable-linger {_user()}")
    return said


def status(where: ServiceHome) -> list[str]:
    path = where.unit_file
    if not path.exists():
        return [f"not installed ({path} does not exist)"]
    args = (
        ("list", LAUNCHD_LABEL)
        if where.platform == "darwin"
        else ("status", "--no-pager", SERVICE_NAME)
    )
    done = _run(where._control(*args))
    return [f"installed: {path}", done]


def uninstall(where: ServiceHome) -> list[str]:
    path = where.unit_file
    if not path.exists():
        return [f"not installed ({path} does not exist)"]
    if where.platform == "darwin":
        said = _run_steps(where, [("unload", "-w", str(path))])
    else:
        said = _run_steps(where, [("disable", "--now", f"{SERVICE_NAME}.service")])
    try:
        path.unlink()
    except OSError as err:
        raise ServiceError(f"cannot remove {path}: {err.strerror or err}") from None
    if where.platform != "darwin":
        said += _run_steps(where, [("daemon-reload",)])
    return [*said, f"removed {path}"]


def _run_steps(where: ServiceHome, steps: Sequence[tuple[str, ...]]) -> list[str]:
    """Runs each service-manager command until one fails; says what to run by hand then."""
    tool = where._control()[0]
    if shutil.which(tool) is None:
        return [f"{tool} is not here: run `{' '.join(where._control(*steps[-1]))}` where it is"]
    said: list[str] = []
    for step in steps:
        command = where._control(*step)
        try:
            done = subprocess.run(
                command, capture_output=True, text=True, timeout=_TIMEOUT_S, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as err:
            return [*said, f"`{' '.join(command)}` did not run: {err}"]
        if done.returncode != 0:
            reason = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no reason given"]
            return [*said, f"`{' '.join(command)}` failed ({reason[0]}); run it in your session"]
        said.append(f"ran `{' '.join(command)}`")
    return said


def _run(command: list[str]) -> str:
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"`{' '.join(command)}` did not run: {err}"
    return (done.stdout + done.stderr).strip() or f"`{' '.join(command)}` said nothing"


def _user() -> str:
    return os.environ.get("USER") or os.environ.get("LOGNAME") or "$USER"
