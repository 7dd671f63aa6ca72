"""The client, sync and async, against a real Redis; a worker is played by direct store calls."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from scheduler.client import AsyncClient, Client, JobRequest, NoRedisUrl
from scheduler.connection import client_from_url
from scheduler.embedded_redis import EmbeddedRedis
from scheduler.errors import (
    InvalidJob,
    JobCancelled,
    JobFailed,
    JobNotFound,
    JobTimeout,
    NoService,
)
from scheduler.keys import Keys
from scheduler.models import ErrorInfo, JobStatus
from scheduler.settings import Settings, SettingsConflict
from scheduler.store import Store
from tests.conftest import Runner, make_settings


async def _serve_one(store: Store, queue: str, outcome: Any) -> float:
    """Route, lease and finish the next job like a worker would; returns when it completed."""
    while not (pending := await store.pending(1)):
        await store.wait_for_ingress(1.0)
    await store.enqueue([(pending[0].id, queue)])
    [lease] = await store.lease(queue)
    if isinstance(outcome, ErrorInfo):
        await store.fail(lease.job_id, lease.token, outcome, retryable=False)
    else:
        await store.complete([(lease.job_id, lease.token, outcome)])
    return time.perf_counter()


@pytest.fixture
def client(settings: Settings) -> Iterator[Client]:
    with Client(settings=settings) as c:
        yield c


def _worker_thread(settings: Settings, outcome: Any, stamps: list[float]) -> threading.Thread:
    async def main() -> None:
        async with AsyncClient(settings=settings) as worker:
            stamps.append(await _serve_one(worker.store, "q", outcome))

    thread = threading.Thread(target=asyncio.run, args=(main(),))
    thread.start()
    return thread


class TestSyncClient:
    def test_submit_and_result(self, client: Client, settings: Settings) -> None:
        """submit returns a handle whose result() blocks until a worker completes the job."""
        handle = client.submit("embed", {"text": "hi"}, priority=2, tags=["a"])
        assert handle.status() is JobStatus.PENDING
        stamps: list[float] = []
        worker = _worker_thread(settings, {"vec": [0.5]}, stamps)
        assert handle.result(timeout=10) == {"vec": [0.5]}
        worker.join()
        assert handle.status() is JobStatus.SUCCEEDED
        assert client.get(handle.id).spec.options.tags == ("a",)

    def test_failed_job_raises_job_failed(self, client: Client, settings: Settings) -> None:
        """A dead job raises JobFailed with the remote type, message and traceback."""
        handle = client.submit("embed", 1)
        error = ErrorInfo(type="ValueError", message="bad input", traceback="Traceback: line 3")
        _worker_thread(settings, error, []).join()
        with pytest.raises(JobFailed) as info:
            handle.result(timeout=10)
        assert (info.value.error_type, info.value.message) == ("ValueError", "bad input")
        assert info.value.traceback == "Traceback: line 3"

    def test_cancel_then_result_raises_cancelled(self, client: Client) -> None:
        """A cancelled job's result() raises JobCancelled."""
        handle = client.submit("embed")
        assert handle.cancel()
        with pytest.raises(JobCancelled):
            handle.result(timeout=1)
        assert not handle.cancel()

    def test_result_timeout(self, client: Client) -> None:
        """result(timeout) raises JobTimeout when nobody runs the job; the job stays pending."""
        handle = client.submit("embed")
        with pytest.raises(JobTimeout, match=r"0\.2 s"):
            handle.result(timeout=0.2)
        assert handle.status() is JobStatus.PENDING

    def test_submit_many_and_idempotency(self, client: Client) -> None:
        """submit_many writes a batch; a repeated idempotency key returns the first job."""
        handles = client.submit_many([JobRequest("embed", i) for i in range(20)])
        assert len({h.id for h in handles}) == 20
        first = client.submit("embed", idempotency_key="x")
        again = client.submit("embed", idempotency_key="x")
        assert (first.created, again.created, again.id) == (True, False, first.id)

    def test_get_unknown_job(self, client: Client) -> None:
        """get() of an unknown id raises JobNotFound."""
        with pytest.raises(JobNotFound):
            client.get("0" * 32)


