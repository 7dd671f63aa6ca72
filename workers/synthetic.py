"""Synthetic handlers for replaying a scenario live: a job takes the service time it carries, a
model load the scenario's model-load time for its job type; both either sleep or, for a queue
whose scenario names a `live_model`, really compute with a built-in torch demo model.

`bilevel replay` draws every job's service time with the simulator's own generator and seed and
puts it in the payload (`{"service_s": 0.012}`, already divided by the replay's speed), so the
live service and the simulator run the very same draws. What a handler cannot get from a payload
is its model: the model is loaded before any job arrives. It comes from the environment variable
SYNTHETIC_HANDLERS_ENV, a JSON object {job type: load seconds, or a demo model's name}, which the
replay sets in its own process and in the runtime_env of the service it starts, so every worker
registers the same job types with the same models when it imports this module.

A sleeping handler holds no CPU, so a small machine can host several such workers (each reserves
`WORKER_CPUS` of a Ray CPU) without the handlers competing with the control plane. A demo-model
handler loads the real model (workers/demo_nets.py: building its weights, a warm-up pass) and
spends each job's service time in forward passes of it, ending with a sleep shorter than one
pass, so the job lasts its drawn time while the cores are as busy as serving makes them.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from functools import partial
from typing import Any

from workers.registry import REGISTRY, HandlerRegistry, PayloadError, Resources

# The demo models a queue's `live_model` may name (policies.sim.scenario.LIVE_MODELS). torch is
# imported only by a worker that loads one: importing it costs a worker seconds of start-up.
DEMO_MODELS: tuple[str, ...] = ("embed", "classify", "generate")

# {job type: model-load seconds or demo model name} as JSON; read when the module is imported.
SYNTHETIC_HANDLERS_ENV = "BILEVEL_SYNTHETIC_HANDLERS"

# Ray CPUs a synthetic worker reserves: it sleeps, so it needs a slot, not a core.
WORKER_CPUS = 0.05

# Longest sleep one job may ask for: a payload must not park a worker for an hour.
MAX_SERVICE_S = 600.0


def parse_handlers(text: str) -> dict[str, float | str]:
    """{job type: load seconds or demo model name} from SYNTHETIC_HANDLERS_ENV's JSON;
    ValueError naming the entry."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{SYNTHETIC_HANDLERS_ENV}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise ValueError(
            f"{SYNTHETIC_HANDLERS_ENV}: must be a JSON object of job type: seconds or model name"
        )
    out: dict[str, float | str] = {}
    for job_type, value in raw.items():
        if isinstance(value, str):
            if value not in DEMO_MODELS:
                raise ValueError(
                    f"{SYNTHETIC_HANDLERS_ENV}.{job_type}: unknown demo model {value!r} "
                    f"(known: {', '.join(DEMO_MODELS)})"
                )
            out[str(job_type)] = value
            continue
        if (
            not isinstance(value, int | float)
            or isinstance(value, bool)
            or not math.isfinite(value)
            or value < 0
        ):
            raise ValueError(
                f"{SYNTHETIC_HANDLERS_ENV}.{job_type}: must be load seconds >= 0 or a demo "
                f"model's name, got {value!r}"
            )
        out[str(job_type)] = float(value)
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


class ModelWork:
    """A loaded demo model and one small forward pass of it, timed, so a job can spend a given
    time computing without overshooting it by more than a fraction of a pass."""

    # Weight of each pass in the running estimate of a pass's time.
    _ALPHA = 0.2

    def __init__(self, name: str) -> None:
        import torch

        from workers.demo_nets import ByteGenerator, Classifier, TextEmbedder

        # As workers/actor.py sets it for handler modules that import torch: one intra-op thread
        # per worker, so workers sharing a core do not oversubscribe it.
        torch.set_num_threads(1)

        # One small request of each model's kind: a short text, a feature row, one token.
        if name == "embed":
            embedder = TextEmbedder()
            self._forward: Callable[[], object] = lambda: embedder.run_batch([{"text": "a job"}])
        elif name == "classify":
            classifier = Classifier()
            self._forward = lambda: classifier.run_batch([{"features": [0.5] * 16}])
        elif name == "generate":
            generator = ByteGenerator()
            # One sampled token per pass, the text going on across jobs (and starting over once
            # it reaches the model's longest).
            tokens: Iterator[str] = iter(())

            def next_token() -> object:
                nonlocal tokens
                token: str | None = next(tokens, None)
                if token is None:
                    tokens = generator.tokens("a job", 512)
                    token = next(tokens)
                return token

            self._forward = next_token
        else:
            raise ValueError(f"unknown demo model {name!r} (known: {', '.join(DEMO_MODELS)})")
        self.name = name
        # Seconds a pass takes: the first (warm-up) pass, then a running average.
        self.pass_s = self._timed_pass()

    def _timed_pass(self) -> float:
        started = time.perf_counter()
        self._forward()
        return time.perf_counter() - started

    def run_for(self, seconds: float) -> int:
        """Forward passes until `seconds` have gone by (the last stretch, shorter than a pass,
        sleeps); returns the passes made."""
        end = time.perf_counter() + seconds
        passes = 0
        while (left := end - time.perf_counter()) > 0:
            if left < self.pass_s:
                time.sleep(left)
                break
            self.pass_s = (1 - self._ALPHA) * self.pass_s + self._ALPHA * self._timed_pass()
            passes += 1
        return passes


def time_model_loads(names: Iterable[str]) -> dict[str, float]:
    """Seconds one load of each demo model takes here, for the simulator's prediction of a
    replay whose workers load them (the first load of a process: as a new worker's is)."""
    import workers.demo_nets  # noqa: F401  (torch, outside the timed loads)

    out: dict[str, float] = {}
    for name in sorted(set(names)):
        started = time.perf_counter()
        ModelWork(name)
        out[name] = time.perf_counter() - started
    return out


def _serve_on_model(work: ModelWork, payload: Any) -> float:
    """Compute with the model for the job's service time; the result is the seconds asked for."""
    service_s = service_seconds(payload)
    work.run_for(service_s)
    return service_s


def register_synthetic(registry: HandlerRegistry, handlers: Mapping[str, float | str]) -> None:
    """Register one synthetic handler per job type (a number: a sleeping one whose load sleeps
    that long; a name: one on that demo model), skipping types the registry already has."""
    known = set(registry.job_types())
    for job_type, spec in handlers.items():
        if job_type in known:
            continue
        if isinstance(spec, str):
            loader: Callable[[], Any] = partial(ModelWork, spec)
            run: Callable[[Any, Any], float] = _serve_on_model
        else:
            loader, run = _sleeping_loader(spec), _serve
        registry.register(
            job_type, loader=loader, run=run, resources=Resources(num_cpus=WORKER_CPUS)
        )


_HANDLERS = parse_handlers(os.environ.get(SYNTHETIC_HANDLERS_ENV, "{}"))
if any(isinstance(spec, str) for spec in _HANDLERS.values()):
    # torch now, with the module (while the worker starts), not inside a model load: a load's
    # time is the model's alone, as time_model_loads measures it.
    import workers.demo_nets  # noqa: F401
register_synthetic(REGISTRY, _HANDLERS)


__all__ = [
    "DEMO_MODELS",
    "MAX_SERVICE_S",
    "SYNTHETIC_HANDLERS_ENV",
    "WORKER_CPUS",
    "ModelWork",
    "parse_handlers",
    "register_synthetic",
    "service_seconds",
    "time_model_loads",
]
