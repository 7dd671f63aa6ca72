"""The `bilevel` command line's help and version: readable at 80 columns, no option name cut."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import typer
from typer.core import TyperGroup, TyperOption
from typer.testing import CliRunner

from scheduler.cli import app

ROOT = Path(__file__).resolve().parents[2]
WIDTH = 80


def _commands() -> dict[str, typer.core.TyperCommand]:
    """Every command by the words that run it (`status`, `dlq replay`)."""
    group = typer.main.get_command(app)
    assert isinstance(group, TyperGroup)
    out: dict[str, typer.core.TyperCommand] = {}
    for name, command in group.commands.items():
        if isinstance(command, TyperGroup):
            out.update({f"{name} {sub}": leaf for sub, leaf in command.commands.items()})
        else:
            out[name] = command
    return out


def _option_names(command: typer.core.TyperCommand) -> list[str]:
    return [
        name
        for param in command.params
        if isinstance(param, TyperOption)
        for name in (*param.opts, *param.secondary_opts)
    ]


def _whole(name: str, text: str) -> bool:
    """`name` appears in `text` as a whole option name, not as the start of a cut one."""
    return re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", text) is not None


def test_every_command_is_listed() -> None:
    """The help lists every command a user reads about in the README."""
    assert set(_commands()) == {
        "demo", "evaluate", "promote", "record", "replay", "serve", "simulate", "status",
        "submit", "train", "tune",
        "jobs get", "jobs cancel", "jobs list",
        "dlq list", "dlq show", "dlq replay", "dlq purge",
    }  # fmt: skip


@pytest.mark.parametrize("command", sorted(_commands()))
def test_help_at_80_columns_shows_every_option_name_whole(command: str) -> None:
    """`bilevel CMD --help` at 80 columns: every option name whole, no line wider than 80."""
    result = CliRunner().invoke(
        app, [*command.split(), "--help"], env={"COLUMNS": str(WIDTH)}, terminal_width=WIDTH
    )
    assert result.exit_code == 0, result.output
    names = _option_names(_commands()[command])
    assert names, f"{command} has no options?"
    missing = [name for name in names if not _whole(name, result.output)]
    assert not missing, f"cut or missing in `{command} --help`: {missing}\n{result.output}"
    wide = [line for line in result.output.splitlines() if len(line) > WIDTH]
    assert not wide, wide
    assert "…" not in result.output


def test_train_help_in_a_real_process_at_80_columns() -> None:
    """`COLUMNS=80 python -m scheduler.cli train --help`, as a user runs it, in a pipe."""
    env = {**os.environ, "COLUMNS": str(WIDTH), "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-m", "scheduler.cli", "train", "--help"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=120, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("Usage: bilevel train")
    for name in _option_names(_commands()["train"]):
        assert _whole(name, out.stdout), name
    assert max(len(line) for line in out.stdout.splitlines()) <= WIDTH


def test_version_prints_the_package_version() -> None:
    """`bilevel --version` prints the installed version and exits 0 without running anything."""
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"bilevel {metadata.version('bilevel')}"
    top = CliRunner().invoke(app, ["--help"], terminal_width=WIDTH)
    assert _whole("--version", top.output)
