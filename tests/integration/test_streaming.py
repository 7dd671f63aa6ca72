"""Streaming results against a real Redis and a real ModelWorker (no Ray): the store's stream
scripts, the worker's shipping, and the client's iterators through worker death, cancellation,
lost connections and the cap."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from scheduler.client import AsyncClient, Client
from scheduler.codes import Code
from scheduler.config import WorkerConfig
from scheduler.connection import client_from_url
from scheduler.embedded_redis import EmbeddedRedis
from scheduler.errors import JobCancelled, JobFailed, JobNotFound, StreamTruncated
from scheduler.models import ErrorInfo, JobStatus
from scheduler.settings import Settings
from scheduler.store import Store
from scheduler.streams import StreamRestart
from tests.conftest import ManualClock, Runner, make_settings
from tests.integration import handlers_for_tests
from tests.integration.helpers import new_job, submit_to_queue
from workers.model_worker import ModelWorker

CONFIG = WorkerConfig(max_batch=16, heartbeat_s=0.3)


@pytest.fixture
def settings(redis_server: EmbeddedRedis, namespace: str) -> Settings:
    return make_settings(redis_server, namespace, lease_s=2.0, retry_backoff_s=0.0)


@pytest.fixture(autouse=True)
def _fresh_handler_state() -> Iterator[None]:
    handlers_for_tests.STREAM_CLOSED.clear()
    handlers_for_tests.GATED_RUNS.clear()
    yield
    # Let every gated generator still waiting finish (it is closed or returns at once).
    for run in handlers_for_tests.GATED_RUNS:
        run.gate.release(10_000)


@asynccontextmanager
async def serving(store: Store, queue: str, *job_types: str) -> AsyncIterator[ModelWorker]:
    worker = ModelWorker(store, config=CONFIG, name="w")
    await worker.assign(queue, job_types)
    try:
        yield worker
    finally:
        await worker.stop(timeout_s=1.0)


@asynccontextmanager
async def routing(store: Store, queue: str) -> AsyncIterator[None]:
    """What the router does for these tests: route the ingress to `queue`."""

    async def route() -> None:
        while True:
            await store.wait_for_ingress(0.05)
            await store.enqueue([(p.id, queue) for p in await store.pending(100)])

    task = asyncio.create_task(route())
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def kill(worker: ModelWorker) -> None:
    """Stop a worker the way a dead process stops: its tasks end, it reports and releases
    nothing, and its lease is left to expire."""
    tasks = [t for t in (worker._serve_task, worker._heartbeat_task) if t is not None]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    worker._serve_task = worker._heartbeat_task = None
    worker._runner.close()


async def until(predicate: Any, what: str, timeout_s: float = 10.0) -> None:
    """Wait (bounded) for a condition another thread or task makes true."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"{what} did not happen"
        await asyncio.sleep(0.005)


async def gated_run(index: int) -> handlers_for_tests.GatedRun:
    await until(lambda: len(handlers_for_tests.GATED_RUNS) > index, f"gated run {index}")
    return handlers_for_tests.GATED_RUNS[index]


async def entries(store: Store, job_id: str) -> list[dict[str, str]]:
    raw = await store.redis.xrange(store.keys.stream(job_id))
    return [fields for _, fields in raw]


async def leased(store: Store, queue: str, job_type: str, payload: Any) -> tuple[str, int]:
    [job_id] = await submit_to_queue(store, queue, new_job(job_type, payload))
    [lease] = await store.lease(queue)
    return job_id, lease.token