class TestAsyncClient:
    def test_submit_and_result(self, settings: Settings, run: Runner) -> None:
        """The async client gets results the same way, in one event loop with the worker."""

        async def main() -> Any:
            async with AsyncClient(settings=settings) as c:
                handle = await c.submit("classify", [1, 2, 3])
                worker = asyncio.create_task(_serve_one(c.store, "q", "cat"))
                result = await handle.result(timeout=10)
                await worker
                return result, await handle.status()

        assert run(main()) == ("cat", JobStatus.SUCCEEDED)

    def test_result_wakes_promptly_without_polling(self, settings: Settings, run: Runner) -> None:
        """result() wakes on the completion itself: far sooner than any polling interval."""

        async def main() -> float:
            async with AsyncClient(settings=settings) as c:
                waits = []
                for _ in range(20):
                    handle = await c.submit("embed")
                    waiter = asyncio.create_task(handle.result(timeout=10))
                    await asyncio.sleep(0.01)  # let the waiter block first
                    done_at = await _serve_one(c.store, "q", 1)
                    await waiter
                    waits.append(time.perf_counter() - done_at)
                return sorted(waits)[len(waits) // 2]

        # Generous bound for a loaded CI machine; the benchmark reports the real figure.
        assert run(main()) < 0.05

    def test_many_waiters_on_one_job_all_wake(self, settings: Settings, run: Runner) -> None:
        """Several waiters on the same job all see its result."""

        async def main() -> list[Any]:
            async with AsyncClient(settings=settings) as c:
                handle = await c.submit("embed")
                waiters = [asyncio.create_task(handle.result(timeout=10)) for _ in range(5)]
                await asyncio.sleep(0.01)
                await _serve_one(c.store, "q", "r")
                return list(await asyncio.gather(*waiters))

        assert run(main()) == ["r"] * 5


class TestNoSilentTraps:
    """A client never queues jobs where nothing will run them without saying so."""

    def test_no_url_refuses_to_start_a_private_redis(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Without a URL (argument, settings or environment) the client says how to give one."""
        monkeypatch.delenv("BILEVEL_REDIS_URL", raising=False)
        with pytest.raises(NoRedisUrl, match="BILEVEL_REDIS_URL") as info:
            Client()
        assert "embedded=True" in str(info.value)
        with pytest.raises(NoRedisUrl):
            AsyncClient(namespace="demo")

    def test_embedded_on_request_starts_and_stops_its_own_redis(self) -> None:
        """embedded=True runs a private Redis and stops it on close."""
        with Client(embedded=True, namespace="embedded", require_service=False) as c:
            embedded = c.async_client.embedded
            assert embedded is not None
            assert embedded.process is not None
            process = embedded.process
            handle = c.submit("embed", 1)
            assert handle.status() is JobStatus.PENDING
        assert process.poll() is not None

    def test_the_namespace_comes_from_the_argument_or_the_url(
        self, redis_server: EmbeddedRedis
    ) -> None:
        """namespace= and the URL's ?namespace= both set it; two different ones are refused."""
        assert Client(redis_server.url, namespace="demo").settings.namespace == "demo"
        assert Client(f"{redis_server.url}?namespace=demo").settings.namespace == "demo"
        assert Client(f"{redis_server.url}?namespace=demo").settings.url() == redis_server.url
        with pytest.raises(SettingsConflict, match="'other' conflicts with the namespace 'demo'"):
            Client(f"{redis_server.url}?namespace=demo", namespace="other")
        with pytest.raises(ValueError, match="namespace"):
            Client(redis_server.url, namespace="no spaces allowed")

    def test_submit_to_an_unserved_namespace_names_the_served_ones(
        self, redis_server: EmbeddedRedis, namespace: str, run: Runner
    ) -> None:
        """Nothing serves `default` here: submit raises NoService naming the namespace that is
        served (a router host's health record says so) and writes nothing."""
        served = f"{namespace}-served"

        async def scenario() -> None:
            admin = client_from_url(redis_server.url)
            keys = Keys(served)
            record = keys.health("router", "serve/router")
            await admin.set(record, "{}", px=30_000)
            await admin.sadd(keys.health_index, record)
            try:
                async with AsyncClient(redis_server.url, namespace=namespace) as client:
                    with pytest.raises(NoService) as info:
                        await client.submit("embed", {"text": "hi"})
                    assert (await client.stats()).ingress == 0
                    message = str(info.value)
                    assert f"namespace {namespace!r}" in message
                    assert served in message
                async with AsyncClient(redis_server.url, namespace=served) as client:
                    handle = await client.submit("embed", {"text": "hi"})
                    assert await handle.status() is JobStatus.PENDING
            finally:
                await admin.delete(
                    *[k async for k in admin.scan_iter(f"bilevel:{{{served}}}:*", count=1000)]
                )
                await admin.aclose()

        run(scenario())

    def test_waiting_on_an_unserved_namespace_fails_fast(
        self, redis_server: EmbeddedRedis, namespace: str, run: Runner
    ) -> None:
        """A job queued for a later service (require_service=False) cannot be awaited while
        nothing serves it: result() raises NoService at once instead of timing out."""

        async def scenario() -> None:
            async with AsyncClient(
                redis_server.url, namespace=namespace, require_service=False
            ) as queuer:
                handle = await queuer.submit("embed", {"text": "later"})
            async with AsyncClient(redis_server.url, namespace=namespace) as client:
                started = time.monotonic()
                with pytest.raises(NoService):
                    await client.handle(handle.id).result(timeout=30)
                assert time.monotonic() - started < 5.0

        run(scenario())


class TestBadInput:
    """Every bad submission raises InvalidJob naming the field, and writes nothing."""

    @pytest.mark.parametrize(
        ("payload", "field"),
        [
            (b"raw", "payload"),
            (float("nan"), "payload"),
            ({"a": [1, float("inf")]}, "payload.a[1]"),
            ({1, 2}, "payload"),
            ({"obj": object()}, "payload.obj"),
            ({1: "int key"}, "payload"),
        ],
    )
    def test_non_json_payload(
        self, client: Client, store: Store, run: Runner, payload: Any, field: str
    ) -> None:
        """Bytes, NaN, infinity, sets, objects and non-str keys are refused with their path."""
        with pytest.raises(InvalidJob) as info:
            client.submit("embed", payload)
        assert info.value.field == f"jobs[0].{field}"
        assert _nothing_written(store, run)

    @pytest.mark.parametrize(
        ("job_type", "options", "field"),
        [
            ("", {}, "job_type"),
            ("x" * 129, {}, "job_type"),
            (" padded", {}, "job_type"),
            ("embed", {"priority": -1}, "priority"),
            ("embed", {"timeout_s": -5}, "timeout_s"),
            ("embed", {"timeout_s": 0}, "timeout_s"),
            ("embed", {"deadline_s": float("nan")}, "deadline_s"),
            ("embed", {"max_retries": -1}, "max_retries"),
            ("embed", {"tags": [""]}, "tags"),
        ],
    )
    def test_bad_options(
        self,
        client: Client,
        store: Store,
        run: Runner,
        job_type: str,
        options: dict[str, Any],
        field: str,
    ) -> None:
        """Empty or overlong job types and out-of-range options name the field."""
        with pytest.raises(InvalidJob) as info:
            client.submit(job_type, None, **options)
        assert info.value.field == f"jobs[0].{field}"
        assert _nothing_written(store, run)

    def test_unknown_option(self, client: Client, store: Store, run: Runner) -> None:
        """An option the client does not know is a TypeError naming it; nothing is written."""
        with pytest.raises(TypeError, match="colour"):
            client.submit("embed", None, colour="red")
        assert _nothing_written(store, run)

    def test_oversized_payload(
        self, redis_server: EmbeddedRedis, namespace: str, store: Store, run: Runner
    ) -> None:
        """A job over max_payload_bytes is refused with its size and the limit."""
        settings = make_settings(redis_server, namespace, max_payload_bytes=1000)
        with Client(settings=settings) as small, pytest.raises(InvalidJob, match="over the limit"):
            small.submit("embed", "x" * 2000)
        assert _nothing_written(store, run)

    def test_one_bad_job_in_a_batch_writes_none(
        self, client: Client, store: Store, run: Runner
    ) -> None:
        """submit_many validates every job before writing any."""
        requests = [JobRequest("embed", 1), JobRequest("embed", {"b": b"x"})]
        with pytest.raises(InvalidJob, match=r"jobs\[1\]\.payload\.b"):
            client.submit_many(requests)
        assert _nothing_written(store, run)


def _nothing_written(store: Store, run: Runner) -> bool:
    keys = run(store.redis.keys(f"bilevel:{{{store.settings.namespace}}}:*"))
    return keys == []


class TestManyWaiters:
    def test_a_thousand_concurrent_results_over_few_connections(
        self, settings: Settings, run: Runner
    ) -> None:
        """Awaiting 1,000 results at once works and does not open a connection per waiter."""

        async def main() -> tuple[list[Any], int]:
            async with AsyncClient(settings=settings) as c:
                handles = await c.submit_many([JobRequest("embed", i) for i in range(1000)])
                waiters = asyncio.gather(*(h.result(timeout=30) for h in handles))
                await asyncio.sleep(0.05)
                store = c.store
                await store.enqueue([(h.id, "q") for h in handles])
                leases = await store.lease("q", 1000)
                await store.complete(
                    [(lease.job_id, lease.token, lease.spec.payload) for lease in leases]
                )
                results = await waiters
                # This client's connections as the server sees them (named by its namespace).
                clients = await store.redis.client_list()
                return list(results), len(clients)

        results, connections = run(main())
        assert results == list(range(1000))
        # The whole server, other fixtures included, stays far below one connection per waiter.
        assert connections <= 100


class TestGather:
    def test_gather_returns_results_in_order_and_raises_the_first_failure(
        self, settings: Settings, run: Runner
    ) -> None:
        """gather() waits for many jobs at once; failures raise, or come back in place."""

        async def main() -> tuple[list[Any], list[Any], tuple[str, str]]:
            async with AsyncClient(settings=settings) as c:
                handles = await c.submit_many([JobRequest("embed", i) for i in range(300)])
                waiting = asyncio.ensure_future(c.gather(handles, timeout=30))
                await asyncio.sleep(0.02)
                store = c.store
                await store.enqueue([(h.id, "q") for h in handles])
                leases = await store.lease("q", 300)
                ok = [lease for lease in leases if lease.spec.payload != 7]
                await store.complete([(x.job_id, x.token, x.spec.payload * 2) for x in ok])
                [bad] = [lease for lease in leases if lease.spec.payload == 7]
                await store.fail(
                    bad.job_id, bad.token, ErrorInfo(type="E", message="seven"), retryable=False
                )
                with pytest.raises(JobFailed, match="seven"):
                    await waiting
                mixed = await c.gather(handles, return_exceptions=True)
                done = await c.gather(handles[:5])
                late = await c.submit("embed", 1)
                with pytest.raises(JobTimeout) as info:
                    await c.gather([handles[0], late], timeout=0.2)
                return done, mixed, (info.value.job_id, late.id)

        done, mixed, which = run(main())
        assert done == [0, 2, 4, 6, 8]
        assert isinstance(mixed[7], JobFailed)
        assert [m for i, m in enumerate(mixed) if i != 7] == [2 * i for i in range(300) if i != 7]
        assert which[0] == which[1]

    def test_sync_gather(self, client: Client, settings: Settings) -> None:
        """The sync client's gather waits the same way."""
        handles = client.submit_many([JobRequest("embed", i) for i in range(3)])

        async def serve_three() -> None:
            async with AsyncClient(settings=settings) as worker:
                for i in range(3):
                    await _serve_one(worker.store, "q", i)

        worker = threading.Thread(target=asyncio.run, args=(serve_three(),))
        worker.start()
        assert sorted(client.gather(handles, timeout=10)) == [0, 1, 2]
        worker.join()


class TestResultDelivery:
    @pytest.mark.parametrize("size", [10, 20_000])
    def test_small_results_ride_the_notice_and_large_ones_are_read(
        self, settings: Settings, run: Runner, size: int
    ) -> None:
        """A waiter gets the same result whether it came inline with the finish notice (small)
        or had to be read from the record (over the inline limit)."""

        async def main() -> Any:
            async with AsyncClient(settings=settings) as c:
                handle = await c.submit("embed", None)
                waiter = asyncio.ensure_future(handle.result(timeout=10))
                await asyncio.sleep(0.02)
                await _serve_one(c.store, "q", {"text": "x" * size, "n": [1, 2]})
                return await waiter

        assert run(main()) == {"text": "x" * size, "n": [1, 2]}
