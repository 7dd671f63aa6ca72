"""ModelWorker against a real Redis, without Ray: serving, failures, timeouts, cancel, idle, drain."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from scheduler.client import AsyncClient, Client
from scheduler.config import WorkerConfig
from scheduler.embedded_redis import EmbeddedRedis
from scheduler.errors import JobCancelled, JobFailed
from scheduler.models import JobStatus
from scheduler.settings import Settings
from scheduler.store import Lease, Store
from tests.conftest import Runner, make_settings
from tests.integration import handlers_for_tests
from tests.integration.helpers import new_job, submit_to_queue
from workers import demo_models  # noqa: F401  (registers the demo handlers)
from workers.model_worker import ModelWorker, Phase

CONFIG = WorkerConfig(max_batch=16, heartbeat_s=0.3)


@pytest.fixture
def settings(redis_server: EmbeddedRedis, namespace: str) -> Settings:
    # Short leases, and retries due at once so a failing job's attempts follow each other.
    return make_settings(redis_server, namespace, lease_s=2.0, retry_backoff_s=0.0)


@pytest.fixture(autouse=True)
def _release_hung_handlers() -> Iterator[None]:
    handlers_for_tests.HANG_STARTED.clear()
    handlers_for_tests.HANG_RELEASE.clear()
    yield
    handlers_for_tests.HANG_RELEASE.set()


@asynccontextmanager
async def serving(
    store: Store, queue: str, *job_types: str, **options: Any
) -> AsyncIterator[ModelWorker]:
    worker = ModelWorker(store, config=CONFIG, name="w", **options)
    await worker.assign(queue, job_types)
    try:
        yield worker
    finally:
        await worker.stop(timeout_s=1.0)


@asynccontextmanager
async def control_plane(store: Store, queue: str) -> AsyncIterator[None]:
    """What the router and controller do for these tests: route the ingress to `queue` (woken by
    its signal) and promote retries that are due."""

    async def route() -> None:
        while True:
            await store.wait_for_ingress(0.05)
            pending = await store.pending(100)
            await store.enqueue([(p.id, queue) for p in pending])

    async def promote() -> None:
        while True:
            await store.promote_due()
            await asyncio.sleep(0.01)

    tasks = [asyncio.create_task(route()), asyncio.create_task(promote())]
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def wait_for_thread_event(event: Any) -> None:
    assert await asyncio.to_thread(event.wait, 10.0), "handler never started"


class TestDemoModels:
    def test_every_demo_job_type_with_the_async_client(
        self, store: Store, settings: Settings, run: Runner
    ) -> None:
        """embed, classify and generate each return their documented result shape."""

        async def body() -> None:
            async with (
                AsyncClient(settings=settings) as client,
                serving(store, "demo", "embed", "classify", "generate"),
                control_plane(store, "demo"),
            ):
                embed = [await client.submit("embed", {"text": f"hello {i}"}) for i in range(5)]
                classify = await client.submit("classify", {"features": [0.5] * 16})
                by_text = await client.submit("classify", {"text": "is this good?"})
                generate = await client.submit("generate", {"prompt": "Once", "max_tokens": 12})
                vectors = [await h.result(timeout=20) for h in embed]
                assert all(len(v) == 128 for v in vectors)
                assert abs(sum(x * x for x in vectors[0]) - 1.0) < 1e-3
                label = await classify.result(timeout=20)
                assert label["label"] in label["scores"]
                assert (await by_text.result(timeout=20))["label"] in label["scores"]
                text = await generate.result(timeout=20)
                assert isinstance(text, str)
                assert len(text) == 12

        run(body())

    def test_every_demo_job_type_with_the_sync_client(
        self, store: Store, settings: Settings, run: Runner
    ) -> None:
        """The synchronous client gets the same results, from its own thread."""

        def use_client() -> list[Any]:
            with Client(settings=settings) as client:
                handles = [
                    client.submit("embed", {"text": "same text"}),
                    client.submit("classify", {"features": [1.0] * 16}),
                    client.submit("generate", {"prompt": "Hi", "max_tokens": 5}),
                    client.submit("embed", {"text": "same text"}),
                ]
                return [h.result(timeout=20) for h in handles]

        async def body() -> list[Any]:
            async with (
                serving(store, "demo", "embed", "classify", "generate"),
                control_plane(store, "demo"),
            ):
                return await asyncio.to_thread(use_client)

        first, label, text, again = run(body())
        assert first == again  # the weights are the same in every load
        assert set(label) == {"label", "scores"}
        assert len(text) == 5

    def test_bad_payload_fails_at_once_naming_the_field(
        self, store: Store, settings: Settings, run: Runner
    ) -> None:
        """A payload the model cannot take is dead-lettered on the first attempt, not retried."""

        async def body() -> None:
            async with (
                AsyncClient(settings=settings) as client,
                serving(store, "demo", "embed"),
                control_plane(store, "demo"),
            ):
                handle = await client.submit("embed", {"text": 42})
                with pytest.raises(JobFailed) as info:
                    await handle.result(timeout=20)
                assert info.value.error_type == "PayloadError"
                assert "payload.text must be a string" in info.value.message
                assert (await client.get(handle.id)).attempts == 1

        run(body())


class TestFailures:
    def test_exception_retries_then_dead_letters_with_traceback(
        self, store: Store, settings: Settings, run: Runner
    ) -> None:
        """A handler that raises runs 1 + max_retries times, then lands in the dead-letter set."""

        async def body() -> None:
            async with (
                AsyncClient(settings=settings) as client,
                serving(store, "q", "test.fail"),
                control_plane(store, "q"),
            ):
                handle = await client.submit("test.fail", "poison", max_retries=2)
                with pytest.raises(JobFailed) as info:
                    await handle.result(timeout=20)
                assert info.value.error_type == "RuntimeError"
                assert info.value.message == "boom on 'poison'"
                assert info.value.traceback is not None
                assert "handlers_for_tests.py" in info.value.traceback
                job = await client.get(handle.id)
                assert (job.status, job.attempts) == (JobStatus.DEAD, 3)
                assert await store.dead_ids("q") == [handle.id]

        run(body())

    def test_hung_handler_times_out_and_the_worker_keeps_serving(
        self, store: Store, settings: Settings, run: Runner
    ) -> None:
        """Past timeout_s the job fails as JobTimeout; the next job runs on a fresh thread."""

        async def body() -> None:
            async with (
                AsyncClient(settings=settings) as client,
                serving(store, "q", "test.hang", "test.echo") as worker,
                control_plane(store, "q"),
            ):
                hung = await client.submit("test.hang", None, timeout_s=0.3)
                with pytest.raises(JobFailed) as info:
                    await hung.result(timeout=10)
                assert info.value.error_type == "JobTimeout"
                assert "0.3 s" in info.value.message
                after = await client.submit("test.echo", {"still": "serving"})
                assert await after.result(timeout=10) == {"still": "serving"}
                # The client can have the result before the worker's own complete call returns
                # (small results ride the finish notice): give its counters that moment.
                deadline = time.monotonic() + 5
                while worker.state().jobs_done < 1 and time.monotonic() < deadline:
                    await asyncio.sleep(0.01)
                state = worker.state()
                assert (state.abandoned_threads, state.healthy) == (1, True)
                assert (state.jobs_done, state.jobs_failed) == (1, 1)

        run(body())

    def test_too_many_hung_threads_make_the_worker_unhealthy(
        self, store: Store, run: Runner
    ) -> None:
        """Abandoned threads that never return count against health; the pool replaces it."""

        async def body() -> None:
            async with serving(store, "q", "test.hang", max_abandoned_threads=1) as worker:
                ids = await submit_to_queue(
                    store, "q", *(new_job("test.hang", i, timeout_s=0.05) for i in range(2))
                )
                for job_id in ids:
                    await store.wait_finished(job_id, 10)
                assert worker.state().abandoned_threads == 2
                assert not worker.state().healthy
            handlers_for_tests.HANG_RELEASE.set()

        run(body())

    def test_result_that_is_not_json_fails_clearly(
        self, store: Store, settings: Settings, run: Runner
    ) -> None:
        """A set or bytes result is refused with a message naming its type; not retried."""

        async def body() -> None:
            async with (
                AsyncClient(settings=settings) as client,
                serving(store, "q", "test.not_json"),
                control_plane(store, "q"),
            ):
                for payload, kind in (("set", "set"), ("bytes", "bytes")):
                    handle = await client.submit("test.not_json", payload)
                    with pytest.raises(JobFailed) as info:
                        await handle.result(timeout=10)
                    assert info.value.error_type == "InvalidResult"
                    assert f"a {kind} is not JSON" in info.value.message
                    assert (await client.get(handle.id)).attempts == 1

        run(body())

    def test_cancel_a_running_job(self, store: Store, settings: Settings, run: Runner) -> None:
        """Cancelling a running job reports it cancelled (at the next heartbeat); serving goes on."""

        async def body() -> None:
            async with (
                AsyncClient(settings=settings) as client,
                serving(store, "q", "test.hang", "test.echo") as worker,
                control_plane(store, "q"),
            ):
                handle = await client.submit("test.hang")
                await wait_for_thread_event(handlers_for_tests.HANG_STARTED)
                assert await handle.cancel()
                with pytest.raises(JobCancelled):
                    await handle.result(timeout=10)
                after = await client.submit("test.echo", 7)
                assert await after.result(timeout=10) == 7
                assert worker.state().healthy

        run(body())


class TestLeasing:
    def test_idle_worker_blocks_and_wakes_on_a_new_job(self, store: Store, run: Runner) -> None:
        """An idle worker makes no store calls while it waits, and leases a new job at once."""
        calls: list[tuple[str, float]] = []
        blocked = asyncio.Event()

        class CountingStore(Store):
            async def lease(
                self, queue: str, n: int = 1, *, lease_s: float | None = None
            ) -> list[Lease]:
                leases = await super().lease(queue, n, lease_s=lease_s)
                calls.append(("lease" if leases else "empty", time.monotonic()))
                return leases

            async def wait_for_queue(self, queue: str, timeout_s: float) -> bool:
                calls.append(("wait", time.monotonic()))
                blocked.set()
                return await super().wait_for_queue(queue, timeout_s)

        counting = CountingStore(store.redis, store.settings, clock=store.clock)

        async def body() -> None:
            async with serving(counting, "q", "test.echo", idle_wait_s=30.0):
                await asyncio.wait_for(blocked.wait(), 5)
                # An observation window, not a margin: nothing may happen during it.
                await asyncio.sleep(0.5)
                assert [kind for kind, _ in calls] == ["empty", "wait"]
                submitted = time.monotonic()
                [job_id] = await submit_to_queue(store, "q", new_job("test.echo", 1))
                await store.wait_finished(job_id, 5)
                leased_at = next(t for kind, t in calls if kind == "lease")
                assert leased_at - submitted < 0.1

        run(body())

    def test_jobs_waiting_together_run_as_one_batch(self, store: Store, run: Runner) -> None:
        """Jobs queued before the worker looks are leased and run in batches of max_batch."""
        handlers_for_tests.BATCH_SIZES.clear()

        async def body() -> list[Any]:
            ids = await submit_to_queue(store, "q", *(new_job("test.batch", i) for i in range(10)))
            async with serving(store, "q", "test.batch"):
                return [(await store.wait_finished(i, 10)).result for i in ids]

        results = run(body())
        assert [r["echo"] for r in results] == list(range(10))
        assert handlers_for_tests.BATCH_SIZES == [8, 2]

    def test_drain_finishes_or_releases_every_job_in_hand(self, store: Store, run: Runner) -> None:
        """Drain waits for jobs up to its deadline, then hands the rest back to the queue, their
        attempt not charged."""

        async def body() -> None:
            async with serving(store, "q", "test.sleep", "test.hang") as worker:
                [quick] = await submit_to_queue(store, "q", new_job("test.sleep", {"seconds": 0.2}))
                deadline = time.monotonic() + 10
                while worker.state().phase is not Phase.BUSY:
                    assert time.monotonic() < deadline, "the worker never started the job"
                    await asyncio.sleep(0.01)
                report = await worker.drain(timeout_s=5.0)
                assert (report.finished, report.released) == (1, 0)
                assert (await store.get(quick)).status is JobStatus.SUCCEEDED

                await worker.assign("q", ["test.sleep", "test.hang"])
                [stuck] = await submit_to_queue(store, "q", new_job("test.hang"))
                await wait_for_thread_event(handlers_for_tests.HANG_STARTED)
                report = await worker.drain(timeout_s=0.1)
                assert (report.finished, report.released) == (0, 1)
                job = await store.get(stuck)
                assert job.status is JobStatus.QUEUED
                assert job.error is None
                assert await store.queued_ids("q") == [stuck]
                assert worker.state().phase is Phase.IDLE

        run(body())

    def test_reassign_reuses_loaded_models_and_measures_new_ones(
        self, store: Store, run: Runner
    ) -> None:
        """Moving to a queue loads only the models not already held; the load time is measured."""

        async def body() -> None:
            worker = ModelWorker(store, config=CONFIG, name="w")
            try:
                first_s = await worker.assign("a", ["embed"])
                assert first_s > 0.05
                assert worker.state().load_s == pytest.approx(first_s)
                second_s = await worker.assign("b", ["embed", "classify"])
                assert second_s > 0.1
                assert worker.state().queue == "b"
                assert worker.state().load_s > second_s  # the full cost of b: both models
                assert await worker.assign("c", ["classify"]) == 0.0
            finally:
                await worker.stop(timeout_s=1.0)

        run(body())
