"""End-to-end no-op jobs through the live service: client → router → queue → worker → result.

Prints one JSON object. Run: `python -m benchmarks.bench_e2e [--peers celery,dramatiq,...]
[--rounds N]` (or `make bench`). Starts its own embedded Redis and local Ray and stops both; then
the same kind of load goes through each peer (benchmarks/peers/: Celery, Dramatiq, arq, RQ, Ray
Serve, BullMQ), each with its recommended production settings on as many cores, on the same Redis
server, each in its own process and bounded in time; the JSON ends with bilevel / best peer for
every metric.

`--recording` runs only the cost of the recording (Settings.record) end to end: two services on
one Ray and one Redis, the recording on in one and off in the other, driven in alternating rounds
of batched no-op jobs; it prints both throughputs and the overhead.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import psutil

from benchmarks.common import REPO_ROOT, bench_ray, commit
from benchmarks.targets import redis_cpu_s, target
from scheduler.client import AsyncClient, AsyncJobHandle, JobRequest
from scheduler.config import ServiceConfig
from scheduler.embedded_redis import EmbeddedRedis
from scheduler.logs import configure_logging

WORKERS = 2
N_BATCHED = 20_000
N_INDIVIDUAL = 8_000
INDIVIDUAL_CLIENTS = 16
N_ROUND_TRIP = 500
# Idle CPU is measured over IDLE_S after IDLE_SETTLE_S with no load (the controller notices the
# quiet within a tick); IDLE_S spans several of the controller's idle full ticks.
IDLE_SETTLE_S = 3.0
IDLE_S = 60.0


def bench_config(redis_url: str, *, namespace: str = "bench", record: bool = True) -> ServiceConfig:
    return ServiceConfig.from_mapping(
        {
            "store": {"namespace": namespace, "redis_url": redis_url, "record": record},
            "handlers": ["benchmarks.noop_handlers"],
            "queues": [{"name": "noop", "job_types": ["noop"], "min_workers": WORKERS}],
            "routing": {"policy": "rule", "batch_size": 1000},
            "allocation": {"policy": "static", "budget": WORKERS, "tick_s": 1.0},
            "worker": {"max_batch": 256, "num_cpus": 0.25},
        },
        source="bench_e2e",
    )


async def _wait_all(client: AsyncClient, handles: list[AsyncJobHandle]) -> None:
    await client.gather(handles, timeout=120)


async def _batched(client: AsyncClient, n: int = N_BATCHED) -> float:
    started = time.perf_counter()
    handles: list[AsyncJobHandle] = []
    for i in range(0, n, 100):
        handles += await client.submit_many([JobRequest("noop", j) for j in range(i, i + 100)])
    await _wait_all(client, handles)
    return n / (time.perf_counter() - started)


async def _individual(client: AsyncClient) -> float:
    per_client = N_INDIVIDUAL // INDIVIDUAL_CLIENTS

    async def one_client(c: int) -> list[AsyncJobHandle]:
        return [await client.submit("noop", c * per_client + i) for i in range(per_client)]

    started = time.perf_counter()
    groups = await asyncio.gather(*(one_client(c) for c in range(INDIVIDUAL_CLIENTS)))
    await _wait_all(client, [h for g in groups for h in g])
    return per_client * INDIVIDUAL_CLIENTS / (time.perf_counter() - started)


async def _with_redis_cpu(
    client: AsyncClient, phase: Callable[[AsyncClient], Awaitable[float]], jobs: int
) -> tuple[float, float]:
    """The phase's jobs/s, and Redis CPU microseconds per job over it: everything the service
    asked of Redis meanwhile (routing, leases, heartbeats, the controller's ticks) counts."""
    before_s = await redis_cpu_s(client.store.redis)
    jobs_per_s = await phase(client)
    return jobs_per_s, (await redis_cpu_s(client.store.redis) - before_s) * 1e6 / jobs


async def _round_trips(client: AsyncClient) -> dict[str, float]:
    samples = []
    for i in range(N_ROUND_TRIP):
        t0 = time.perf_counter()
        await (await client.submit("noop", i)).result(timeout=30)
        samples.append(time.perf_counter() - t0)
    samples.sort()
    return {
        "p50_ms": round(statistics.median(samples) * 1000, 3),
        "p99_ms": round(samples[int(len(samples) * 0.99) - 1] * 1000, 3),
    }


def _service_processes(ray_temp_dir: str) -> list[psutil.Process]:
    """This run's actor processes, which Ray titles ray::<Class>: the control plane (router and
    controller) and the model workers; children of this run's raylet (started in its temp dir),
    so another Ray on the machine is not counted."""
    out = []
    for proc in psutil.process_iter(["name", "cmdline"]):
        title = " ".join(proc.info["cmdline"] or [])
        if not title.startswith(("ray::ControlPlane", "ray::ModelWorkerShell")):
            continue
        with contextlib.suppress(psutil.Error, AttributeError):
            if ray_temp_dir in " ".join(proc.parent().cmdline()):
                out.append(proc)
    return out


def _cpu_s(procs: list[psutil.Process]) -> float:
    return sum(p.cpu_times().user + p.cpu_times().system for p in procs)


def _idle_cpu(ray_temp_dir: str, redis_pid: int | None) -> dict[str, Any]:
    """Core fractions used by the idle service's processes, and by Redis serving them."""
    time.sleep(IDLE_SETTLE_S)
    procs = _service_processes(ray_temp_dir)
    redis = [psutil.Process(redis_pid)] if redis_pid is not None else []
    before, redis_before = _cpu_s(procs), _cpu_s(redis)
    time.sleep(IDLE_S)
    return {
        "idle_cpu_core_fraction": round((_cpu_s(procs) - before) / IDLE_S, 4),
        "redis_idle_cpu_core_fraction": round((_cpu_s(redis) - redis_before) / IDLE_S, 4),
        "service_processes": len(procs),
    }


def _bilevel(redis_url: str, redis_pid: int | None) -> dict[str, Any]:
    from scheduler.service.runner import start_service

    with bench_ray() as ray_temp_dir, start_service(bench_config(redis_url)) as service:

        async def drive() -> dict[str, Any]:
            async with AsyncClient(service.redis_url, settings=service.config.store) as c:
                await _wait_all(c, [await c.submit("noop", 0)])  # warm up: workers ready
                batched, batched_us = await _with_redis_cpu(c, _batched, N_BATCHED)
                individual_jobs = N_INDIVIDUAL // INDIVIDUAL_CLIENTS * INDIVIDUAL_CLIENTS
                individual, individual_us = await _with_redis_cpu(c, _individual, individual_jobs)
                return {
                    "batched_jobs_per_s": round(batched),
                    "individual_jobs_per_s": round(individual),
                    "individual_clients": INDIVIDUAL_CLIENTS,
                    "redis_cpu_us_per_job": {
                        "batched": round(batched_us, 1),
                        "individual": round(individual_us, 1),
                    },
                    "round_trip": await _round_trips(c),
                }

        result = asyncio.run(drive())
        result.update(_idle_cpu(ray_temp_dir, redis_pid))
    return {"setup": f"{WORKERS} ModelWorker actors, rule router, static allocation", **result}


# Rounds per setting of the recording comparison, and jobs per round.
RECORDING_ROUNDS = 7
N_RECORDING = 10_000


def _recording(redis_url: str, redis_pid: int | None) -> dict[str, Any]:
    """Batched throughput of two services alike but for Settings.record, rounds alternating so
    that other load on the machine falls on both alike; medians, and the overhead. Also the CPU
    seconds per job of the service's processes and Redis (the one idle meanwhile included, alike
    for both): on a machine shared with other work, wall-clock throughput swings with its load,
    while CPU per job hardly does, and bounds throughput once the cores are saturated."""
    from scheduler.service.runner import start_service

    samples: dict[bool, list[float]] = {True: [], False: []}
    cpu_us: dict[bool, list[float]] = {True: [], False: []}
    # Redis's share of it: the recording adds work only there (the services run the same code
    # either way), so a difference in the services' CPU per job is the machine's noise.
    redis_us: dict[bool, list[float]] = {True: [], False: []}
    with bench_ray() as ray_temp_dir:
        configs = {
            record: bench_config(redis_url, namespace=f"bench-record-{record}", record=record)
            for record in (True, False)
        }
        with start_service(configs[True]) as on, start_service(configs[False]) as off:

            async def drive() -> None:
                clients = {
                    True: AsyncClient(on.redis_url, settings=on.config.store),
                    False: AsyncClient(off.redis_url, settings=off.config.store),
                }
                try:
                    for c in clients.values():
                        await c.connect()
                        await _wait_all(c, [await c.submit("noop", 0)])  # workers ready
                    procs = _service_processes(ray_temp_dir)
                    redis = [psutil.Process(redis_pid)] if redis_pid is not None else []
                    procs += redis
                    for _ in range(RECORDING_ROUNDS):
                        for record in (False, True):
                            before_s, redis_before_s = _cpu_s(procs), _cpu_s(redis)
                            samples[record].append(await _batched(clients[record], N_RECORDING))
                            cpu_us[record].append((_cpu_s(procs) - before_s) * 1e6 / N_RECORDING)
                            redis_us[record].append(
                                (_cpu_s(redis) - redis_before_s) * 1e6 / N_RECORDING
                            )
                finally:
                    for c in clients.values():
                        await c.close()

            asyncio.run(drive())
    on_s, off_s = statistics.median(samples[True]), statistics.median(samples[False])
    on_us, off_us = statistics.median(cpu_us[True]), statistics.median(cpu_us[False])
    redis_on, redis_off = statistics.median(redis_us[True]), statistics.median(redis_us[False])
    return {
        "batched_jobs_per_s": {"record_off": round(off_s), "record_on": round(on_s)},
        "overhead_pct": round(100.0 * (off_s - on_s) / off_s, 1),
        "cpu_us_per_job": {"record_off": round(off_us, 1), "record_on": round(on_us, 1)},
        "cpu_overhead_pct": round(100.0 * (on_us - off_us) / off_us, 1),
        "redis_cpu_us_per_job": {
            "record_off": round(redis_off, 1),
            "record_on": round(redis_on, 1),
        },
        # What the recording costs on cores that are saturated: Redis's added CPU per job over
        # the whole CPU per job with the recording off (the bound on the throughput lost).
        "redis_added_cpu_pct_of_total": round(100.0 * (redis_on - redis_off) / off_us, 1),
        "rounds": RECORDING_ROUNDS,
        "jobs_per_round": N_RECORDING,
        "samples_jobs_per_s": {
            "record_off": [round(x) for x in samples[False]],
            "record_on": [round(x) for x in samples[True]],
        },
        "samples_cpu_us_per_job": {
            "record_off": [round(x, 1) for x in cpu_us[False]],
            "record_on": [round(x, 1) for x in cpu_us[True]],
        },
    }


def main_recording() -> dict[str, Any]:
    os.environ.setdefault("PYTHONPATH", str(REPO_ROOT))
    with EmbeddedRedis() as server:
        before = os.getloadavg()[0]
        recording = _recording(server.url, server.pid)
        after = os.getloadavg()[0]
        redis_version = _redis_version(server.url)
    return {
        "benchmark": "e2e_recording_overhead",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": commit(),
        "cores": os.cpu_count(),
        "redis_version": redis_version,
        "setup": f"{WORKERS} ModelWorker actors per service, rule router, static allocation",
        "load_average_1m": [round(before, 2), round(after, 2)],
        "recording": recording,
    }


def _redis_version(redis_url: str) -> str:
    import redis

    return str(redis.Redis.from_url(redis_url).info("server")["redis_version"])


def _peer_timeout_s(rounds: int) -> float:
    # Start-up (npm install, Ray), the rounds, the idle window and the stop, with room to spare.
    return 240.0 + 150.0 * rounds


def main(peers: list[str] | None = None, rounds: int = 3) -> dict[str, Any]:
    from benchmarks.peers.runner import PEER_MODULES, run_in_subprocess
    from benchmarks.peers.summary import ratio_table

    os.environ.setdefault("PYTHONPATH", str(REPO_ROOT))
    names = list(PEER_MODULES) if peers is None else peers
    # The machine's 1-minute load average as each part starts and ends: on a shared machine it
    # says which figures ran beside other work.
    load_average: dict[str, list[float]] = {}
    with EmbeddedRedis() as server:
        redis_version = _redis_version(server.url)
        before = os.getloadavg()[0]
        ours = _bilevel(server.url, server.pid)
        load_average["bilevel"] = [before, os.getloadavg()[0]]
        results = {}
        for name in names:
            before = os.getloadavg()[0]
            results[name] = run_in_subprocess(
                name, server.url, server.pid, rounds, _peer_timeout_s(rounds)
            )
            load_average[name] = [before, os.getloadavg()[0]]
            for problem in ("skipped", "error"):
                if problem in results[name]:
                    print(f"bench_e2e: {name} {problem}: {results[name][problem]}", file=sys.stderr)
    measured = {n: r for n, r in results.items() if "skipped" not in r and "error" not in r}
    ratios = ratio_table(ours, measured)
    return {
        "benchmark": "e2e_noop",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": commit(),
        "command": " ".join(["python -m benchmarks.bench_e2e", *sys.argv[1:]]),
        "cores": os.cpu_count(),
        "redis_version": redis_version,
        "peer_rounds": rounds,
        "load_average_1m": {
            part: [round(x, 2) for x in pair] for part, pair in load_average.items()
        },
        "bilevel": ours,
        "peers": results,
        "ratios": ratios,
        "targets": targets(ours, measured, ratios),
    }


# Issue 19's end-to-end targets.
REDIS_CPU_US_BATCHED = 15.0
REDIS_CPU_US_INDIVIDUAL = 60.0
ROUND_TRIP_P99_MS = 3.0
OVER_BEST_PEER = 2.0
IDLE_CORE_FRACTION = 0.005


def targets(
    ours: dict[str, Any], peers: dict[str, dict[str, Any]], ratios: dict[str, Any]
) -> dict[str, Any]:
    """Issue 19's targets against this run's figures; those measured against peers use the peers
    of the same run (a peer that did not run leaves its target unmeasured, not met)."""
    cpu = ours["redis_cpu_us_per_job"]
    bullmq = peers.get("bullmq", {}).get("round_trip", {}).get("p50_ms")
    out = {
        "redis_cpu_us_per_job_batched": target(REDIS_CPU_US_BATCHED, cpu["batched"]),
        "redis_cpu_us_per_job_individual": target(REDIS_CPU_US_INDIVIDUAL, cpu["individual"]),
        "round_trip_p50_ms_vs_bullmq": target(
            bullmq,
            ours["round_trip"]["p50_ms"],
            note="target: BullMQ's p50 in this run"
            if bullmq is not None
            else "BullMQ did not run (needs node and npm, and --peers to include it)",
        ),
        "round_trip_p99_ms": target(ROUND_TRIP_P99_MS, ours["round_trip"]["p99_ms"]),
    }
    for metric in ("batched_jobs_per_s", "individual_jobs_per_s"):
        row = ratios.get(metric)
        out[f"{metric}_over_best_peer"] = target(
            OVER_BEST_PEER,
            None if row is None else row["bilevel_over_best"],
            at_most=False,
            note="no peer measured in this run"
            if row is None
            else f"best peer: {row['best_peer']} at {row['best_peer_value']:g}",
        )
    out["idle_cpu_core_fraction"] = target(IDLE_CORE_FRACTION, ours["idle_cpu_core_fraction"])
    return out


def _args(argv: list[str] | None = None) -> argparse.Namespace:
    from benchmarks.peers.runner import parse_peer_names

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--peers",
        default="all",
        help="comma-separated subset of celery,dramatiq,arq,rq,ray_serve,bullmq, or none "
        "(default: all)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds per peer (median reported)")
    parser.add_argument(
        "--recording",
        action="store_true",
        help="only the recording's cost: bilevel with Settings.record on and off",
    )
    args = parser.parse_args(argv)
    try:
        args.peers = parse_peer_names(args.peers)
    except ValueError as exc:
        parser.error(str(exc))
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    return args


if __name__ == "__main__":
    cli = _args()
    # The service's log lines go to stderr, warnings only: stdout is the one JSON object.
    configure_logging(level="warning")
    print(json.dumps(main_recording() if cli.recording else main(cli.peers, cli.rounds)))
