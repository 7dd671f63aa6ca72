"""The recording against a real Redis: what finishing a job appends (Keys.record), its cap, that
corrupt data neither breaks a finish nor a read, and the model loads a worker reports."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from scheduler.codes import Code
from scheduler.connection import client_from_url
from scheduler.embedded_redis import EmbeddedRedis
from scheduler.models import ErrorInfo, JobStatus
from scheduler.recording import Recording, read_recording
from scheduler.settings import Settings
from scheduler.store import RunReport, Store
from tests.conftest import ManualClock, Runner, make_settings
from tests.integration import handlers_for_tests  # noqa: F401  (registers test.echo)
from tests.integration.helpers import new_job, submit_to_queue
from workers.model_worker import ModelWorker

BOOM = ErrorInfo(type="RuntimeError", message="boom")


@pytest.fixture
def settings(redis_server: EmbeddedRedis, namespace: str) -> Settings:
    # The recording is off by default.
    return make_settings(redis_server, namespace, record=True)


def recorded(store: Store, run: Runner, **window: Any) -> Recording:
    return run(read_recording(store.redis, store.keys, **window))


def entries(store: Store, run: Runner) -> list[dict[str, str]]:
    return [fields for _, fields in run(store.redis.xrange(store.keys.record))]


class TestWhatIsRecorded:
    def test_a_completed_job_is_recorded_with_its_times_and_reports(
        self, store: Store, run: Runner, clock: ManualClock
    ) -> None:
        """Arrival, first start, finish, queue, routing view, attempts, status, the worker's run
        time and the handler's tokens: one entry per completed job."""
        job = new_job("generate", {"p": 1}, priority=5, tenant="acme", deadline_s=30)
        [job_id] = run(submit_to_queue(store, "llm", job))
        clock.advance(1.5)
        [lease] = run(store.lease("llm"))
        clock.advance(0.25)
        report = RunReport(run_s=0.2345, tokens_in=12, tokens_out=40)
        assert run(store.complete([(job_id, lease.token, "ok")], reports=[report])) == [Code.OK]
        [served] = recorded(store, run).jobs
        assert served.job_id == job_id
        assert served.queue == "llm"
        assert (served.job_type, served.priority, served.tenant) == ("generate", 5, "acme")
        assert served.deadline_s == 30
        assert served.status is JobStatus.SUCCEEDED
        assert served.attempts == 1
        assert served.wait_s == 1.5
        assert served.finished_ms - served.created_ms == 1750
        assert served.run_s == pytest.approx(0.2345)
        assert (served.tokens_in, served.tokens_out) == (12, 40)

    def test_a_job_that_dies_is_recorded_once_with_its_last_run(
        self, store: Store, run: Runner, clock: ManualClock
    ) -> None:
        """A retried attempt adds nothing; the attempt that dead-letters the job adds one entry,
        status dead, with that attempt's run time."""
        [job_id] = run(submit_to_queue(store, "q", new_job(max_retries=1)))
        [lease] = run(store.lease("q"))
        assert run(store.fail(job_id, lease.token, BOOM, run_s=0.5)) is Code.RETRY_SCHEDULED
        assert entries(store, run) == []
        clock.advance(10.0)
        run(store.promote_due())
        [lease] = run(store.lease("q"))
        assert run(store.fail(job_id, lease.token, BOOM, run_s=0.75)) is Code.DEAD_LETTERED
        [served] = recorded(store, run).jobs
        assert (served.status, served.attempts, served.run_s) == (JobStatus.DEAD, 2, 0.75)

    def test_a_job_whose_lease_expires_for_good_is_recorded_without_a_run_time(
        self, store: Store, run: Runner, clock: ManualClock
    ) -> None:
        """A job whose worker died on its last attempt is dead with no run time: no worker
        reported one."""
        [job_id] = run(submit_to_queue(store, "q", new_job(max_retries=0)))
        run(store.lease("q", lease_s=1.0))
        clock.advance(2.0)
        assert run(store.requeue_expired()).dead_lettered == 1
        [served] = recorded(store, run).jobs
        assert (served.job_id, served.status, served.run_s) == (job_id, JobStatus.DEAD, None)

    def test_a_job_cancelled_while_queued_is_not_recorded(self, store: Store, run: Runner) -> None:
        """Only the scripts that finish a job a worker held record it: a cancel does not."""
        [job_id] = run(submit_to_queue(store, "q", new_job()))
        assert run(store.cancel(job_id)) is Code.OK
        assert entries(store, run) == []

    def test_every_entry_has_the_same_fields_in_the_same_order(
        self, store: Store, run: Runner
    ) -> None:
        """So the stream stores the field names once per node, not once per entry; the times,
        queue, attempts, status, run time and tokens packed in 'v'."""
        ids = run(submit_to_queue(store, "q", new_job(), new_job(tenant="t")))
        leases = run(store.lease("q", 2))
        run(store.complete([(leases[0].job_id, leases[0].token, 1)]))
        run(store.fail(leases[1].job_id, leases[1].token, BOOM, retryable=False))
        names = [list(fields) for fields in entries(store, run)]
        assert len(names) == len(ids)
        assert names[0] == names[1]
        assert names[0] == ["id", "rt", "v"]
        values = [fields["v"].split(" ") for fields in entries(store, run)]
        assert [len(v) for v in values] == [9, 9]
        assert [v[5] for v in values] == ["succeeded", "dead"]


