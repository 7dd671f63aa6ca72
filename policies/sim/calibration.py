"""The live service's own overheads, as the simulator can model them.

The simulator is ideal by default: a job reaches its queue the instant it arrives, a worker turns
from one job to the next in no time, and a moved worker serves once its model has loaded. The
live service pays, on top of the handler's own time, for:

- `dispatch_s`: submit -> ingress -> the router's batch -> enqueue -> a ready worker wakes from
  its blocking pop and leases the job. Measured as created -> started of jobs that found an idle
  worker. The simulator delays each arrival at its queue by this much (JCT still counts from the
  arrival, as live counts from `created_s`).
- `job_overhead_s`: what a busy worker spends per job besides the handler: reporting the result
  (one script call), leasing the next job, handing payloads to and from its handler thread.
  Measured as the gap between back-to-back completions on one worker, minus the service time. The
  simulator adds it to every job's service time, so it costs capacity as it does live.
- `switch_s`: a pool change -> the moved worker serving, beyond the model load itself: the
  controller's tick (store stats, one state call per worker, the policy) before the decision
  reaches the pool, the drain and `assign` calls. The simulator adds it to every model load (a
  queue whose model loads in 0 s still pays it).

Batching is not modelled: the synthetic handlers take one job per call (max_batch 1), as the
simulator's workers do.

All three are real seconds, independent of how fast a replay runs: at speed K they weigh K times
as much in scenario seconds, which is what makes the ideal simulator wrong for short service
times. `MEASURED` holds the values measured on the development machine (2 shared cores; see
docs/sim2real.md for how and when); a scenario's `calibration:` section gives its own.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from policies.sim.run import Jobs, QueueSpec, SimSpec


class Calibration(BaseModel):
    """Overheads of the live service in real seconds (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Arrival -> a ready worker starts the job (ingress, router, enqueue, wake-up, lease).
    dispatch_s: float = Field(default=0.0, ge=0, le=60)
    # Worker time per job besides the handler's (report, next lease, thread hand-off).
    job_overhead_s: float = Field(default=0.0, ge=0, le=60)
    # Pool change -> serving, beyond the model load (tick, drain, assign).
    switch_s: float = Field(default=0.0, ge=0, le=600)

    @property
    def ideal(self) -> bool:
        """True when every overhead is 0 (the simulator's default)."""
        return self.dispatch_s == 0 and self.job_overhead_s == 0 and self.switch_s == 0


# Measured on the development machine (2 cores shared with other work, Redis 7 on loopback, a
# local Ray); see docs/sim2real.md for the probe and the spread across runs.
MEASURED = Calibration(dispatch_s=0.0035, job_overhead_s=0.0028, switch_s=0.0067)


def calibrated(spec: SimSpec, jobs: Jobs, calibration: Calibration) -> tuple[SimSpec, Jobs]:
    """`spec` and `jobs` with the overheads in: arrivals reach their queue `dispatch_s` late,
    every job holds its worker `job_overhead_s` longer, every model load takes `switch_s` more.
    The units are the run's own: call it after any change of time scale."""
    if calibration.ideal:
        return spec, jobs
    queues = tuple(
        QueueSpec(
            name=q.name,
            job_types=q.job_types,
            model_load_s=q.model_load_s + calibration.switch_s,
            slo_s=q.slo_s,
            nominal_service_s=q.nominal_service_s + calibration.job_overhead_s,
        )
        for q in spec.queues
    )
    spec = replace(spec, queues=queues, dispatch_s=spec.dispatch_s + calibration.dispatch_s)
    jobs = Jobs(
        arrivals=jobs.arrivals,
        service_s=np.asarray(jobs.service_s + calibration.job_overhead_s, dtype=float),
        size_estimate_s=np.asarray(jobs.size_estimate_s + calibration.job_overhead_s, dtype=float),
    )
    return spec, jobs


__all__ = ["MEASURED", "Calibration", "calibrated"]
