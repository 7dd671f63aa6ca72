"""Measure the live service's own overheads on this machine: the numbers of a `Calibration`.

`measure_overheads()` starts a probe service (two queues, one synthetic worker, MaxWeight at a
0.1 s tick, embedded Redis, local Ray unless Ray already runs) and measures:

- dispatch: jobs submitted one at a time to an idle worker; created_s -> started_s (submit,
  ingress, router batch, enqueue, the worker's wake-up and lease);
- job overhead: a burst of jobs on one worker; the time between consecutive completions minus
  the service time each job slept (report, next lease, handler-thread hand-off, sleep overshoot);
- switch: jobs sent only to the queue without the worker; the controller's decision to move it
  (the allocation history's t_s) -> the first of those jobs started, minus the model load the
  worker slept. The tick's own housekeeping before the decision (store stats, pool view) comes on
  top of this in the live service; it is a few milliseconds and is left out.

Each overhead is the mean of its samples: the simulator adds a constant per job, and a mean JCT
or a queue's capacity follows the mean overhead, stalls of a shared machine included. The median
and the spread are returned beside it.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import statistics
from dataclasses import dataclass
from typing import Any

from policies.sim.calibration import Calibration
from policies.sim.scenario import parse_scenario, prepare
from policies.sim2real import plan_replay
from scheduler.client import AsyncClient, JobRequest
from scheduler.keys import Keys
from scheduler.models import Job
from scheduler.service.live_replay import replay_service
from scheduler.settings import Settings

# Model-load seconds of the probe queues (slept by the worker on every switch).
PROBE_LOAD_S = 0.2
PROBE_TICK_S = 0.1


def _probe_scenario() -> dict[str, Any]:
    queue = {"service": {"kind": "constant", "mean_s": 0.01}, "model_load_s": PROBE_LOAD_S}
    return {
        "name": "overhead_probe",
        "queues": [
            {"name": "probe_a", "job_types": ["probe_a"], **queue},
            {"name": "probe_b", "job_types": ["probe_b"], **queue},
        ],
        "allocation": {"policy": "maxweight", "tick_s": PROBE_TICK_S, "budget": 1},
        # Only probe_a jobs: the worker starts there.
        "workload": {"generators": [{"kind": "poisson", "rate_per_s": 1.0, "mix": {"probe_a": 1}}]},
        "duration_s": 5.0,
    }


@dataclass(frozen=True)
class Samples:
    """One overhead's samples in seconds, summarised."""

    values: tuple[float, ...]

    @property
    def median_s(self) -> float:
        return statistics.median(self.values) if self.values else 0.0

    @property
    def mean_s(self) -> float:
        return statistics.fmean(self.values) if self.values else 0.0

    def to_dict(self) -> dict[str, Any]:
        v = sorted(self.values)
        return {
            "n": len(v),
            "median_s": self.median_s,
            "mean_s": self.mean_s if v else None,
            "p10_s": v[len(v) // 10] if v else None,
            "p90_s": v[(9 * len(v)) // 10] if v else None,
        }


@dataclass(frozen=True)
class Overheads:
    """What `measure_overheads` measured."""

    dispatch: Samples
    job_overhead: Samples
    switch: Samples

    def calibration(self) -> Calibration:
        """The means as a Calibration."""
        return Calibration(
            dispatch_s=round(max(self.dispatch.mean_s, 0.0), 4),
            job_overhead_s=round(max(self.job_overhead.mean_s, 0.0), 4),
            switch_s=round(max(self.switch.mean_s, 0.0), 4),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "dispatch": self.dispatch.to_dict(),
            "job_overhead": self.job_overhead.to_dict(),
            "switch": self.switch.to_dict(),
            "calibration": self.calibration().model_dump(),
        }


def _payload(service_s: float) -> dict[str, float]:
    return {"service_s": service_s}


async def _isolated(client: AsyncClient, n: int) -> list[float]:
    """created -> started of jobs that each find the worker idle."""
    out = []
    for _ in range(n):
        handle = await client.submit("probe_a", _payload(0.001))
        await handle.result(timeout=30)
        job = await handle.info()
        if job.started_s is not None:
            out.append(job.started_s - job.created_s)
        await asyncio.sleep(0.02)
    return out


async def _burst(client: AsyncClient, n: int, service_s: float) -> list[float]:
    """Gaps between consecutive completions of a burst on one worker, minus the service time."""
    handles = await client.submit_many([JobRequest("probe_a", _payload(service_s))] * n)
    await client.gather(handles, timeout=60)
    jobs: list[Job] = list(await asyncio.gather(*(h.info() for h in handles)))
    finishes = sorted(j.finished_s for j in jobs if j.finished_s is not None)
    return [b - a - service_s for a, b in itertools.pairwise(finishes)]


async def _switches(client: AsyncClient, rounds: int, namespace: str) -> list[float]:
    """Decision to move the worker -> its first job started on the new queue, minus the load."""
    out = []
    key = Keys(namespace).allocation_history
    for r in range(rounds):
        queue = "probe_b" if r % 2 == 0 else "probe_a"
        before = await client.store.redis.llen(key)
        handles = await client.submit_many([JobRequest(queue, _payload(0.005))] * 5)
        await client.gather(handles, timeout=60)
        jobs = list(await asyncio.gather(*(h.info() for h in handles)))
        started = min(j.started_s for j in jobs if j.started_s is not None)
        entries = [json.loads(e) for e in await client.store.redis.lrange(key, before, -1)]
        moved = [e["t_s"] for e in entries if e["workers"].get(queue, 0) >= 1]
        if moved:
            out.append(started - moved[0] - PROBE_LOAD_S)
        await asyncio.sleep(3 * PROBE_TICK_S)
    return out


async def _measure(settings: Settings, isolated: int, burst: int, switches: int) -> Overheads:
    async with AsyncClient(settings=settings) as client:
        dispatch = await _isolated(client, isolated)
        overhead = await _burst(client, burst, 0.005)
        switch = await _switches(client, switches, settings.namespace)
    return Overheads(Samples(tuple(dispatch)), Samples(tuple(overhead)), Samples(tuple(switch)))


def measure_overheads(*, isolated: int = 40, burst: int = 200, switches: int = 6) -> Overheads:
    """Start the probe service, measure (see the module docstring), stop it; about 20 s."""
    scenario = parse_scenario(_probe_scenario())
    plan = plan_replay(prepare(scenario, 0), speed=1.0, calibration=Calibration())
    with replay_service(plan) as service:
        return asyncio.run(_measure(service.settings, isolated, burst, switches))


__all__ = ["Overheads", "Samples", "measure_overheads"]