class TestStoreStreams:
    def test_append_is_idempotent_per_chunk_and_ended_by_complete(
        self, store: Store, run: Runner
    ) -> None:
        """A retried append skips what is in the stream already; complete adds the terminal
        entry and gives the stream the record's TTL."""

        async def body() -> None:
            job_id, token = await leased(store, "q", "test.stream", {"n": 3})
            assert await store.stream_append(job_id, token, 0, ['"a"', '"b"']) is Code.OK
            assert await store.stream_append(job_id, token, 0, ['"a"', '"b"']) is Code.OK
            assert await store.stream_append(job_id, token, 1, ['"b"', '"c"']) is Code.OK
            await store.complete([(job_id, token, "abc")])
            assert await entries(store, job_id) == [
                {"a": "1", "n": "0", "c": '"a"'},
                {"a": "1", "n": "1", "c": '"b"'},
                {"a": "1", "n": "2", "c": '"c"'},
                {"a": "1", "e": "succeeded"},
            ]
            ttl_ms = await store.redis.pttl(store.keys.stream(job_id))
            assert 0 < ttl_ms <= store.settings.result_ttl_s * 1000

        run(body())

    def test_an_old_lease_appends_nothing_and_a_new_attempt_restarts(
        self, store: Store, clock: ManualClock, run: Runner
    ) -> None:
        """After the lease expired and the job was leased again, the old token is refused; the
        new attempt's first chunk comes after a restart entry."""

        async def body() -> None:
            job_id, first = await leased(store, "q", "test.stream", {"n": 1})
            assert await store.stream_append(job_id, first, 0, ["0"]) is Code.OK
            clock.advance(store.settings.lease_s + 1)
            assert (await store.requeue_expired()).requeued == 1
            [again] = await store.lease("q")
            assert await store.stream_append(job_id, first, 1, ["1"]) is Code.STALE_LEASE
            assert await store.stream_append(job_id, again.token, 0, ["0"]) is Code.OK
            assert await entries(store, job_id) == [
                {"a": "1", "n": "0", "c": "0"},
                {"a": "2", "r": "1"},
                {"a": "2", "n": "0", "c": "0"},
            ]

        run(body())

    def test_cancel_refuses_appends_and_the_fail_ends_the_stream(
        self, store: Store, run: Runner
    ) -> None:
        """A cancelled running job's append says CANCEL_REQUESTED and appends nothing; the
        worker's report then ends the stream as cancelled."""

        async def body() -> None:
            job_id, token = await leased(store, "q", "test.stream", {"n": 1})
            await store.stream_append(job_id, token, 0, ["0"])
            assert await store.cancel(job_id) is Code.CANCEL_PENDING
            assert await store.stream_append(job_id, token, 1, ["1"]) is Code.CANCEL_REQUESTED
            error = ErrorInfo(type="Cancelled", message="cancelled while running")
            await store.fail(job_id, token, error, retryable=False)
            assert [e.get("e") for e in await entries(store, job_id)] == [None, "cancelled"]

        run(body())

    def test_a_job_a_reader_waits_on_gets_an_end_though_it_never_streamed(
        self, store: Store, run: Runner
    ) -> None:
        """stream_watch marks the job, so its finish (here a cancel while queued) writes the
        terminal entry; a job nobody streams or waits on gets no stream at all."""

        async def body() -> None:
            [watched, other] = await submit_to_queue(
                store, "q", new_job("test.echo", 1), new_job("test.echo", 2)
            )
            assert await store.stream_watch(watched) is JobStatus.QUEUED
            await store.cancel(watched)
            await store.cancel(other)
            assert await entries(store, watched) == [{"a": "0", "e": "cancelled"}]
            assert not await store.redis.exists(store.keys.stream(other))
            assert await store.stream_watch("no-such-job") is None

        run(body())

    def test_a_replayed_dead_job_streams_afresh(self, store: Store, run: Runner) -> None:
        """A dead-lettered job's stream ended with its death; replayed, it runs again and its
        stream holds the new attempt only, without the old end that would stop a new reader."""

        async def body() -> None:
            job_id, token = await leased(store, "q", "test.stream", {"n": 2})
            assert await store.stream_append(job_id, token, 0, ['"old"']) is Code.OK
            error = ErrorInfo(type="ValueError", message="bad")
            await store.fail(job_id, token, error, retryable=False)
            assert [e.get("e") for e in await entries(store, job_id)] == [None, "dead"]
            [(code, _)] = await store.replay(
                [job_id], token="replay-1", to_queue=None, reset_retries=True
            )
            assert code is Code.OK
            assert not await store.redis.exists(store.keys.stream(job_id))
            [again] = await store.lease("q")
            assert await store.stream_append(job_id, again.token, 0, ['"new"']) is Code.OK
            await store.complete([(job_id, again.token, "new")])
            assert await entries(store, job_id) == [
                {"a": str(again.token), "n": "0", "c": '"new"'},
                {"a": str(again.token), "e": "succeeded"},
            ]

        run(body())

    def test_a_stream_key_of_the_wrong_type_is_moved_aside(self, store: Store, run: Runner) -> None:
        """Garbage where a stream belongs is renamed aside, and the append goes on."""

        async def body() -> None:
            job_id, token = await leased(store, "q", "test.stream", {"n": 1})
            await store.redis.set(store.keys.stream(job_id), "garbage")
            assert await store.stream_read(job_id, "0-0", block_s=None) == []
            assert await store.stream_append(job_id, token, 0, ["7"]) is Code.OK
            [entry] = await store.stream_read(job_id, "0-0", block_s=None)
            assert (entry.kind, entry.data) == ("chunk", b"7")
            aside = store.keys.moved_aside(store.keys.stream(job_id), store.now_ms())
            assert await store.redis.get(aside) == "garbage"

        run(body())


