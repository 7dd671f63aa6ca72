"""Simulator speed: our engine against SimPy on the same M/M/c model, and on the steady scenario.

Run `python -m benchmarks.bench_sim`; prints one JSON object. Our side goes through the same
scenario path as `bilevel simulate` (schema -> arrivals -> SimRun -> allocator), timed end to end
including drawing the arrivals and service times; SimPy's model is the textbook one (a source
process, one process per customer, `simpy.Resource` with `capacity=c`).
"""

from __future__ import annotations

import json
import math
import random
import time
from importlib import resources
from typing import Any

import simpy

from policies.sim.metrics import summarize
from policies.sim.scenario import make_allocator_for, make_router_for, parse_scenario, prepare

SERVERS = 4
RHO = 0.8
SERVICE_MEAN_S = 1.0
JOBS = 200_000
REPEATS = 3


def erlang_c_sojourn_s(arrival_rate: float, service_rate: float, servers: int) -> float:
    """Mean time in system of M/M/c."""
    a = arrival_rate / service_rate
    head = sum(a**k / math.factorial(k) for k in range(servers))
    tail = a**servers / math.factorial(servers) / (1 - a / servers)
    return tail / (head + tail) / (servers * service_rate - arrival_rate) + 1 / service_rate


def simpy_mmc(jobs: int, seed: int) -> tuple[float, float]:
    """(wall seconds, mean sojourn) of an idiomatic SimPy M/M/c run."""
    rnd = random.Random(seed)
    env = simpy.Environment()
    server = simpy.Resource(env, capacity=SERVERS)
    sojourns: list[float] = []
    arrival_rate = RHO * SERVERS / SERVICE_MEAN_S

    def customer(env: simpy.Environment) -> Any:
        arrived = env.now
        with server.request() as request:
            yield request
            yield env.timeout(rnd.expovariate(1 / SERVICE_MEAN_S))
        sojourns.append(env.now - arrived)

    def source(env: simpy.Environment) -> Any:
        for _ in range(jobs):
            yield env.timeout(rnd.expovariate(arrival_rate))
            env.process(customer(env))

    started = time.perf_counter()
    env.process(source(env))
    env.run()
    return time.perf_counter() - started, sum(sojourns) / len(sojourns)


def ours_mmc(jobs: int, seed: int) -> tuple[float, float]:
    """(wall seconds, mean sojourn) of the same model through the scenario path."""
    scenario = parse_scenario(
        {
            "name": "mmc",
            "queues": [
                {
                    "name": "q",
                    "job_types": ["j"],
                    "service": {"kind": "exponential", "mean_s": SERVICE_MEAN_S},
                }
            ],
            "allocation": {"policy": "static", "tick_s": 100.0, "budget": SERVERS},
            "workload": {
                "generators": [
                    {
                        "kind": "poisson",
                        "rate_per_s": RHO * SERVERS / SERVICE_MEAN_S,
                        "mix": {"j": 1},
                    }
                ]
            },
            "max_jobs": jobs,
            # A fixed pool has no decisions to make; ticks only cost views nobody reads.
        }
    )
    started = time.perf_counter()
    prepared = prepare(scenario, seed)
    record = prepared.start(make_router_for(scenario)).run(make_allocator_for(scenario))
    wall_s = time.perf_counter() - started
    return wall_s, summarize(record).jct.mean_s


def ours_steady(seed: int) -> dict[str, Any]:
    """The shipped steady scenario with its heuristic allocator, timed end to end."""
    text = (resources.files("policies") / "scenarios" / "steady.yaml").read_text()
    scenario = parse_scenario(text, source="steady.yaml")
    started = time.perf_counter()
    prepared = prepare(scenario, seed)
    record = prepared.start(make_router_for(scenario)).run(make_allocator_for(scenario))
    wall_s = time.perf_counter() - started
    summary = summarize(record)
    return {
        "jobs": summary.completed,
        "allocator": scenario.allocation.policy,
        "wall_s": wall_s,
        "jobs_per_s": summary.completed / wall_s,
    }


def main() -> None:
    expected_s = erlang_c_sojourn_s(RHO * SERVERS / SERVICE_MEAN_S, 1 / SERVICE_MEAN_S, SERVERS)
    # Best of a few repeats on each side, interleaved so both see the same machine load.
    simpy_runs = []
    ours_runs = []
    for r in range(REPEATS):
        simpy_runs.append(simpy_mmc(JOBS, seed=r))
        ours_runs.append(ours_mmc(JOBS, seed=r))
    simpy_wall_s, simpy_mean_s = min(simpy_runs)
    ours_wall_s, ours_mean_s = min(ours_runs)
    steady = max((ours_steady(seed=r) for r in range(REPEATS)), key=lambda d: d["jobs_per_s"])
    result = {
        "mmc": {
            "servers": SERVERS,
            "rho": RHO,
            "jobs": JOBS,
            "erlang_c_mean_sojourn_s": expected_s,
            "simpy_jobs_per_s": JOBS / simpy_wall_s,
            "simpy_mean_sojourn_s": simpy_mean_s,
            "ours_jobs_per_s": JOBS / ours_wall_s,
            "ours_mean_sojourn_s": ours_mean_s,
            "speedup": simpy_wall_s / ours_wall_s,
        },
        "steady": steady,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
