"""Streaming through the live service on Ray: the demo generator's tokens, and a worker actor
ray.kill'ed mid-stream."""

from __future__ import annotations

from typing import Any

import pytest

from scheduler.client import Client
from scheduler.settings import Settings
from scheduler.streams import StreamRestart
from tests.integration.test_service import _ray_config, _start, services  # noqa: F401

pytestmark = pytest.mark.slow


def _streaming_worker(namespace: str) -> Any:
    """The worker actor of the namespace that holds a generator job now."""
    import ray

    prefix = f"bilevel:{namespace}:w"
    for name in ray.util.list_named_actors():
        if name.startswith(prefix) and "worker-" in name:
            actor = ray.get_actor(name)
            state = ray.get(actor.state.remote(), timeout=10)
            if state.queue == "generator" and state.in_flight:
                return actor
    raise AssertionError("no worker holds the generator job")


def test_a_worker_actor_killed_mid_stream_restarts_it_on_another(
    services: list[Any],  # noqa: F811
    settings: Settings,
) -> None:
    """The demo generator streams its tokens; ray.kill of its worker actor mid-stream: the pool
    replaces it, the job runs again once the lease lapses, and the reader sees the restart and
    the whole second attempt, which is the job's result (the tokens are seeded by the prompt, so
    the first attempt's were its prefix)."""
    import ray

    config = _ray_config(settings, budget=2, policy="proportional")
    config = config.model_copy(
        update={
            "queues": tuple(
                q.model_copy(update={"min_workers": 1 if q.name == "generator" else 0})
                for q in config.queues
            )
        }
    )
    handle = _start(services, config)
    assert handle.wait_leading(20.0)
    with Client(settings=settings) as client:
        job = client.submit("generate", {"prompt": "stream me", "max_tokens": 400})
        stream = job.stream(timeout=120)
        first = [next(stream) for _ in range(10)]
        ray.kill(_streaming_worker(settings.namespace), no_restart=True)
        rest = list(stream)
        result = job.result(timeout=60)
    restarts = [i for i, c in enumerate(rest) if isinstance(c, StreamRestart)]
    assert len(restarts) == 1, rest[:5]
    before, marker, after = rest[: restarts[0]], rest[restarts[0]], rest[restarts[0] + 1 :]
    assert marker == StreamRestart(attempt=2, discard=len(first) + len(before))
    assert "".join(after) == result
    assert len(result) == 400
    assert result.startswith("".join(first + before))
