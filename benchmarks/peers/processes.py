"""Worker processes a peer starts: started here, stopped here, by PID.

A worker runs in the peer runner's process group, so when the runner itself must be ended (bench
timeout) the bench ends the whole group; the normal path is `stop`, which signals the started
process, waits for its own shutdown, then kills any of its descendants that outlived it.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Mapping
from contextlib import ExitStack, suppress
from pathlib import Path

from benchmarks.peers import procstat

STOP_GRACE_S = 15.0
REPO_ROOT = Path(__file__).resolve().parents[2]
CORES = os.cpu_count() or 1


def worker_env(redis_url: str) -> dict[str, str]:
    """The environment of a Python worker: this checkout importable, the Redis to serve."""
    path = os.pathsep.join(p for p in [str(REPO_ROOT), os.environ.get("PYTHONPATH", "")] if p)
    return {**os.environ, "PYTHONPATH": path, "BENCH_REDIS_URL": redis_url}


def start(
    stack: ExitStack,
    args: list[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    log: Path | None = None,
) -> subprocess.Popen[bytes]:
    """Start args (output to `log`, or discarded) and register its stop on the stack."""
    out = open(log, "ab") if log is not None else subprocess.DEVNULL  # noqa: SIM115 (closed below)
    process = subprocess.Popen(
        args,
        env=None if env is None else dict(env),
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=out,
        stderr=subprocess.STDOUT,
    )
    if log is not None:
        stack.callback(out.close)  # type: ignore[union-attr]
    stack.callback(stop, process)
    return process


def stop(process: subprocess.Popen[bytes], grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM the process (its own shutdown stops its pool), SIGKILL it after grace_s, then
    SIGKILL every descendant seen before the stop that is still the same process."""
    descendants = procstat.tree([process.pid])[1:]
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    for stat in descendants:
        if procstat.still_same(stat) is not None:
            with suppress(ProcessLookupError):
                os.kill(stat.pid, signal.SIGKILL)
