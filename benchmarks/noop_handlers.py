"""A no-op job type for bench_e2e: measures the scheduler's own overhead, not a model's."""

from __future__ import annotations

from typing import Any

from workers.registry import REGISTRY, Resources


def _echo_all(model: None, payloads: list[Any]) -> list[Any]:
    return payloads


REGISTRY.register(
    "noop",
    loader=lambda: None,
    run_batch=_echo_all,
    max_batch=256,
    resources=Resources(num_cpus=0.25),
)