class TestSettings:
    def test_recording_off_records_nothing(
        self, redis_server: EmbeddedRedis, namespace: str, clock: ManualClock, run: Runner
    ) -> None:
        """With Settings.record off no finish and no model load touches the recording."""
        settings = make_settings(redis_server, namespace, record=False)
        store = Store(client_from_url(redis_server.url), settings, clock=clock)
        try:
            [job_id] = run(submit_to_queue(store, "q", new_job()))
            [lease] = run(store.lease("q"))
            run(store.complete([(job_id, lease.token, 1)], reports=[RunReport(0.1)]))
            run(store.record_model_load("q", {"embed": 1.0}))
            assert run(store.redis.exists(store.keys.record, store.keys.record_loads)) == 0
        finally:
            run(store.close())

    def test_the_recording_stays_near_its_cap(
        self, redis_server: EmbeddedRedis, namespace: str, clock: ManualClock, run: Runner
    ) -> None:
        """Past record_max_len entries the oldest are trimmed (whole nodes of up to 100) by the
        first entry of each completion call, so at most the cap, one call's batch and one node
        stay; the newest are kept."""
        settings = make_settings(redis_server, namespace, record=True, record_max_len=1_000)
        store = Store(client_from_url(redis_server.url), settings, clock=clock)
        try:
            for _ in range(6):
                ids = run(submit_to_queue(store, "q", *(new_job() for _ in range(500))))
                leases = run(store.lease("q", 500))
                run(store.complete([(x.job_id, x.token, None) for x in leases]))
            length = run(store.redis.xlen(store.keys.record))
            assert 1_000 <= length <= 1_000 + 500 + 100
            [(_, last)] = run(store.redis.xrevrange(store.keys.record, count=1))
            assert last["id"] == ids[-1]
        finally:
            run(store.close())

    def test_settings_bound_the_cap(self) -> None:
        """Recording is off by default; a cap below 1,000 or above 10 million entries is refused,
        naming the field."""
        assert Settings().record is False
        with pytest.raises(ValueError, match="record_max_len"):
            Settings(record_max_len=10)
        with pytest.raises(ValueError, match="record_max_len"):
            Settings(record_max_len=100_000_000)


