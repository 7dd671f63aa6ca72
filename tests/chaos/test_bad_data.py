"""Chaos: bad data under load. Corrupt records planted in the ingress, a queue and a lease set while
the live service serves healthy jobs beside them, and a garbage checkpoint given to serve."""

from __future__ import annotations

import asyncio
import json
import random
import time
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
import yaml
from typer.testing import CliRunner

from scheduler.cli import app
from scheduler.client import AsyncClient
from scheduler.connection import client_from_url
from scheduler.keys import Keys
from scheduler.models import JobStatus, new_job_id
from scheduler.service.runner import start_service
from scheduler.settings import Settings
from scheduler.store import Store
from tests.chaos.harness import (
    Tracked,
    assert_every_job_accounted,
    chaos_config,
    completed_totals,
    report,
)

pytestmark = pytest.mark.slow

QUEUE = "qa"
NO_DEADLINE = 999_999_999_999_999


def _order(seq: int, job_id: str) -> str:
    return f"{9999:04d}{NO_DEADLINE:015d}{seq:015d}:{job_id}"


def _record(job_id: str, seq: int, now_ms: int, status: str) -> dict[str, str]:
    """A record as the submit script writes it (a healthy chaos.a job)."""
    spec = {"job_type": "chaos.a", "payload": {"key": "victim"}, "options": {}}
    return {
        "spec": json.dumps(spec),
        "status": status,
        "created_ms": str(now_ms),
        "order": _order(seq, job_id),
        "due_ms": str(now_ms),
        "maxr": "3",
        "rt": json.dumps({"t": "chaos.a", "p": 0, "g": [], "n": None, "d": None}),
    }


async def _plant(redis: aioredis.Redis, keys: Keys, kind: str, rng: random.Random) -> str:
    """One corrupt record of `kind`, where a reader of the live service meets it; its id."""
    job_id = new_job_id()
    now_ms = int(time.time() * 1000)
    seq = 10**12 + rng.randrange(10**6)
    where, damage = kind.split(":", 1)
    record = _record(
        job_id, seq, now_ms, {"ingress": "pending", "queue": "queued"}.get(where, "running")
    )
    if where == "queue":
        record["queue"] = QUEUE
    if where == "leased":
        record |= {"queue": QUEUE, "attempts": "1", "started_ms": str(now_ms)}
    wrong_type = False
    if damage == "priority-1e400":
        record["rt"] = '{"t": "chaos.a", "p": 1e400, "g": [], "n": null, "d": null}'
    elif damage == "unhashable-tag":
        record["rt"] = '{"t": "chaos.a", "p": 0, "g": [[1]], "n": null, "d": null}'
    elif damage == "nested-100k":
        record["rt"] = "[" * 100_000
    elif damage == "no-order":
        del record["order"]
    elif damage == "no-spec":
        del record["spec"]
    elif damage == "garbled-attempts":
        record["attempts"] = "1x"
    elif damage == "fuzzed":
        # Random bytes in random fields, from a seeded generator: whatever it makes, it must end
        # dead or dropped without stopping anything.
        for field in rng.sample(sorted(record), k=3):
            record[field] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 40))).decode(
                "latin-1"
            )
    elif damage == "wrong-type":
        wrong_type = True
    else:
        raise ValueError(kind)
    pipe = redis.pipeline(transaction=True)
    if wrong_type:
        pipe.rpush(keys.job(job_id), "not", "a", "hash")
    else:
        pipe.hset(keys.job(job_id), mapping=record)
    if where == "ingress":
        pipe.zadd(keys.ingress, {job_id: seq})
        pipe.lpush(keys.ingress_signal, "1")
    elif where == "queue":
        pipe.zadd(keys.queue(QUEUE), {_order(seq, job_id): 0})
        pipe.zadd(keys.queue_age(QUEUE), {job_id: now_ms})
        pipe.lpush(keys.queue_signal(QUEUE), "1")
    else:
        # Its lease ran out a second ago: the controller's requeue meets it next tick.
        pipe.zadd(keys.leased(QUEUE), {job_id: now_ms - 1000})
    await pipe.execute()
    return job_id


