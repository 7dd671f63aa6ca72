"""Runs one peer in its own process and prints its result as one JSON object.

`python -m benchmarks.peers.runner NAME [--redis-url URL --redis-pid PID] [--rounds N]`; without
--redis-url it starts its own embedded Redis. bench_e2e calls `run_in_subprocess` for each peer, so
each peer's imports (Celery's app, Dramatiq's broker, Ray) live and die with its own process, and a
peer that hangs is ended after a bound with everything it started.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, suppress
from dataclasses import asdict
from pathlib import Path
from typing import Any

import redis

from benchmarks.peers import procstat
from benchmarks.peers.base import Peer
from benchmarks.peers.summary import median_of_rounds

REPO_ROOT = Path(__file__).resolve().parents[2]
# Module of each peer, in the order bench_e2e runs them.
PEER_MODULES: dict[str, str] = {
    "celery": "benchmarks.peers.celery",
    "dramatiq": "benchmarks.peers.dramatiq",
    "arq": "benchmarks.peers.arq",
    "rq": "benchmarks.peers.rq",
    "ray_serve": "benchmarks.peers.ray_serve",
    "bullmq": "benchmarks.peers.bullmq",
}
# Idle CPU is read over IDLE_S from IDLE_SETTLE_S after the last round's last result.
IDLE_SETTLE_S = 3.0
IDLE_S = 20.0
_LOG_TAIL_CHARS = 1500


def load_peer(name: str) -> Peer:
    if name not in PEER_MODULES:
        raise ValueError(f"unknown peer {name!r}; known: {', '.join(PEER_MODULES)}")
    peer: Peer = importlib.import_module(PEER_MODULES[name]).PEER
    return peer


def parse_peer_names(text: str) -> list[str]:
    """The comma-separated --peers list, checked; 'all' (or '') means every peer, 'none' none
    (bilevel alone, for a short run)."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if names == ["none"]:
        return []
    if not names or names == ["all"]:
        return list(PEER_MODULES)
    unknown = [n for n in names if n not in PEER_MODULES]
    if unknown:
        raise ValueError(f"unknown peer(s) {', '.join(unknown)}; known: {', '.join(PEER_MODULES)}")
    return list(dict.fromkeys(names))


def _log_tails(workdir: Path) -> dict[str, str]:
    return {
        log.name: log.read_text(errors="replace")[-_LOG_TAIL_CHARS:]
        for log in sorted(workdir.glob("*.log"))
    }


def _idle(served: list[procstat.ProcStat], redis_pid: int | None) -> dict[str, Any]:
    """Cores used over IDLE_S by the peer's processes, and by Redis serving them."""
    redis_stat = procstat.read_stat(redis_pid) if redis_pid is not None else None
    groups = {"peer": served, "redis": [redis_stat] if redis_stat is not None else []}
    used = procstat.idle_cpu(groups, IDLE_S)
    return {
        "idle_cpu_core_fraction": round(used["peer"], 4),
        "idle_processes": len(served),
        "redis_idle_cpu_core_fraction": round(used["redis"], 4) if redis_stat else None,
        "idle_window_s": IDLE_S,
    }


def run_peer(peer: Peer, redis_url: str, redis_pid: int | None, rounds: int) -> dict[str, Any]:
    """Measure `rounds` rounds and the idle CPU after them; the peer's settings beside."""
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")

    def described() -> dict[str, Any]:
        # Read after the run: a peer may add what it learnt starting (e.g. installed versions).
        return {"settings": dict(peer.settings), "load": asdict(peer.load)}

    reason = peer.unavailable()
    if reason is not None:
        return {"skipped": reason, **described()}
    redis.Redis.from_url(redis_url).flushdb()
    workdir = Path(tempfile.mkdtemp(prefix=f"blpeer-{peer.name}-", dir="/tmp"))
    started = time.perf_counter()
    try:
        with ExitStack() as stack:
            session = peer.start(redis_url, workdir, stack)
            results = [session.measure(peer.load) for _ in range(rounds)]
            time.sleep(IDLE_SETTLE_S)
            idle = _idle(session.idle_processes(), redis_pid)
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}", "logs": _log_tails(workdir), **described()}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return {
        **median_of_rounds(results),
        **idle,
        "wall_s": round(time.perf_counter() - started, 1),
        **described(),
    }


def parse_runner_output(stdout: str) -> dict[str, Any]:
    """The runner's result: the last line of its stdout that is a JSON object."""
    for line in reversed(stdout.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                parsed = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(parsed, dict):
                return parsed
    raise ValueError(f"no JSON object in the peer runner's output: {stdout[-300:]!r}")


def run_in_subprocess(
    name: str, redis_url: str, redis_pid: int | None, rounds: int, timeout_s: float
) -> dict[str, Any]:
    """Run one peer in a child process (its own session, so a hang is ended whole) and return
    its result, or an error naming what went wrong."""
    args = [sys.executable, "-m", "benchmarks.peers.runner", name, "--redis-url", redis_url,
            "--rounds", str(rounds)]  # fmt: skip
    if redis_pid is not None:
        args += ["--redis-pid", str(redis_pid)]
    path = os.pathsep.join(p for p in [str(REPO_ROOT), os.environ.get("PYTHONPATH", "")] if p)
    with tempfile.TemporaryFile() as stderr:
        process = subprocess.Popen(
            args,
            stdout=subprocess.PIPE,
            stderr=stderr,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONPATH": path},
            cwd=REPO_ROOT,
            start_new_session=True,
        )
        try:
            stdout, _ = process.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _end_group(process)
            return {"error": f"timed out after {timeout_s:.0f} s; everything it started ended"}
        stderr.seek(0)
        err = stderr.read().decode(errors="replace")
    try:
        result = parse_runner_output(stdout.decode(errors="replace"))
    except ValueError as exc:
        return {"error": f"runner exited {process.returncode}: {exc}; stderr: {err[-800:]}"}
    return result


def _end_group(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the runner's process group (the runner then stops its workers), SIGKILL it after
    a grace period."""
    os.killpg(process.pid, signal.SIGTERM)
    with suppress(subprocess.TimeoutExpired):
        process.wait(timeout=45)
    with suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("peer", choices=list(PEER_MODULES))
    parser.add_argument("--redis-url")
    parser.add_argument("--redis-pid", type=int)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    # A SIGTERM from bench_e2e unwinds the stack, so the workers are stopped by their PIDs.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    peer = load_peer(args.peer)
    if args.redis_url:
        result = run_peer(peer, args.redis_url, args.redis_pid, args.rounds)
    else:
        from scheduler.embedded_redis import EmbeddedRedis

        with EmbeddedRedis() as server:
            result = run_peer(peer, server.url, server.pid, args.rounds)
    print(json.dumps({"peer": args.peer, **result}))


if __name__ == "__main__":
    main()