class TestCorruptData:
    def test_a_recording_key_of_the_wrong_type_is_moved_aside_and_the_finish_goes_on(
        self, store: Store, run: Runner
    ) -> None:
        """A string where the stream belongs does not fail the completion: it is renamed aside
        (counted) and the entry starts a fresh stream."""
        run(store.redis.set(store.keys.record, "not a stream"))
        [job_id] = run(submit_to_queue(store, "q", new_job()))
        [lease] = run(store.lease("q"))
        assert run(store.complete([(job_id, lease.token, 1)])) == [Code.OK]
        assert run(store.get(job_id)).status is JobStatus.SUCCEEDED
        assert [j.job_id for j in recorded(store, run).jobs] == [job_id]
        assert run(store.stats()).keys_moved_aside == 1

    def test_a_stream_that_refuses_entries_costs_the_entries_not_the_batch(
        self, store: Store, run: Runner
    ) -> None:
        """A stream whose IDs ran out (written by hand at the last ID) refuses every XADD: the
        whole batch still completes, unrecorded, and the stream is left as it was."""
        last = "18446744073709551615-18446744073709551615"
        run(store.redis.xadd(store.keys.record, {"x": "y"}, id=last))
        ids = run(submit_to_queue(store, "q", new_job(), new_job()))
        leases = run(store.lease("q", 2))
        assert run(store.complete([(x.job_id, x.token, 1) for x in leases])) == [Code.OK] * 2
        assert all(run(store.get(i)).status is JobStatus.SUCCEEDED for i in ids)
        assert run(store.redis.xlen(store.keys.record)) == 1
        assert run(store.stats(["q"])).queues["q"].in_flight == 0

    def test_a_record_with_garbled_fields_finishes_and_its_entry_is_skipped_by_readers(
        self, store: Store, run: Runner
    ) -> None:
        """A record whose routing view is garbage still completes; the recording copies what it
        holds, and a reader skips that entry with the reason and reads the others."""
        good, bad = run(submit_to_queue(store, "q", new_job(), new_job()))
        run(store.redis.hset(store.keys.job(bad), "rt", "\xff{not json"))
        leases = run(store.lease("q", 2))
        codes = run(store.complete([(x.job_id, x.token, 1) for x in leases]))
        assert codes == [Code.OK, Code.OK]
        found = recorded(store, run)
        assert [j.job_id for j in found.jobs] == [good]
        assert found.skipped == 1
        assert "routing view" in found.reasons[0]

    def test_a_record_found_corrupt_at_completion_is_recorded_dead(
        self, store: Store, run: Runner
    ) -> None:
        """Garbled attempts dead-letter the job at completion (CorruptJob); its entry carries
        the garbage, so readers skip it, naming the field."""
        [job_id] = run(submit_to_queue(store, "q", new_job()))
        [lease] = run(store.lease("q"))
        run(store.redis.hset(store.keys.job(job_id), "attempts", "many"))
        assert run(store.complete([(job_id, lease.token, 1)])) == [Code.CORRUPT]
        [fields] = entries(store, run)
        assert fields["v"].split(" ")[4:6] == ["many", "dead"]
        found = recorded(store, run)
        assert found.jobs == []
        assert "'a'" in found.reasons[0]

    def test_entries_written_by_hand_are_skipped_and_counted(
        self, store: Store, run: Runner
    ) -> None:
        """Entries missing fields or holding non-numbers are skipped with their reasons; the
        sound ones around them are read."""
        [job_id] = run(submit_to_queue(store, "q", new_job()))
        run(store.redis.xadd(store.keys.record, {"hello": "world"}))
        [lease] = run(store.lease("q"))
        run(store.complete([(job_id, lease.token, 1)]))
        fields = dict(entries(store, run)[-1])
        values = fields["v"].split(" ")
        run_garbled = " ".join([*values[:6], "-5", *values[7:]])
        running = " ".join([*values[:5], "running", *values[6:]])
        for v in (run_garbled, running, values[0], fields["v"] + " extra"):
            run(store.redis.xadd(store.keys.record, {**fields, "v": v}))
        found = recorded(store, run)
        assert [j.job_id for j in found.jobs] == [job_id]
        assert found.skipped == 5
        assert "no field 'id'" in found.reasons[0]
        assert "'r'" in found.reasons[1]
        assert "not a finished status" in found.reasons[2]
        assert "1 values, not 9" in found.reasons[3]
        assert "10 values, not 9" in found.reasons[4]


