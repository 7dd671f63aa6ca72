"""`bilevel train` run as a user runs it: `python -m scheduler.cli train` in its own process group
(as a terminal's foreground job is, so a signal to the group is Ctrl-C), its stderr read line by
line, so a test can signal it at a known stage."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
# Upper bound on any wait for the training process (it is killed past it): no test hangs.
BOUND_S = 300.0

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
# A validation every iteration, each a few seconds: training reaches one quickly.
FAST = ["--eval-every", "1", "--eval-seeds", "1", "--no-forecast", "--minutes", "10"]


@dataclass
class Run:
    """How a training process ended."""

    returncode: int
    stdout: str
    stderr_lines: list[str]
    # The process's id, which is also its process group's.
    pid: int

    @property
    def stderr(self) -> str:
        return "".join(self.stderr_lines)


@contextmanager
def training(
    tmp_path: Path, out: Path, *extra: str
) -> Iterator[tuple[subprocess.Popen[str], queue.Queue[str | None]]]:
    """The training process on TINY and a queue of its stderr lines (None at the end); the
    process group is killed if still there at the end."""
    scenario = tmp_path / "tiny.yaml"
    scenario.write_text(yaml.safe_dump(TINY))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "scheduler.cli", "train", "--scenario", str(scenario),
               "--out", str(out), *extra]  # fmt: skip
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
        start_new_session=True,
    )  # fmt: skip
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.put(line)
        lines.put(None)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        yield proc, lines
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        reader.join(timeout=10)


def wait_for(lines: queue.Queue[str | None], needle: str, seen: list[str]) -> None:
    """Reads stderr lines into `seen` until one contains `needle`."""
    while True:
        line = lines.get(timeout=BOUND_S)
        assert line is not None, f"training ended before printing {needle!r}:\n{''.join(seen)}"
        seen.append(line)
        if needle in line:
            return


def finish(proc: subprocess.Popen[str], lines: queue.Queue[str | None], seen: list[str]) -> Run:
    """Waits for the process to end and reads the rest of its output."""
    assert proc.stdout is not None
    stdout = proc.stdout.read()
    returncode = proc.wait(timeout=BOUND_S)
    while (line := lines.get(timeout=BOUND_S)) is not None:
        seen.append(line)
    return Run(returncode, stdout, seen, proc.pid)


def signal_when(tmp_path: Path, out: Path, needle: str, signum: int, *extra: str) -> Run:
    """Starts training, sends `signum` to its process group once stderr shows `needle`, and
    returns how it ended."""
    with training(tmp_path, out, *extra) as (proc, lines):
        seen: list[str] = []
        wait_for(lines, needle, seen)
        os.killpg(proc.pid, signum)
        return finish(proc, lines, seen)


def group_gone(pgid: int, bound_s: float = 60.0) -> bool:
    """Whether every process of group `pgid` has exited, waiting up to `bound_s` for stragglers
    (processes a shutdown has signalled take a moment to go); kills what is left, either way."""
    deadline = time.monotonic() + bound_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    os.killpg(pgid, signal.SIGKILL)
    return False
