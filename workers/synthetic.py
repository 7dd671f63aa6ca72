"""Synthetic handlers for replaying a scenario live: a job sleeps the service time it carries, a
model load sleeps the scenario's model-load time for its job type.

`bilevel replay` draws every job's service time with the simulator's own generator and seed and
puts it in the payload (`{"service_s": 0.012}`, already divided by the replay's speed), so the
live service and the simulator run the very same draws. What a handler cannot get from a payload
is its model-load time: the model is loaded before any job arrives. It comes from the environment
variable SYNTHETIC_HANDLERS_ENV, a JSON object {job type: load seconds}, which the replay sets in
its own process and in the runtime_env of the service it starts, so every worker registers the
same job types with the same load times when it imports this module.

Sleeping holds no CPU, so a small machine can host several such workers (each reserves
`WORKER_CPUS` of a Ray CPU) without the handlers competing with the control plane.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

from workers.registry import REGISTRY, HandlerRegistry, PayloadError, Resources

# {job type: model-load seconds} as JSON; read when the module is imported.
SYNTHETIC_HANDLERS_ENV = "BILEVEL_SYNTHETIC_HANDLERS"

# Ray CPUs a synthetic worker reserves: it sleeps, so it needs a slot, not a core.
WORKER_CPUS = 0.05

# Longest sleep one job may ask for: a payload must not park a worker for an hour.
MAX_SERVICE_S = 600.0


def parse_load_times(text: str) -> dict[str, float]:
    """{job type: load seconds} from SYNTHETIC_HANDLERS_ENV's JSON; ValueError naming the entry."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{SYNTHETIC_HANDLERS_ENV}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{SYNTHETIC_HANDLERS_ENV}: must be a JSON object of job type: seconds")
    out: dict[str, float] = {}
    for job_type, load_s in raw.items():
        if (
            not isinstance(load_s, int | float)
            or isinstance(load_s, bool)
            or not math.isfinite(load_s)
            or load_s < 0
        ):
            raise ValueError(
                f"{SYNTHETIC_HANDLERS_ENV}.{job_type}: load seconds must be a number >= 0, "
                f"got {load_s!r}"
            )
        out[str(job_type)] = float(load_s)
    return out


def service_seconds(payload: Any) -> float:
    """The sleep a payload asks for; PayloadError naming the field when it is not a sane one."""
    if not isinstance(payload, dict):
        raise PayloadError(
            f"payload must be an object with 'service_s', got {type(payload).__name__}"
        )
    value = payload.get("service_s")
    if (
        not isinstance(value, int | float)
        or isinstance(value, bool)
        or not 0 <= value <= MAX_SERVICE_S
    ):
        raise PayloadError(f"payload.service_s must be a number in 0..{MAX_SERVICE_S}")
    return float(value)


def _sleeping_loader(load_s: float) -> Callable[[], None]:
    def load() -> None:
        time.sleep(load_s)

    return load


def _serve(model: None, payload: Any) -> float:
    """Sleep the job's service time; the result is the seconds asked for."""
    service_s = service_seconds(payload)
    time.sleep(service_s)
    return service_s


def register_synthetic(registry: HandlerRegistry, load_times_s: Mapping[str, float]) -> None:
    """Register one sleeping handler per job type, skipping types the registry already has."""
    known = set(registry.job_types())
    for job_type, load_s in load_times_s.items():
        if job_type in known:
            continue
        registry.register(
            job_type,
            loader=_sleeping_loader(load_s),
            run=_serve,
            resources=Resources(num_cpus=WORKER_CPUS),
        )


register_synthetic(REGISTRY, parse_load_times(os.environ.get(SYNTHETIC_HANDLERS_ENV, "{}")))


__all__ = [
    "MAX_SERVICE_S",
    "SYNTHETIC_HANDLERS_ENV",
    "WORKER_CPUS",
    "parse_load_times",
    "register_synthetic",
    "service_seconds",
]