class TestReading:
    def test_reading_pages_through_the_whole_window(
        self, store: Store, run: Runner, clock: ManualClock
    ) -> None:
        """Pages smaller than the recording return every entry once; the window keeps the jobs
        submitted in it, by their arrival time."""
        early = run(submit_to_queue(store, "q", *(new_job() for _ in range(5))))
        clock.advance(10.0)
        late = run(submit_to_queue(store, "q", *(new_job() for _ in range(7))))
        leases = run(store.lease("q", 12))
        run(store.complete([(x.job_id, x.token, None) for x in leases]))
        found = run(read_recording(store.redis, store.keys, page=3))
        assert sorted(j.job_id for j in found.jobs) == sorted(early + late)
        assert found.entries_read == 12
        cut_ms = store.now_ms() - 5_000
        windowed = recorded(store, run, since_ms=0, until_ms=cut_ms)
        assert sorted(j.job_id for j in windowed.jobs) == sorted(early)

    def test_a_job_recorded_twice_is_read_once_by_its_last_entry(
        self, store: Store, run: Runner
    ) -> None:
        """A dead job replayed and run again finishes twice; the reader keeps its last outcome."""
        [job_id] = run(submit_to_queue(store, "q", new_job()))
        [lease] = run(store.lease("q"))
        run(store.fail(job_id, lease.token, BOOM, retryable=False))
        [(code, _)] = run(store.replay([job_id], token="r1", to_queue="q", reset_retries=True))
        assert code is Code.OK
        [lease] = run(store.lease("q"))
        run(store.complete([(job_id, lease.token, 1)]))
        assert len(entries(store, run)) == 2
        [served] = recorded(store, run).jobs
        assert served.status is JobStatus.SUCCEEDED


class TestModelLoads:
    def test_a_worker_reports_its_model_loads(self, store: Store, run: Runner) -> None:
        """Assigning a worker records the models it loaded for the queue, seconds each; moving
        back to a queue whose models it holds loads (and records) nothing."""

        async def go() -> None:
            worker = ModelWorker(store, name="w")
            try:
                await worker.assign("echoes", ["test.echo"])
                await worker.assign("echoes", ["test.echo"])
            finally:
                await worker.stop(timeout_s=1.0)

        run(go())
        [load] = recorded(store, run).loads
        assert load.queue == "echoes"
        assert list(load.load_s_by_type) == ["test.echo"]
        assert load.load_s_by_type["test.echo"] >= 0

    def test_a_worker_records_run_time_and_the_tokens_its_handler_reports(
        self, store: Store, run: Runner
    ) -> None:
        """A result with a `usage` object (OpenAI's or Anthropic's names) gives the recorded
        token counts; the client gets the result unchanged."""
        results = [
            {"usage": {"prompt_tokens": 7, "completion_tokens": 21}},
            {"usage": {"input_tokens": 3, "output_tokens": 4}},
            {"usage": {"prompt_tokens": True, "completion_tokens": -1}},
            "no usage",
        ]
        ids = run(submit_to_queue(store, "echoes", *(new_job("test.echo", r) for r in results)))

        async def go() -> None:
            worker = ModelWorker(store, name="w")
            await worker.assign("echoes", ["test.echo"])
            try:
                outcomes = await store.wait_finished_many(ids, 30)
                assert [o.result for o in outcomes] == results
            finally:
                await worker.stop(timeout_s=1.0)

        run(go())
        by_id = {j.job_id: j for j in recorded(store, run).jobs}
        tokens = [(by_id[i].tokens_in, by_id[i].tokens_out) for i in ids]
        assert tokens == [(7, 21), (3, 4), (None, None), (None, None)]
        assert all(by_id[i].run_s is not None and by_id[i].run_s >= 0 for i in ids)


def test_recording_survives_concurrent_finishes(store: Store, run: Runner) -> None:
    """Many completions at once each add exactly one entry."""
    ids = run(submit_to_queue(store, "q", *(new_job() for _ in range(200))))
    leases = run(store.lease("q", 200))

    async def finish_all() -> None:
        await asyncio.gather(*(store.complete([(x.job_id, x.token, None)]) for x in leases))

    run(finish_all())
    assert sorted(j.job_id for j in recorded(store, run).jobs) == sorted(ids)