KINDS = [
    "ingress:priority-1e400",
    "ingress:unhashable-tag",
    "ingress:nested-100k",
    "ingress:no-order",
    "ingress:wrong-type",
    "ingress:fuzzed",
    "queue:no-spec",
    "queue:wrong-type",
    "queue:fuzzed",
    "leased:garbled-attempts",
    "leased:wrong-type",
    "leased:fuzzed",
]


def test_corrupt_records_under_load_are_dead_lettered_and_the_rest_served(
    services: list[Any], settings: Settings, run: Any, tmp_path: Path, report_dir: Path
) -> None:
    """Every kind of corrupt record, planted in the ingress, a queue and a lease set while 1,500
    healthy jobs flow: each victim ends dead with a reason (or its stale entry dropped), every
    healthy job finishes, and no role wedges: both still lead, neither failing nor stalled."""
    n = 1500
    config = chaos_config(settings)
    handle = start_service(config, leader_ttl_s=2.0, wait_s=30.0)
    services.append(handle)
    rng = random.Random(5)

    async def scenario() -> tuple[Tracked, dict[str, Any], int]:
        tracked = Tracked(tmp_path / "executions.log")
        redis = client_from_url(settings.url() or "")
        store = Store(redis, settings)
        try:
            async with AsyncClient(settings=config.store) as client:
                load = asyncio.create_task(
                    tracked.submit(client, n, batch=25, rate_per_s=150.0, work_s=0.002, wait_s=60)
                )
                victims: dict[str, str] = {}
                for _ in range(3):
                    await asyncio.sleep(1.5)
                    for kind in KINDS:
                        victims[await _plant(redis, store.keys, kind, rng)] = kind
                await load
                await tracked.wait_all(timeout_s=60.0)
                outcomes: dict[str, Any] = {}
                for job_id, kind in victims.items():
                    deadline = time.monotonic() + 30.0
                    while True:
                        job = await store.get(job_id)
                        if job.status is JobStatus.DEAD or time.monotonic() > deadline:
                            break
                        await asyncio.sleep(0.1)
                    outcomes[job_id] = (kind, job.status, job.error)
                return tracked, outcomes, await completed_totals(client)
        finally:
            await store.close()
            await redis.aclose()

    tracked, outcomes, completed = run(scenario())
    summary = tracked.summary()
    not_dead = {i: (k, s.value) for i, (k, s, _) in outcomes.items() if s is not JobStatus.DEAD}
    reasons = {k: e.message for _, (k, s, e) in outcomes.items() if e is not None}
    statuses = handle.status()
    report(
        "corrupt_records_under_load",
        {**summary, "jobs": n, "victims": len(outcomes), "victims_not_dead": len(not_dead),
         "roles": {r: s.get("state") for r, s in statuses.items()},
         "reasons": dict(sorted(reasons.items()))},
        report_dir,
    )  # fmt: skip
    assert_every_job_accounted(summary, completed, n=n)
    assert not not_dead, not_dead
    assert all(e is not None and e.type == "CorruptJob" for _, _, e in outcomes.values())
    assert {r: s.get("state") for r, s in statuses.items()} == {
        "router": "leading",
        "controller": "leading",
    }


def test_a_garbage_checkpoint_stops_serve_before_anything_starts(
    settings: Settings, tmp_path: Path, run: Any
) -> None:
    """serve --policy with a checkpoint of random bytes exits 2 naming the file; no role of the
    namespace ever publishes itself (nothing started)."""
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(random.Random(3).randbytes(4096))
    (tmp_path / "garbage.json").write_text(
        (Path("policies/checkpoints/default.json")).read_text(), encoding="utf-8"
    )
    raw = yaml.safe_load(Path("deploy/service.yaml").read_text(encoding="utf-8"))
    raw["store"] = {"redis_url": settings.url(), "namespace": settings.namespace}
    config_path = tmp_path / "service.yaml"
    config_path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    result = CliRunner().invoke(
        app, ["serve", "--config", str(config_path), "--policy", str(garbage)]
    )
    assert result.exit_code == 2, result.output
    assert str(garbage) in result.output
    assert "corrupt" in result.output
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1

    async def published() -> int:
        redis = client_from_url(settings.url() or "")
        try:
            return int(await redis.scard(Keys(settings.namespace).health_index))
        finally:
            await redis.aclose()

    assert run(published()) == 0