class TestStreaming:
    def test_every_chunk_in_order_then_the_result_async(
        self, store: Store, settings: Settings, run: Runner
    ) -> None:
        """1,000 chunks arrive in order, in far fewer appends than chunks; `await handle` is the
        generator's return value."""

        async def body() -> None:
            async with (
                AsyncClient(settings=settings) as client,
                serving(store, "q", "test.stream") as worker,
            ):
                [job_id] = await submit_to_queue(store, "q", new_job("test.stream", {"n": 1000}))
                handle = client.handle(job_id)
                chunks = [chunk async for chunk in handle.stream()]
                assert chunks == list(range(1000))
                assert await handle == {"count": 1000}
                # Chunks yielded faster than the flush interval share appends.
                assert 1 <= worker.stream_appends < 100

        run(body())

    def test_every_chunk_in_order_then_the_result_sync(
        self, store: Store, settings: Settings, run: Runner
    ) -> None:
        """The synchronous client iterates the same stream from its own thread; a generator that
        returns nothing has the list of its chunks as its result."""

        def use_client() -> tuple[list[Any], Any, list[Any], Any]:
            with Client(settings=settings) as client:
                counted = client.submit("test.stream", {"n": 300})
                words = client.submit("test.stream_list", "to be or not")
                chunks = list(counted.stream())
                word_chunks = list(words.stream())
                return chunks, counted.result(timeout=10), word_chunks, words.result(timeout=10)

        async def body() -> tuple[list[Any], Any, list[Any], Any]:
            async with serving(store, "q", "test.stream", "test.stream_list"), routing(store, "q"):
                return await asyncio.to_thread(use_client)

        chunks, result, words, word_result = run(body())
        assert chunks == list(range(300))
        assert result == {"count": 300}
        assert words == word_result == ["to", "be", "or", "not"]

    def test_a_job_that_does_not_stream_yields_nothing_and_ends_with_it(
        self, store: Store, settings: Settings, run: Runner
    ) -> None:
        """stream() of a plain job waits for its end and yields nothing, raising its failure;
        a finished one ends at once; an unknown id is JobNotFound."""

        async def body() -> None:
            async with (
                AsyncClient(settings=settings) as client,
                serving(store, "q", "test.echo", "test.fail"),
                routing(store, "q"),
            ):
                echo = await client.submit("test.echo", {"x": 1})
                assert [c async for c in echo.stream()] == []
                assert await echo == {"x": 1}
                assert [c async for c in echo.stream()] == []  # finished already
                failing = await client.submit("test.fail", "p", max_retries=0)
                with pytest.raises(JobFailed, match="boom on 'p'"):
                    async for _ in failing.stream():
                        pass
                with pytest.raises(JobNotFound):
                    async for _ in client.handle("nope").stream():
                        pass

        run(body())

    def test_a_reader_of_a_corrupt_record_ends_with_its_reason(
        self, store: Store, settings: Settings, run: Runner
    ) -> None:
        """A job whose record was overwritten with garbage is dead-lettered when a reader comes,
        and the reader ends with the CorruptJob error, the chunks already streamed first."""

        async def body() -> None:
            job_id, token = await leased(store, "q", "test.stream", {"n": 2})
            await store.stream_append(job_id, token, 0, ["0"])
            await store.redis.delete(store.keys.job(job_id))
            await store.redis.rpush(store.keys.job(job_id), "garbage")
            async with AsyncClient(settings=settings) as client:
                stream = client.handle(job_id).stream()
                assert await anext(stream) == 0
                with pytest.raises(JobFailed) as info:
                    await anext(stream)
            assert info.value.error_type == "CorruptJob"
            assert "not a hash" in info.value.message

        run(body())

    def test_bad_chunks_fail_the_job_at_once(
        self, store: Store, settings: Settings, run: Runner
    ) -> None:
        """A chunk that is not JSON, or a stream handler that returns a str, dead-letters the
        job on its first attempt with the reason; an iterator returned with stream=True streams."""

        async def body() -> None:
            async with (
                AsyncClient(settings=settings) as client,
                serving(store, "q", "test.stream_bad_chunk", "test.stream_returned"),
                routing(store, "q"),
            ):
                bad = await client.submit("test.stream_bad_chunk")
                stream = bad.stream()
                assert await anext(stream) == "fine"
                with pytest.raises(JobFailed) as info:
                    await anext(stream)
                assert info.value.error_type == "InvalidChunk"
                assert "chunk 1" in info.value.message
                assert "set is not JSON" in info.value.message
                text = await client.submit("test.stream_returned", "str")
                with pytest.raises(JobFailed, match="must return an iterator"):
                    await text
                assert (await client.get(text.id)).attempts == 1
                counted = await client.submit("test.stream_returned", 4)
                assert [c async for c in counted.stream()] == [0, 1, 2, 3]
                assert await counted == [0, 1, 2, 3]

        run(body())


