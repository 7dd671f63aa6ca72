"""Result tables at 80 columns, piped and in a terminal: every number whole, policies given as
checkpoint paths shown by a short label, names the only thing ever shortened."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
from fcntl import ioctl
from pathlib import Path
from typing import Any

import pytest
import yaml
from rich.console import Console
from typer.testing import CliRunner

from scheduler.checkpoints import default_checkpoint_path
from scheduler.cli import app
from scheduler.commands._tables import Column, fitted_table, policy_label

ROOT = Path(__file__).resolve().parents[2]
WIDTH = 80
CHECKPOINT = str(default_checkpoint_path())  # a long path, as a user's would be

SCENARIO = {
    "name": "lopsided_with_a_long_scenario_name",
    "queues": [
        {"name": "busy", "job_types": ["busy"], "service": {"kind": "exponential", "mean_s": 0.5},
         "model_load_s": 2.0, "slo_s": 2.0},
        {"name": "quiet", "job_types": ["quiet"],
         "service": {"kind": "exponential", "mean_s": 0.5}, "model_load_s": 2.0},
    ],
    "allocation": {"policy": "proportional", "tick_s": 1.0, "budget": 8, "initial": {"busy": 4, "quiet": 4}},
    "workload": {
        "generators": [{"kind": "poisson", "rate_per_s": 10.0, "mix": {"busy": 9, "quiet": 1}}]
    },
    "duration_s": 40.0,
}  # fmt: skip


@pytest.fixture
def scenario_file(tmp_path: Path) -> Path:
    path = tmp_path / "lopsided.yaml"
    path.write_text(yaml.safe_dump(SCENARIO))
    return path


def _whole(number: str, text: str) -> bool:
    """`number` appears in `text` with no digit, point or ellipsis glued to either side."""
    return re.search(rf"(?<![\d.…]){re.escape(number)}(?![\d.…])", text) is not None


def _assert_fits(text: str) -> None:
    wide = [line for line in text.splitlines() if len(line) > WIDTH]
    assert not wide, "\n".join(wide)


def _cli(*args: str) -> str:
    """stdout of the command at 80 columns, not a terminal (as in a pipe)."""
    result = CliRunner().invoke(app, list(args), env={"COLUMNS": str(WIDTH)})
    assert result.exit_code == 0, result.output
    return result.stdout


def _simulate_cells(r: dict[str, Any]) -> list[str]:
    """The numbers the simulate table shows for one JSON result, formatted as it shows them."""
    return [
        str(r["jobs"]), f"{r['mean_jct_s']:.3f}", f"{r['p50_jct_s']:.3f}", f"{r['p99_jct_s']:.3f}",
        f"{r['slo_attainment']:.1%}", f"{r['utilization']:.1%}", str(r["reconfigurations"]),
        f"{r['loading_worker_s']:.0f}", str(r["rejected"]),
    ]  # fmt: skip


def test_policy_labels_are_short_and_never_pass_for_a_heuristic() -> None:
    """Names stay; a checkpoint path becomes its stem, or its file name when the stem is taken."""
    known = ["static", "proportional", "learned"]
    assert policy_label("proportional", known) == "proportional"
    assert policy_label("learned", known) == "learned"
    assert policy_label("/home/me/runs/2024-06/ckpt/mine.pt", known) == "mine"
    assert policy_label("ckpt/mine", known) == "mine"
    assert policy_label("ckpt/static.pt", known) == "static.pt"
    assert policy_label("mine.pt", known) == "mine"


def test_fitting_cuts_names_only_and_widens_past_the_console_rather_than_cut_numbers() -> None:
    """At any width the number columns are as wide as their longest cell; only the name column
    is shortened; when even the shortest names leave no room, the table asks for more width."""
    columns = [Column("policy", "name"), *(Column(f"value {i}") for i in range(6))]
    rows = [["a_policy_with_a_very_long_name", *(f"{10**k + 0.5:.3f}" for k in range(6))]]
    for width in (200, 80, 60, 40):
        table, needed = fitted_table("t", columns, rows, width)
        console = Console(width=needed, record=True, file=open(os.devnull, "w"))  # noqa: SIM115
        console.print(table)
        shown = console.export_text()
        for cell in rows[0][1:]:
            assert _whole(cell, shown), (width, shown)
        assert needed == width or width < 60
        assert max(len(line) for line in shown.splitlines()) <= needed


def test_simulate_table_with_a_checkpoint_path_fits_80_columns_piped(scenario_file: Path) -> None:
    """`simulate --policy PATH.pt` piped at 80 columns: the label is the checkpoint's stem, the
    path is not in the table, and every number of the JSON result appears whole."""
    [r] = [json.loads(_cli("simulate", "--scenario", str(scenario_file), "--policy", CHECKPOINT,
                           "--json"))]  # fmt: skip
    table = _cli("simulate", "--scenario", str(scenario_file), "--policy", CHECKPOINT)
    _assert_fits(table)
    assert "default " in table
    assert CHECKPOINT not in table
    for cell in _simulate_cells(r):
        assert _whole(cell, table), (cell, table)


def test_simulate_compare_keeps_every_number_whole_at_80_columns(scenario_file: Path) -> None:
    """`simulate --compare` at 80 columns: every number of every heuristic's row is whole; an
    ellipsis, if any, is only ever in a row's first (name) cell."""
    results = json.loads(_cli("simulate", "--scenario", str(scenario_file), "--compare", "--json"))
    table = _cli("simulate", "--scenario", str(scenario_file), "--compare")
    _assert_fits(table)
    rows = {line.split()[0]: line for line in table.splitlines() if line.split()}
    for name, r in results.items():
        [line] = [line for first, line in rows.items() if name.startswith(first.rstrip("…"))]
        assert "…" not in line.split(maxsplit=1)[1]
        for cell in _simulate_cells(r):
            assert _whole(cell, line), (cell, line)


