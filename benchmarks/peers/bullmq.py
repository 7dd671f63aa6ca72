"""BullMQ (Node.js), when node and npm are on PATH: installed from the npm registry into a temp
dir for this run, one worker process per core, a Node producer measuring each round.

The producer (bullmq/producer.js) runs the same protocol as the Python harness and prints the
round as one JSON line; the round-trip percentiles are computed here from its raw samples, with
the same rule as every other peer.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path
from typing import Any

from benchmarks.peers import processes, procstat
from benchmarks.peers.base import Load, RoundResult, Session
from benchmarks.peers.harness import percentiles_ms

HERE = Path(__file__).resolve().parent / "bullmq"
# What npm installs; the versions it resolved are reported with the result.
PACKAGES = ["bullmq@6.7.0", "ioredis@5"]
QUEUE = "bench"
# Two worker processes (one per core: Node runs a process's JavaScript on one thread) with 16 jobs
# in flight each: a no-op job's time is all Redis round trips (moveToActive, moveToFinished), which
# concurrency overlaps; BullMQ's guide recommends several workers over one.
CONCURRENCY = 16
NPM_TIMEOUT_S = 300.0


def parse_producer_output(stdout: str) -> RoundResult:
    """The round from producer.js's stdout: its last line, a JSON object with the two rates and
    the raw round-trip samples in seconds."""
    lines = [line for line in stdout.strip().splitlines() if line.strip()]
    if not lines:
        raise ValueError("BullMQ producer printed nothing")
    try:
        data = json.loads(lines[-1])
    except json.JSONDecodeError as exc:
        raise ValueError(f"BullMQ producer's last line is not JSON: {lines[-1][:200]!r}") from exc
    missing = {"batched_jobs_per_s", "individual_jobs_per_s", "round_trip_samples_s"} - set(data)
    if missing:
        raise ValueError(f"BullMQ producer's output lacks {', '.join(sorted(missing))}")
    p50, p99 = percentiles_ms([float(s) for s in data["round_trip_samples_s"]])
    return RoundResult(
        round(float(data["batched_jobs_per_s"])),
        round(float(data["individual_jobs_per_s"])),
        p50,
        p99,
    )


def installed_versions(node_modules: Path) -> dict[str, str]:
    """Each installed top-level package's version, from its package.json."""
    out = {}
    for spec in PACKAGES:
        name = spec.rsplit("@", 1)[0]
        manifest = json.loads((node_modules / name / "package.json").read_text())
        out[name] = str(manifest["version"])
    return out


class _Session:
    def __init__(
        self, workdir: Path, redis_url: str, workers: list[subprocess.Popen[bytes]]
    ) -> None:
        self._workdir = workdir
        self._redis_url = redis_url
        self._workers = workers

    def measure(self, load: Load) -> RoundResult:
        config: Mapping[str, Any] = {"url": self._redis_url, "queue": QUEUE, **asdict(load)}
        done = subprocess.run(
            ["node", "producer.js", json.dumps(config)],
            cwd=self._workdir,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"BullMQ producer exited {done.returncode}: {done.stderr[-800:]}")
        return parse_producer_output(done.stdout)

    def idle_processes(self) -> list[procstat.ProcStat]:
        return procstat.tree(w.pid for w in self._workers)


class BullMQPeer:
    name = "bullmq"
    settings: Mapping[str, str] = {
        "workers": f"{processes.CORES} node processes x concurrency {CONCURRENCY}: a process per "
        "core (Node runs JavaScript on one thread); concurrency overlaps the Redis round trips "
        "that are all of a no-op job's time; BullMQ recommends several workers over one",
        "jobs": "removeOnComplete after 3600 s (BullMQ's advice to auto-remove in production); "
        "return values read by job.waitUntilFinished through QueueEvents (a Redis stream)",
        "delivery": "locks renewed while a job runs, stalled jobs moved back (at-least-once, "
        "as bilevel's leases)",
        "clients": "16 async functions in one Node producer sharing its Queue",
        "batch API": "Queue.addBulk of 100 jobs (sent to Redis in one pipeline)",
        "install": "npm install " + " ".join(PACKAGES) + " into this run's temp dir",
    }
    load = Load()

    def unavailable(self) -> str | None:
        for tool in ("node", "npm"):
            if shutil.which(tool) is None:
                return f"{tool} not found"
        return None

    def start(self, redis_url: str, workdir: Path, stack: ExitStack) -> Session:
        for script in ("worker.js", "producer.js"):
            shutil.copy(HERE / script, workdir / script)
        npm = subprocess.run(
            [
                "npm",
                "install",
                "--prefix",
                str(workdir),
                "--no-audit",
                "--no-fund",
                "--loglevel=error",
                *PACKAGES,
            ],
            capture_output=True,
            text=True,
            timeout=NPM_TIMEOUT_S,
            check=False,
        )
        if npm.returncode != 0:
            raise RuntimeError(f"npm install {' '.join(PACKAGES)} failed: {npm.stderr[-800:]}")
        self.settings = {
            **type(self).settings,
            "versions": json.dumps(installed_versions(workdir / "node_modules")),
        }
        workers = [
            processes.start(
                stack,
                ["node", "worker.js", redis_url, QUEUE, str(CONCURRENCY)],
                cwd=workdir,
                log=workdir / f"bullmq-worker-{i}.log",
            )
            for i in range(processes.CORES)
        ]
        return _Session(workdir, redis_url, workers)


PEER = BullMQPeer()