class TestWorkerDeath:
    def test_a_worker_killed_mid_stream_restarts_the_stream(
        self, store: Store, settings: Settings, clock: ManualClock, run: Runner
    ) -> None:
        """The first worker dies after 3 chunks; once its lease expires a second worker runs the
        job again: the reader sees the 3 chunks, a StreamRestart telling it to discard them, the
        whole second attempt, and the end; the result is the second attempt's."""

        async def body() -> None:
            async with AsyncClient(settings=settings) as client:
                first = ModelWorker(store, config=CONFIG, name="first")
                await first.assign("q", ["test.stream_gated"])
                [job_id] = await submit_to_queue(store, "q", new_job("test.stream_gated", {"n": 6}))
                stream = client.handle(job_id).stream()
                (await gated_run(0)).gate.release(3)
                seen = [await anext(stream) for _ in range(3)]
                await kill(first)
                clock.advance(settings.lease_s + 1)
                assert (await store.requeue_expired()).requeued == 1
                async with serving(store, "q", "test.stream_gated"):
                    (await gated_run(1)).gate.release(6)
                    seen += [chunk async for chunk in stream]
                    assert await client.handle(job_id) == {"count": 6}
                assert seen == [0, 1, 2, StreamRestart(attempt=2, discard=3), 0, 1, 2, 3, 4, 5]
                assert stream.attempt == 2

        run(body())

    def test_a_late_reader_of_a_restarted_job_sees_both_attempts(
        self, store: Store, settings: Settings, clock: ManualClock, run: Runner
    ) -> None:
        """A reader that starts after the job ended reads the same history: the dead attempt's
        chunks, the restart, the final attempt's."""

        async def body() -> None:
            async with AsyncClient(settings=settings) as client:
                first = ModelWorker(store, config=CONFIG, name="first")
                await first.assign("q", ["test.stream_gated"])
                [job_id] = await submit_to_queue(store, "q", new_job("test.stream_gated", {"n": 2}))
                run0 = await gated_run(0)
                run0.gate.release(1)
                await until(lambda: first.stream_appends == 1, "the first append")
                await kill(first)
                clock.advance(settings.lease_s + 1)
                await store.requeue_expired()
                async with serving(store, "q", "test.stream_gated"):
                    (await gated_run(1)).gate.release(2)
                    await client.handle(job_id)
                seen = [chunk async for chunk in client.handle(job_id).stream()]
                assert seen == [0, StreamRestart(attempt=2, discard=1), 0, 1]

        run(body())