def _in_a_terminal(args: list[str], columns: int = WIDTH) -> str:
    """Output of `python -m scheduler.cli ARGS` run in a pseudo-terminal `columns` wide, with
    colour codes stripped."""
    main, secondary = pty.openpty()
    ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    env.update({"PYTHONPATH": str(ROOT), "TERM": "xterm"})
    proc = subprocess.Popen(
        [sys.executable, "-m", "scheduler.cli", *args],
        stdin=secondary, stdout=secondary, stderr=subprocess.DEVNULL, env=env, cwd=ROOT,
    )  # fmt: skip
    os.close(secondary)
    chunks = []
    try:
        while True:
            ready, _, _ = select.select([main], [], [], 120)
            if not ready:
                break
            try:
                chunk = os.read(main, 65536)
            except OSError:  # the terminal closed: the process is done
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(main)
        proc.wait(timeout=120)
    assert proc.returncode == 0
    text = b"".join(chunks).decode("utf-8", "replace").replace("\r\n", "\n")
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)


def test_simulate_table_with_a_checkpoint_path_fits_an_80_column_terminal(
    scenario_file: Path,
) -> None:
    """The same in a real (pseudo-)terminal 80 columns wide: fits, label, numbers whole."""
    [r] = [json.loads(_cli("simulate", "--scenario", str(scenario_file), "--policy", CHECKPOINT,
                           "--json"))]  # fmt: skip
    table = _in_a_terminal(["simulate", "--scenario", str(scenario_file), "--policy", CHECKPOINT])
    _assert_fits(table)
    assert "default " in table
    for cell in _simulate_cells(r):
        assert _whole(cell, table), (cell, table)


def test_evaluate_table_with_a_checkpoint_path_fits_80_columns(scenario_file: Path) -> None:
    """`evaluate --policy PATH.pt` at 80 columns: label, every mean ± CI of the JSON whole, the
    heuristics' parameters in their own table."""
    args = ["evaluate", "--scenario", str(scenario_file), "--policy", CHECKPOINT, "--seeds", "5"]
    payload = json.loads(_cli(*args, "--json"))["scenarios"][SCENARIO["name"]]
    table = _cli(*args)
    _assert_fits(table)
    assert CHECKPOINT not in table
    assert "gain of default over the best heuristic" in " ".join(table.split())
    stats = [payload["policy"], *payload["heuristics"].values()]
    for s in stats:
        for key in ("mean_jct_s", "p99_jct_s"):
            mean, half = s[key]["mean"], s[key]["ci95"]
            assert _whole(f"{mean:.3f} ± {half:.3f}", table), (key, table)
    assert "the heuristics' parameters" in table


def test_tune_table_fits_80_columns(scenario_file: Path) -> None:
    """`tune` at 80 columns: every heuristic's score whole, parameters wrapped, not cut."""
    args = ["tune", "--scenario", str(scenario_file), "--seeds", "1"]
    out = json.loads(_cli(*args, "--json"))[SCENARIO["name"]]
    table = _cli(*args)
    _assert_fits(table)
    assert "…" not in table
    for name, h in out["heuristics"].items():
        assert name in table
        best = [p for p in h["points"] if p["params"] == h["best"]]
        if best and best[0]["mean_sojourn_s"] is not None:
            assert _whole(f"{best[0]['mean_sojourn_s']:.4g}", table), (name, table)
