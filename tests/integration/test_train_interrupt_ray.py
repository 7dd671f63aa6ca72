"""Ctrl-C in `bilevel train` with its rollouts on a local Ray: the signal reaches the whole
process group, as in a terminal, and the run still stops cleanly and keeps its best policy."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from scheduler.checkpoints import load_checkpoint
from tests.train_process import FAST, group_gone, signal_when


@pytest.mark.slow
def test_ctrl_c_to_the_process_group_stops_ray_training_and_writes_the_checkpoint(
    tmp_path: Path,
) -> None:
    """SIGINT to the group (driver and Ray's processes) after a validation: exit 130, the
    checkpoint loads, and nothing of the group is left running."""
    out = tmp_path / "mine"
    run = signal_when(
        tmp_path, out, "iteration 1: validated", signal.SIGINT, "--workers", "1", *FAST
    )
    assert run.returncode == 130, run.stderr
    assert f"checkpoint: {out.with_suffix('.pt')}" in run.stdout
    _, meta = load_checkpoint(out.with_suffix(".pt"))
    assert meta["stopped_early"]["signal"] == "SIGINT"
    assert "Traceback" not in run.stderr
    assert group_gone(run.pid), "processes of the training run outlived it"