class TestCancel:
    def test_cancel_mid_stream_closes_the_generator(
        self, store: Store, settings: Settings, run: Runner
    ) -> None:
        """The client cancels while chunks flow: the worker stops pulling from the generator and
        closes it (GeneratorExit inside the handler), and the reader ends with JobCancelled."""

        async def body() -> None:
            async with (
                AsyncClient(settings=settings) as client,
                serving(store, "q", "test.stream", "test.echo") as worker,
                routing(store, "q"),
            ):
                handle = await client.submit("test.stream", {"n": 100_000, "pace_s": 0.002})
                stream = handle.stream()
                got = [await anext(stream) for _ in range(5)]
                assert await handle.cancel()

                async def read_on() -> None:
                    async for chunk in stream:
                        got.append(chunk)

                with pytest.raises(JobCancelled):
                    await read_on()
                assert got == list(range(len(got)))
                assert await asyncio.to_thread(handlers_for_tests.STREAM_CLOSED.wait, 10.0)
                assert (await client.get(handle.id)).status is JobStatus.CANCELLED
                # The worker serves on.
                after = await client.submit("test.echo", "next")
                assert await after == "next"
                assert worker.state().healthy

        run(body())

    def test_a_stream_past_its_timeout_fails_and_its_generator_is_closed(
        self, store: Store, settings: Settings, run: Runner
    ) -> None:
        """timeout_s holds for streaming jobs: the reader ends with JobFailed (JobTimeout) and
        the generator is closed."""

        async def body() -> None:
            async with (
                AsyncClient(settings=settings) as client,
                serving(store, "q", "test.stream"),
                routing(store, "q"),
            ):
                handle = await client.submit(
                    "test.stream", {"n": 100_000, "pace_s": 0.002}, timeout_s=0.3
                )
                with pytest.raises(JobFailed) as info:
                    async for _ in handle.stream():
                        pass
                assert info.value.error_type == "JobTimeout"
                assert await asyncio.to_thread(handlers_for_tests.STREAM_CLOSED.wait, 10.0)

        run(body())

    def test_drain_mid_stream_hands_the_job_back_and_it_restarts(
        self, store: Store, settings: Settings, run: Runner
    ) -> None:
        """A worker that drains past its deadline releases the streaming job, closing its
        generator; the next worker runs it again and the reader sees the restart."""

        async def body() -> None:
            async with AsyncClient(settings=settings) as client:
                first = ModelWorker(store, config=CONFIG, name="first")
                await first.assign("q", ["test.stream_gated"])
                [job_id] = await submit_to_queue(store, "q", new_job("test.stream_gated", {"n": 2}))
                stream = client.handle(job_id).stream()
                run0 = await gated_run(0)
                run0.gate.release(1)
                seen = [await anext(stream)]
                report = await first.stop(timeout_s=0.1)
                assert (report.finished, report.released) == (0, 1)
                run0.gate.release(1)  # lets the generator reach its yield, where it is closed
                assert await asyncio.to_thread(run0.closed.wait, 10.0)
                async with serving(store, "q", "test.stream_gated"):
                    (await gated_run(1)).gate.release(2)
                    seen += [chunk async for chunk in stream]
                assert seen == [0, StreamRestart(attempt=2, discard=1), 0, 1]

        run(body())


