"""Output paths: refused before any work with one line naming the option and the path; a write
that fails at the end costs the file, not the printed results."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import typer
import yaml
from typer.testing import CliRunner

from scheduler.cli import app

ROOT = Path(__file__).resolve().parents[2]

TINY = {
    "name": "tiny",
    "queues": [
        {"name": q, "job_types": [q], "service": {"kind": "exponential", "mean_s": 0.5},
         "model_load_s": 2.0}
        for q in ("a", "b")
    ],
    "allocation": {"policy": "proportional", "tick_s": 1.0, "budget": 4},
    "workload": {"generators": [{"kind": "poisson", "rate_per_s": 4.0, "mix": {"a": 2, "b": 1}}]},
    "duration_s": 120.0,
}  # fmt: skip


@pytest.fixture
def scenario_file(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


def _bad_paths(tmp_path: Path) -> list[tuple[Path, str]]:
    """(path, what the message says) for paths no command may accept."""
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    return [
        (tmp_path / "nodir" / "x.png", "does not exist"),
        (a_file / "x.png", "not a directory"),
        (tmp_path, "is a directory"),
    ]


def _assert_refused(result: typer.testing.Result, option: str, path: Path, needle: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error: "), lines
    assert f"{option} {path}" in lines[0]
    assert needle in lines[0]


def test_simulate_refuses_a_bad_plot_path_before_running(
    scenario_file: Path, tmp_path: Path
) -> None:
    """`simulate --plot nodir/x.png` (and a file as directory, a directory, an extension
    matplotlib cannot write) exits 2 in one line, and no run happened (no table)."""
    cases = [*_bad_paths(tmp_path), (tmp_path / "x.txt", "extension .txt")]
    cases.append((tmp_path / "x", "no extension"))
    for path, needle in cases:
        result = CliRunner().invoke(
            app, ["simulate", "--scenario", str(scenario_file), "--plot", str(path)]
        )
        _assert_refused(result, "--plot", path, needle)
    assert not (tmp_path / "x.txt").exists()


def test_train_refuses_a_bad_out_path_before_training(scenario_file: Path, tmp_path: Path) -> None:
    """`train --out` under a file, or onto a directory, exits 2 in one line before any training;
    a missing directory is fine (it is created, as before)."""
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    (tmp_path / "ckpt.pt").mkdir()
    for out, shown, needle in (
        (a_file / "mine", a_file / "mine.pt", "not a directory"),
        (tmp_path / "ckpt", tmp_path / "ckpt.pt", "is a directory"),
    ):
        result = CliRunner().invoke(
            app,
            ["train", "--scenario", str(scenario_file), "--out", str(out), "--workers", "0",
             "--iterations", "1"],
        )  # fmt: skip
        _assert_refused(result, "--out", shown, needle)


def test_tune_refuses_a_module_path_in_a_missing_directory(
    scenario_file: Path, tmp_path: Path
) -> None:
    """`tune --write nodir/tuned.py` exits 2 in one line, before tuning."""
    target = tmp_path / "nodir" / "tuned.py"
    result = CliRunner().invoke(
        app, ["tune", "--scenario", str(scenario_file), "--write", str(target)]
    )
    _assert_refused(result, "--write", target, "does not exist")
    assert "tuning" not in result.output


def test_demo_refuses_a_bad_plot_path_before_starting_anything(tmp_path: Path) -> None:
    """`demo --plot nodir/x.png` exits 2 in one line, before Redis or Ray start."""
    for path, needle in _bad_paths(tmp_path):
        result = CliRunner().invoke(app, ["demo", "--plot", str(path)])
        _assert_refused(result, "--plot", path, needle)


def _limit_file_size() -> None:
    # A write past this many bytes fails with EFBIG (SIGXFSZ ignored, so it is an error, not a
    # kill): the plot passes every check and then cannot be written, as on a full disk.
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def test_a_plot_that_fails_at_the_end_leaves_the_results_printed(
    scenario_file: Path, tmp_path: Path
) -> None:
    """When writing the plot fails after the run, the table is printed first and the error is
    one line naming --plot and the path, exit 1, no traceback."""
    plot = tmp_path / "out.png"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "scheduler.cli", "simulate", "--scenario", str(scenario_file),
         "--plot", str(plot)],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=300, check=False,
        preexec_fn=_limit_file_size,
    )  # fmt: skip
    assert out.returncode == 1, out.stderr
    assert "tiny: 4 workers" in out.stdout
    assert "mean" in out.stdout
    errors = out.stderr.strip().splitlines()
    assert len(errors) == 1, out.stderr
    assert errors[0].startswith(f"error: --plot {plot}: could not write it")
    assert "Traceback" not in out.stderr
