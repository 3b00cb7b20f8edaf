"""`service install | status | uninstall`: the unit and agent files the node writes, their
quoting (arguments with spaces, quotes, % and $ reach the node unchanged; control characters
are refused), a systemd check of the unit where systemd-analyze is present, and the commands
against a home of our own (systemctl without a session bus fails politely)."""

from __future__ import annotations

import os
import plistlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sharedllm.node.service.units import (
    LAUNCHD_LABEL,
    ServiceSpec,
    launchd_agent,
    systemd_quote,
    systemd_unit,
    unit_arguments,
)

from .node_process import node_command

TRICKY = ("plain", "two words", 'say "hi"', "100%", "$HOME", "back\\slash", "")


def _unquote(quoted: str) -> str:
    """systemd's reading of one double-quoted ExecStart argument, and its % and $ expansions
    of the doubled characters."""
    assert quoted.startswith('"') and quoted.endswith('"')
    text, out, index = quoted[1:-1], [], 0
    while index < len(text):
        char = text[index]
        if char == "\\":
            out.append(text[index + 1])
            index += 2
            continue
        assert char != '"', "an unescaped quote ends the argument early"
        if char in "%$":
            assert text[index + 1] == char, f"a lone {char} would be expanded"
            index += 1
        out.append(char)
        index += 1
    return "".join(out)


@given(st.text(st.characters(min_codepoint=32, exclude_categories=["Cs"]), max_size=40))
def test_every_printable_argument_reaches_the_node_unchanged(argument: str) -> None:
    assert _unquote(systemd_quote(argument)) == argument


@pytest.mark.parametrize("argument", ["line\nExecStartPre=/bin/evil", "tab\there", "nul\0"])
def test_control_characters_cannot_inject_unit_lines(argument: str) -> None:
    with pytest.raises(ValueError):
        systemd_quote(argument)


def _spec(data_dir: Path, *arguments: str) -> ServiceSpec:
    return ServiceSpec(Path(node_command()), arguments, data_dir, "nobody")


def test_the_unit_runs_up_restarts_on_failure_and_stops_with_sigterm(tmp_path: Path) -> None:
    unit = systemd_unit(_spec(tmp_path, *TRICKY), system=True)
    lines = unit.splitlines()
    exec_start = next(line for line in lines if line.startswith("ExecStart="))
    assert [_unquote(a) for a in _split(exec_start[len("ExecStart=") :])] == [
        node_command(),
        "up",
        "--data-dir",
        str(tmp_path),
        *TRICKY,
    ]
    for wanted in ("Restart=on-failure", "KillSignal=SIGTERM", "User=nobody"):
        assert wanted in lines
    assert "WantedBy=multi-user.target" in lines
    assert "WantedBy=default.target" in systemd_unit(_spec(tmp_path), system=False)


def _split(command: str) -> list[str]:
    """The quoted arguments of an ExecStart line (each starts and ends with a quote)."""
    parts, current, escaped, inside = [], "", False, False
    for char in command:
        current += char if inside or char != " " else ""
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == '"':
            inside = not inside
            if not inside:
                parts.append(current)
                current = ""
    return parts


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is missing")
@pytest.mark.parametrize("system", [False, True], ids=["user", "system"])
def test_systemd_accepts_the_unit(tmp_path: Path, system: bool) -> None:
    path = tmp_path / "sharedllm-node.service"
    path.write_text(systemd_unit(_spec(tmp_path / "data dir", "--relay", "--name", "a%b"), system))
    done = subprocess.run(
        ["systemd-analyze", "verify", str(path)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_launch_agent_runs_the_same_command_and_keeps_it_alive(tmp_path: Path) -> None:
    agent = plistlib.loads(launchd_agent(_spec(tmp_path, "--relay"), tmp_path))
    assert agent["Label"] == LAUNCHD_LABEL
    assert agent["ProgramArguments"] == [
        node_command(),
        "up",
        "--data-dir",
        str(tmp_path),
        "--relay",
    ]
    assert agent["RunAtLoad"] is True and agent["KeepAlive"] == {"SuccessfulExit": False}


def test_data_dir_belongs_before_the_separator() -> None:
    assert unit_arguments(["--", "--relay"]) == ("--relay",)
    with pytest.raises(ValueError):
        unit_arguments(["--", "--data-dir", "/elsewhere"])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the systemd path is Linux's")
def test_install_status_and_uninstall_in_a_home_of_our_own(tmp_path: Path) -> None:
    env = {**os.environ, "HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path / "config")}
    data = tmp_path / "data"

    def service(*args: str) -> subprocess.CompletedProcess[str]:
        command = [node_command(), "service", *args]
        return subprocess.run(
            command, check=False, capture_output=True, text=True, env=env, timeout=120
        )

    installed = service("install", "--data-dir", str(data), "--", "--relay")
    assert installed.returncode == 0, installed.stderr
    unit = tmp_path / "config" / "systemd" / "user" / "sharedllm-node.service"
    assert f'"--data-dir" "{data}" "--relay"' in unit.read_text()
    assert f"wrote {unit}" in installed.stdout
    assert "installed" in service("status").stdout
    bad = service("install", "--data-dir", str(data), "--", "--name", "a\nb")
    assert bad.returncode == 1 and "control characters" in bad.stderr
    removed = service("uninstall")
    assert removed.returncode == 0 and not unit.exists()
    assert "not installed" in service("status").stdout