class TestReconnect:
    def test_a_reader_whose_connection_is_killed_misses_and_repeats_nothing(
        self, store: Store, settings: Settings, run: Runner
    ) -> None:
        """CLIENT KILL of the reader's blocked connection, twice: it reconnects and resumes
        after the last entry it saw, so the chunks arrive each once, in order."""

        async def kill_reader() -> int:
            async def blocked() -> list[int]:
                return [c["id"] for c in await store.redis.client_list() if c["cmd"] == "xread"]

            deadline = time.monotonic() + 10
            while not (ids := await blocked()):
                assert time.monotonic() < deadline, "the reader never blocked"
                await asyncio.sleep(0.005)
            for client_id in ids:
                await store.redis.client_kill_filter(_id=client_id)
            return len(ids)

        async def body() -> None:
            async with (
                AsyncClient(settings=settings) as client,
                serving(store, "q", "test.stream_gated"),
            ):
                [job_id] = await submit_to_queue(store, "q", new_job("test.stream_gated", {"n": 9}))
                stream = client.handle(job_id).stream()
                gate = (await gated_run(0)).gate
                gate.release(3)
                seen = [await anext(stream) for _ in range(3)]
                for _ in range(2):
                    pending = asyncio.ensure_future(anext(stream))
                    assert await kill_reader() == 1
                    gate.release(3)
                    seen.append(await pending)
                    seen += [await anext(stream) for _ in range(2)]
                with pytest.raises(StopAsyncIteration):
                    await anext(stream)
                assert seen == list(range(9))

        run(body())

    def test_every_connection_killed_mid_stream_loses_and_doubles_nothing(
        self, store: Store, settings: Settings, run: Runner
    ) -> None:
        """CLIENT KILL of every connection, the worker's and the reader's, while chunks flow:
        the worker's appends are retried (a retry skips what the lost reply had appended) and the
        reader resumes, so the stream holds each chunk once and the reader gets them in order."""

        async def body() -> None:
            async with (
                AsyncClient(settings=settings) as client,
                serving(store, "q", "test.stream") as worker,
            ):
                payload = {"n": 400, "pace_s": 0.002}
                [job_id] = await submit_to_queue(store, "q", new_job("test.stream", payload))
                handle = client.handle(job_id)

                async def read() -> list[Any]:
                    return [chunk async for chunk in handle.stream()]

                reader = asyncio.ensure_future(read())
                # Its own connection, which the kills skip (SKIPME).
                killer = client_from_url(settings.url() or "", max_connections=1)
                kills = 0
                try:
                    while not reader.done() and kills < 8:
                        # A few appends between kills, so each kill lands mid-stream.
                        target = worker.stream_appends + 5
                        await until(
                            lambda t=target: reader.done() or worker.stream_appends >= t, "appends"
                        )
                        await killer.client_kill_filter(_type="normal", skipme=True)
                        kills += 1
                    assert await reader == list(range(400))
                    assert await handle == {"count": 400}
                    # Read with the connection no kill touched (the pool's others may be dead).
                    held = await killer.xrange(store.keys.stream(job_id))
                finally:
                    await killer.aclose()
                    # Connections the kills closed are dropped, not handed to the fixtures.
                    await store.redis.connection_pool.disconnect()
                assert [int(f["n"]) for _, f in held if "c" in f] == list(range(400))
                assert kills >= 3

        run(body())


class TestCap:
    def test_a_stream_past_its_cap_stays_bounded_and_a_late_reader_is_told(
        self, redis_server: EmbeddedRedis, namespace: str, clock: ManualClock, run: Runner
    ) -> None:
        """With a cap of 100 entries, a 3,000-chunk stream holds about the cap (Redis trims
        whole nodes); a reader that starts after the end gets StreamTruncated saying how many it
        missed, then the chunks still held, in order, to the end; result() is whole."""
        settings = make_settings(redis_server, namespace, stream_max_len=100)

        async def body() -> None:
            store = Store(client_from_url(redis_server.url), settings, clock=clock)
            try:
                async with (
                    AsyncClient(settings=settings) as client,
                    serving(store, "q", "test.stream"),
                ):
                    [job_id] = await submit_to_queue(
                        store, "q", new_job("test.stream", {"n": 3000})
                    )
                    handle = client.handle(job_id)
                    assert await handle == {"count": 3000}
                    held = await store.redis.xlen(store.keys.stream(job_id))
                    assert held <= 100 + 100 + 1  # the cap, one node of slack, the end
                    stream = handle.stream()
                    with pytest.raises(StreamTruncated) as info:
                        await anext(stream)
                    missed = info.value.missed
                    assert 3000 - held < missed < 3000
                    rest = [chunk async for chunk in stream]
                    assert rest == list(range(missed, 3000))
            finally:
                await store.close()
                async for key in store.redis.scan_iter(match=f"{store.keys.prefix}*", count=1000):
                    await store.redis.delete(key)
                await store.redis.aclose()

        run(body())
