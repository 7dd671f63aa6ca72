"""A corrupt record never halts serving: planted beside healthy jobs in the ingress, a queue, a lease
set or the delayed set, the victim is dead-lettered with a reason naming what was wrong (or its
stale entry dropped), every healthy job is served, and no script leaves a job half moved."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scheduler.codes import Code
from scheduler.connection import client_from_url
from scheduler.embedded_redis import EmbeddedRedis
from scheduler.errors import JobNotFound
from scheduler.keys import INGRESS_QUEUE
from scheduler.models import ErrorInfo, JobStatus
from scheduler.service.router_loop import RouterLoop
from scheduler.settings import Settings
from scheduler.store import Lease, Store
from tests.conftest import ManualClock, Runner, make_settings
from tests.integration.helpers import assert_each_job_in_one_place, new_job, submit_to_queue
from tests.integration.service_helpers import service_config

QUEUE = "q"
HEALTHY = 3
LEASE_S = 10.0
DELAY_S = 5.0

# Where the victim is planted, and so which reader meets it first.
INGRESS = "ingress"  # the router's read (Store.pending, then enqueue)
QUEUED = "queue"  # a worker's lease
EXPIRED = "lease set, expired"  # the controller's requeue of leases whose workers died
REPORTED = "lease set, reported"  # the workers' heartbeat and complete
DELAYED = "delayed set"  # the controller's promotion of due jobs
PLACES = (INGRESS, QUEUED, EXPIRED, REPORTED, DELAYED)
ALL = frozenset(PLACES)
# Every path ends with a lease: a field only the lease needs is fatal wherever the job starts.
BEFORE_LEASE = frozenset({INGRESS, QUEUED, EXPIRED, DELAYED})
AFTER_ROUTING = frozenset({QUEUED, EXPIRED, REPORTED, DELAYED})


@dataclass
class Planted:
    victim: str
    healthy: list[str]
    # Leases the (live) workers hold, for the lease-set places.
    leases: dict[str, Lease]


async def plant(store: Store, place: str) -> Planted:
    """The victim and HEALTHY jobs, all in `place`; the victim at the head."""
    delay = DELAY_S if place == DELAYED else 0.0
    jobs = [new_job(payload=i, delay_s=delay) for i in range(HEALTHY + 1)]
    if place == INGRESS:
        await store.submit(jobs)
    else:
        await submit_to_queue(store, QUEUE, *jobs)
    leases: dict[str, Lease] = {}
    if place in (EXPIRED, REPORTED):
        for lease in await store.lease(QUEUE, len(jobs), lease_s=LEASE_S):
            leases[lease.job_id] = lease
        assert len(leases) == len(jobs)
    return Planted(jobs[0].id, [j.id for j in jobs[1:]], leases)


async def drain(store: Store) -> None:
    """Live workers lease everything in the queues and complete it (a record may name a queue of
    its own: it is served there)."""
    queues = {QUEUE}
    async for key in store.redis.scan_iter(match=f"{store.keys.prefix}q:*", count=1000):
        queues.add(key.removeprefix(f"{store.keys.prefix}q:"))
    for queue in sorted(queues):
        while leases := await store.lease(queue, 10, lease_s=LEASE_S):
            done = [(lease.job_id, lease.token, f"done {lease.job_id}") for lease in leases]
            await store.complete(done)


async def serve(store: Store, clock: ManualClock, place: str, planted: Planted) -> None:
    """The readers of `place` run, then the workers drain the queue; last, everything left behind
    is swept (leases expire, due jobs are promoted) and drained again."""
    if place == INGRESS:
        pending = await store.pending(10)
        await store.enqueue([(p.id, QUEUE) for p in pending])
    elif place == DELAYED:
        clock.advance(DELAY_S + 1)
        await store.promote_due()
    elif place == EXPIRED:
        clock.advance(LEASE_S + 1)
        await store.requeue_expired()
    elif place == REPORTED:
        held = list(planted.leases.values())
        codes = await store.heartbeat([(lease.job_id, lease.token) for lease in held])
        done = [lease for lease, code in zip(held, codes, strict=True) if code is Code.OK]
        await store.complete(
            [(lease.job_id, lease.token, f"done {lease.job_id}") for lease in done]
        )
    await drain(store)
    clock.advance(60.0)
    await store.requeue_expired()
    await store.promote_due()
    await drain(store)


# -- the corrupt kinds ------------------------------------------------------------------------

Corrupt = Callable[[Store, str], Awaitable[Any]]


def set_field(name: str, value: str | bytes) -> Corrupt:
    async def apply(store: Store, job_id: str) -> None:
        await store.redis.hset(store.keys.job(job_id), name, value)

    return apply


def drop_field(name: str) -> Corrupt:
    async def apply(store: Store, job_id: str) -> None:
        await store.redis.hdel(store.keys.job(job_id), name)

    return apply


def key_of_type(kind: str) -> Corrupt:
    async def apply(store: Store, job_id: str) -> None:
        key = store.keys.job(job_id)
        await store.redis.delete(key)
        if kind == "string":
            await store.redis.set(key, "garbage")
        elif kind == "list":
            await store.redis.rpush(key, "garbage")
        else:
            await store.redis.sadd(key, "garbage")

    return apply


async def delete_record(store: Store, job_id: str) -> None:
    await store.redis.delete(store.keys.job(job_id))


async def contradict(store: Store, job_id: str) -> None:
    """The record says the job is in a place it is not."""
    status = await store.redis.hget(store.keys.job(job_id), "status")
    other = "pending" if status == "queued" else "queued"
    await store.redis.hset(store.keys.job(job_id), mapping={"status": other, "queue": QUEUE})


def view(**fields: Any) -> str:
    return json.dumps({"t": "embed", **fields})


@dataclass(frozen=True)
class Kind:
    name: str
    apply: Corrupt
    # The words the dead-letter reason must contain.
    reason: str
    # Where the victim must end dead; elsewhere the damaged field is one no reader on its path
    # needs, and the victim is served like the others.
    fatal_in: frozenset[str]
    # The record is gone: its entries are dropped, nothing is dead-lettered.
    dropped: bool = False


KINDS = [
    Kind("routing view priority 1e400", set_field("rt", '{"t":"embed","p":1e400}'),
         "priority", frozenset({INGRESS})),
    Kind("routing view priority 2.5", set_field("rt", view(p=2.5)), "priority",
         frozenset({INGRESS})),
    Kind("routing view priority true", set_field("rt", view(p=True)), "priority",
         frozenset({INGRESS})),
    Kind("routing view priority -1", set_field("rt", view(p=-1)), "priority",
         frozenset({INGRESS})),
    Kind("routing view tag unhashable", set_field("rt", view(g=[[1]])), "tags[0]",
         frozenset({INGRESS})),
    Kind("routing view tags not a list", set_field("rt", view(g="gpu")), "tags",
         frozenset({INGRESS})),
    Kind("routing view 100,000 brackets", set_field("rt", "[" * 100_000 + "]" * 100_000),
         "bytes long", frozenset({INGRESS})),
    Kind("routing view JSON nested 1,000 deep",
         set_field("rt", '{"t":"embed","g":' + "[" * 1000 + "]" * 1000 + "}"),
         "recursion limit", frozenset({INGRESS})),
    Kind("routing view tenant not a string", set_field("rt", view(n=5)), "tenant",
         frozenset({INGRESS})),
    Kind("routing view deadline infinite", set_field("rt", '{"t":"embed","d":1e400}'),
         "deadline", frozenset({INGRESS})),
    Kind("routing view deadline NaN", set_field("rt", '{"t":"embed","d":NaN}'), "deadline",
         frozenset({INGRESS})),
    Kind("routing view job type not a string", set_field("rt", '{"t":7}'), "job type",
         frozenset({INGRESS})),
    Kind("routing view not an object", set_field("rt", "[]"), "routing view",
         frozenset({INGRESS})),
    Kind("routing view not JSON", set_field("rt", "{not json"), "not valid JSON",
         frozenset({INGRESS})),
    Kind("routing view not UTF-8", set_field("rt", b'{"t":"\xff"}'), "not valid JSON",
         frozenset({INGRESS})),
    Kind("no status", drop_field("status"), "no status", ALL),
    Kind("unknown status", set_field("status", "exploded"), "unknown status", ALL),
    Kind("status not UTF-8", set_field("status", b"\xff"), "unknown status", ALL),
    Kind("status contradicts the index", contradict, "says it is", ALL),
    Kind("no order", drop_field("order"), "no order", ALL),
    Kind("order garbled", set_field("order", "garbage"), "order", ALL),
    Kind("order of another job", set_field("order", "9999" + "0" * 30 + ":other"),
         "not an order of this job", ALL),
    Kind("attempts garbled", set_field("attempts", "1e400"), "attempts", ALL),
    Kind("no attempts", drop_field("attempts"), "no attempts", frozenset({EXPIRED, REPORTED})),
    Kind("maxr garbled", set_field("maxr", "many"), "maxr", BEFORE_LEASE),
    Kind("no maxr", drop_field("maxr"), "no maxr", BEFORE_LEASE),
    Kind("no created_ms", drop_field("created_ms"), "no created_ms", frozenset({INGRESS})),
    Kind("due_ms garbled", set_field("due_ms", "0x10"), "due_ms", frozenset({INGRESS})),
    Kind("no due_ms", drop_field("due_ms"), "no due_ms", frozenset({INGRESS})),
    Kind("queue garbled", set_field("queue", "../x"), "queue", AFTER_ROUTING),
    Kind("no queue", drop_field("queue"), "no queue", AFTER_ROUTING),
    Kind("no spec", drop_field("spec"), "no spec", BEFORE_LEASE),
    Kind("spec not JSON", set_field("spec", "{nope"), "stored spec", BEFORE_LEASE),
    Kind("spec not UTF-8", set_field("spec", b'{"t":"\xff\xfe"}'), "stored spec", BEFORE_LEASE),
    Kind("job key a string", key_of_type("string"), "string, not a hash", ALL),
    Kind("job key a list", key_of_type("list"), "list, not a hash", ALL),
    Kind("job key a set", key_of_type("set"), "set, not a hash", ALL),
    Kind("record deleted", delete_record, "", ALL, dropped=True),
]  # fmt: skip


@pytest.mark.parametrize("place", PLACES)
@pytest.mark.parametrize("kind", KINDS, ids=[k.name for k in KINDS])
def test_corrupt_victim_is_settled_and_the_rest_served(
    store: Store, run: Runner, clock: ManualClock, kind: Kind, place: str
) -> None:
    """Each corrupt kind in each place: the victim ends dead with a reason naming the problem (or
    is served, when nothing on its path needs the damaged field; or its entries are dropped, when
    its record is gone), every healthy job succeeds, and every job is in exactly one place."""
    planted = run(plant(store, place))
    run(kind.apply(store, planted.victim))
    run(serve(store, clock, place, planted))

    for job_id in planted.healthy:
        job = run(store.get(job_id))
        assert (job.status, job.result) == (JobStatus.SUCCEEDED, f"done {job_id}")
    run(assert_each_job_in_one_place(store, [planted.victim, *planted.healthy]))
    if kind.dropped:
        with pytest.raises(JobNotFound):
            run(store.get(planted.victim))
        return
    if place not in kind.fatal_in:
        # What its client sees (get() would also judge the fields only the worker needed).
        [outcome] = run(store.outcomes([planted.victim]))
        assert (outcome.status, outcome.result) == (JobStatus.SUCCEEDED, f"done {planted.victim}")
        return
    victim = run(store.get(planted.victim))
    assert victim.status is JobStatus.DEAD
    assert victim.error is not None
    assert victim.error.type == "CorruptJob"
    assert kind.reason in victim.error.message
    assert run(store.stats()).corrupt_records >= 1
    [outcome] = run(store.outcomes([planted.victim]))
    assert outcome.status is JobStatus.DEAD


class TestWrongTypeJobKey:
    def test_key_is_moved_aside_whole_and_named_in_the_reason(
        self, store: Store, run: Runner, clock: ManualClock
    ) -> None:
        """A job key holding a list is renamed aside with its content, the job dead-lettered in a
        fresh record whose reason names where it went, and the count shows it."""
        [(_, victim), (_, good)] = run(store.submit([new_job(), new_job()]))
        key = store.keys.job(victim)
        run(store.redis.delete(key))
        run(store.redis.rpush(key, "a", "b"))
        assert [p.id for p in run(store.pending(10))] == [good]
        aside = store.keys.moved_aside(key, store.now_ms())
        assert run(store.redis.lrange(aside, 0, -1)) == ["a", "b"]
        assert 0 < run(store.redis.pttl(aside)) <= store.settings.dead_ttl_s * 1000
        job = run(store.get(victim))
        assert job.status is JobStatus.DEAD
        assert job.error is not None
        assert aside in job.error.message
        assert run(store.dead_ids(INGRESS_QUEUE)) == [victim]
        stats = run(store.stats())
        assert (stats.corrupt_records, stats.keys_moved_aside) == (1, 1)

    def test_client_waiting_on_it_is_told(self, store: Store, run: Runner) -> None:
        """A client that waits on a job whose key is then overwritten gets its CorruptJob
        outcome as soon as a reader settles it, not a timeout."""
        [(_, victim)] = run(store.submit([new_job()]))

        async def scenario() -> Any:
            waiting = asyncio.ensure_future(store.wait_finished(victim, timeout_s=30))
            while not await store.redis.exists(store.keys.waiters(victim)):
                await asyncio.sleep(0.01)  # until the watch has registered the waiter
            key = store.keys.job(victim)
            await store.redis.delete(key)
            await store.redis.set(key, "x")
            await store.pending(10)
            return await waiting

        outcome = run(scenario())
        assert outcome.status is JobStatus.DEAD
        assert outcome.error is not None
        assert "string, not a hash" in outcome.error.message

    def test_wait_on_unreadable_record_ends_at_once(self, store: Store, run: Runner) -> None:
        """Waiting on a job whose record is already not a hash, or has a garbled status, returns
        its CorruptJob outcome at once instead of waiting for a worker that never comes."""
        [(_, a), (_, b)] = run(store.submit([new_job(), new_job()]))
        run(store.redis.delete(store.keys.job(a)))
        run(store.redis.set(store.keys.job(a), "x"))
        run(store.redis.hset(store.keys.job(b), "status", "exploded"))
        outcomes = run(store.wait_finished_many([a, b], timeout_s=5))
        assert [o.status for o in outcomes] == [JobStatus.DEAD, JobStatus.DEAD]
        assert all(o.error is not None and o.error.type == "CorruptJob" for o in outcomes)


class TestReadersOfOneRecord:
    def test_get_and_outcomes_of_unreadable_fields(self, store: Store, run: Runner) -> None:
        """get and outcomes never raise for what a record holds (a result that is not JSON, an
        error that is not an ErrorInfo, a time that is not a number, a field that is not UTF-8):
        a finished record keeps its status with a CorruptJob error naming the field, an
        unfinished one is dead-lettered."""
        ids = run(submit_to_queue(store, QUEUE, *(new_job() for _ in range(5))))
        for lease in run(store.lease(QUEUE, 4)):
            run(store.complete([(lease.job_id, lease.token, 1)]))
        key = store.keys.job
        damage = [
            ("result", "[" * 5000),
            ("error", '{"type": 5}'),
            ("finished_ms", "soon"),
            ("result", b"\xff"),
            ("started_ms", "-1"),  # the one still queued
        ]
        for job_id, (name, value) in zip(ids, damage, strict=True):
            run(store.redis.hset(key(job_id), name, value))
        jobs = run(store.get_many(ids))
        for job, (name, _) in zip(jobs, damage, strict=True):
            assert job is not None
            assert job.error is not None
            assert job.error.type == "CorruptJob"
            assert name in job.error.message
        assert [j.status for j in jobs if j is not None] == [JobStatus.SUCCEEDED] * 4 + [
            JobStatus.DEAD
        ]
        outcomes = run(store.outcomes(ids))
        assert [o.status for o in outcomes] == [JobStatus.SUCCEEDED] * 4 + [JobStatus.DEAD]
        assert [o.error is not None for o in outcomes] == [True, True, False, True, True]
        assert run(store.lease(QUEUE, 5)) == []  # the dead one's member is dropped
        run(assert_each_job_in_one_place(store, ids))

    def test_cancel_and_move_of_corrupt_records(self, store: Store, run: Runner) -> None:
        """cancel and move dead-letter a record they cannot read (CORRUPT) and go on."""
        a, b, c = run(submit_to_queue(store, QUEUE, new_job(), new_job(), new_job()))
        run(store.redis.hdel(store.keys.job(a), "order"))
        run(store.redis.delete(store.keys.job(b)))
        run(store.redis.set(store.keys.job(b), "x"))
        assert run(store.cancel(a)) is Code.CORRUPT
        assert run(store.move([b, c], "other")) == [Code.CORRUPT, Code.OK]
        assert run(store.queued_ids("other")) == [c]
        assert run(store.get(a)).status is JobStatus.DEAD
        # Their members left in the queue (their orders were unknown) go with the next lease.
        assert run(store.lease(QUEUE, 5)) == []
        run(assert_each_job_in_one_place(store, [a, b, c]))

    def test_fail_and_release_of_corrupt_records(self, store: Store, run: Runner) -> None:
        """A worker's fail or release on a record gone bad dead-letters it (CORRUPT); the other
        leases of the batch are handed back."""
        ids = run(submit_to_queue(store, QUEUE, new_job(), new_job(), new_job()))
        leases = run(store.lease(QUEUE, 3))
        run(store.redis.hset(store.keys.job(ids[0]), "maxr", "x"))
        run(store.redis.hset(store.keys.job(ids[1]), "released", "-1"))
        boom = ErrorInfo(type="Boom", message="boom")
        assert run(store.fail(ids[0], leases[0].token, boom)) is Code.CORRUPT
        codes = run(store.release([(lease.job_id, lease.token) for lease in leases[1:]]))
        assert codes == [Code.CORRUPT, Code.OK]
        assert run(store.queued_ids(QUEUE)) == [ids[2]]
        run(assert_each_job_in_one_place(store, ids))

    def test_garbled_counter_restarts_instead_of_failing(self, store: Store, run: Runner) -> None:
        """A queue's running total holding garbage restarts from the new count; the enqueue that
        met it still happens."""
        run(store.redis.hset(store.keys.counts(QUEUE), "enqueued", "lots"))
        run(submit_to_queue(store, QUEUE, new_job()))
        assert run(store.stats([QUEUE])).queues[QUEUE].enqueued_total == 1


# -- structural keys of the wrong type ----------------------------------------------------------


STRUCTURAL: list[tuple[str, Callable[[Store], str]]] = [
    ("ingress", lambda s: s.keys.ingress),
    ("queue", lambda s: s.keys.queue(QUEUE)),
    ("queue ages", lambda s: s.keys.queue_age(QUEUE)),
    ("lease set", lambda s: s.keys.leased(QUEUE)),
    ("delayed set", lambda s: s.keys.delayed),
    ("queue set", lambda s: s.keys.queues),
    ("queue signal", lambda s: s.keys.queue_signal(QUEUE)),
    ("queue counts", lambda s: s.keys.counts(QUEUE)),
    ("dead-letter set", lambda s: s.keys.dead(QUEUE)),
    ("corrupt totals", lambda s: s.keys.corrupt_totals),
    ("ingress signal", lambda s: s.keys.ingress_signal),
]


@pytest.mark.parametrize(("name", "key_of"), STRUCTURAL, ids=[n for n, _ in STRUCTURAL])
def test_structural_key_of_wrong_type_is_moved_aside(
    store: Store, run: Runner, clock: ManualClock, name: str, key_of: Callable[[Store], str]
) -> None:
    """A store key of the wrong Redis type is renamed aside (with its content) by the first
    script that needs it, which then does its work; jobs submitted after the router's next read
    go the whole way, through every reader, and the count of keys moved aside shows it."""
    key = key_of(store)
    run(store.redis.delete(key))
    run(store.redis.set(key, "garbage"))
    # The router's read comes first: submit.lua itself does not check the ingress keys.
    assert run(store.pending(10)) == []
    jobs = [new_job(payload=i, delay_s=DELAY_S if i == 2 else 0.0) for i in range(3)]
    job_ids = [j.id for j in jobs]
    run(store.submit(jobs))
    pending = run(store.pending(10))
    run(store.enqueue([(p.id, QUEUE) for p in pending]))
    [first] = run(store.lease(QUEUE, 1, lease_s=LEASE_S))
    clock.advance(LEASE_S + 1)  # the first lease expires: its worker died
    run(store.requeue_expired())
    clock.advance(DELAY_S)
    run(store.promote_due())
    run(store.stats())
    run(drain(store))
    for job_id in job_ids:
        assert run(store.get(job_id)).status is JobStatus.SUCCEEDED, (name, job_id)
    run(assert_each_job_in_one_place(store, job_ids))
    moved = [
        k
        for k in run(store.redis.keys(f"{store.keys.prefix}corrupt:*"))
        if k != store.keys.corrupt_totals
    ]
    original = key.removeprefix(store.keys.prefix)
    [aside] = [k for k in moved if k.endswith(f":{original}")]
    assert run(store.redis.get(aside)) == "garbage"
    assert run(store.stats()).keys_moved_aside >= 1
    assert first.token == 1


# -- fuzzing ------------------------------------------------------------------------------------

FIELDS = (
    "status", "queue", "order", "attempts", "maxr", "released", "due_ms", "created_ms",
    "started_ms", "spec", "rt", "cancel", "w", "result", "error", "finished_ms",
)  # fmt: skip
# Values a record could plausibly hold by mistake: numbers Lua and Python read differently, the
# names of other states and queues, and whatever text or bytes.
TRICKY = (
    "", "0", "-1", "1", "2", "1e400", "inf", "nan", "0x10", " 5", "1.5", "9" * 40, "queued",
    "running", "pending", "delayed", "retrying", "dead", "succeeded", "cancelled", "q", "zz",
    "../q", "null", "{}", "[]",
)  # fmt: skip
NUMBERS = ("1e400", "-1e400", "1e308", "-0", "2.0", "true", "null", "NaN", "Infinity", "9" * 400)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3)
    ),
    max_leaves=8,
)
field_values = st.one_of(
    st.none(),  # the field is deleted
    st.sampled_from(TRICKY),
    st.text(max_size=40),
    st.binary(max_size=40),
    st.integers().map(str),
    json_values.map(json.dumps),
)
routing_views = st.one_of(
    # Any mix of the view's keys, each a JSON value of any type.
    st.dictionaries(st.sampled_from(["t", "p", "g", "n", "d", "x"]), json_values, max_size=5).map(
        lambda d: json.dumps({"t": "embed", **d})
    ),
    # A number JSON reads in its own way in one of the view's places.
    st.tuples(st.sampled_from(["p", "d", "t", "g", "n"]), st.sampled_from(NUMBERS)).map(
        lambda kv: '{"t":"embed","' + kv[0] + '":' + kv[1] + "}"
    ),
    # Deep nesting, inside the view or as all of it.
    st.integers(1, 3000).map(lambda d: '{"t":"embed","g":' + "[" * d + "]" * d + "}"),
    st.integers(1, 120_000).map(lambda d: "[" * d + "]" * d),
    st.text(max_size=60),
    st.binary(max_size=60),
)
key_types = st.sampled_from(["string", "list", "set", "zset"])
# The order part of a queue member, garbled but of its length, so the member still names its job.
# (A member that names no job is dropped; one that lost the job's id leaves the job in no index at
# all, which no reader of an index can see.)
order_heads = st.one_of(
    st.binary(min_size=35, max_size=35),
    st.text(alphabet=st.characters(max_codepoint=127), min_size=35, max_size=35),
)


@dataclass(frozen=True)
class Damage:
    fields: tuple[tuple[str, str | bytes | None], ...] = ()
    key_type: str | None = None
    # An extra entry beside the victim's in its index (an id, or a queue member).
    extra_entry: str | bytes | None = None
    # The victim's queue member replaced by this order part + its id.
    member_head: str | bytes | None = None


damages = st.one_of(
    st.lists(st.tuples(st.sampled_from(FIELDS), field_values), min_size=1, max_size=3).map(
        lambda changes: Damage(fields=tuple(changes))
    ),
    routing_views.map(lambda rt: Damage(fields=(("rt", rt),))),
    key_types.map(lambda t: Damage(key_type=t)),
    st.one_of(st.text(max_size=60), st.binary(max_size=60)).map(lambda e: Damage(extra_entry=e)),
    order_heads.map(lambda head: Damage(member_head=head)),
)


def _index_of(store: Store, place: str) -> str:
    return {
        INGRESS: store.keys.ingress,
        QUEUED: store.keys.queue(QUEUE),
        EXPIRED: store.keys.leased(QUEUE),
        REPORTED: store.keys.leased(QUEUE),
        DELAYED: store.keys.delayed,
    }[place]


async def _damage(store: Store, place: str, victim: str, damage: Damage) -> None:
    key = store.keys.job(victim)
    for name, value in damage.fields:
        if value is None:
            await store.redis.hdel(key, name)
        else:
            await store.redis.hset(key, name, value)
    if damage.key_type is not None:
        await key_of_type(damage.key_type)(store, victim)
    index = _index_of(store, place)
    if damage.extra_entry is not None:
        score = 0 if place == QUEUED else store.now_ms()
        await store.redis.zadd(index, {damage.extra_entry: score})
    if damage.member_head is not None and place == QUEUED:
        order = await store.redis.hget(key, "order")
        head = damage.member_head
        member = (head + victim.encode()) if isinstance(head, bytes) else head + victim
        await store.redis.zrem(index, order)
        await store.redis.zadd(index, {member: 0})


async def _fuzz_case(store: Store, clock: ManualClock, place: str, damage: Damage) -> None:
    planted = await plant(store, place)
    await _damage(store, place, planted.victim, damage)
    await serve(store, clock, place, planted)
    # Every reader answers, whatever the record holds.
    ids = [planted.victim, *planted.healthy]
    await store.stats()
    await store.stats([QUEUE])
    await store.get_many(ids)
    outcomes = {o.job_id: o for o in await store.outcomes(planted.healthy)}
    for job_id in planted.healthy:
        assert (outcomes[job_id].status, outcomes[job_id].result) == (
            JobStatus.SUCCEEDED,
            f"done {job_id}",
        )
    await assert_each_job_in_one_place(store, ids)
    try:
        [victim] = await store.outcomes([planted.victim])
    except JobNotFound:
        return  # gone, and (above) in no index: its entries were dropped
    if victim.status.finished:
        if victim.status is JobStatus.DEAD:
            assert victim.error is not None
            assert victim.error.message
        return
    # Not finished: only a job legitimately waiting for a due time far ahead.
    assert victim.status is JobStatus.DELAYED, victim
    due = await store.redis.zscore(store.keys.delayed, planted.victim)
    assert due is not None
    assert due > store.now_ms()


@pytest.mark.slow
def test_fuzzed_records_never_stop_serving(own_redis: EmbeddedRedis) -> None:
    """Whatever a victim's record, routing view, queue entry or key type holds, no exception
    escapes the store's readers, the healthy jobs beside it are all served, every job is in
    exactly one place, and the victim ends finished (dead with a reason, or served), dropped
    with its record gone, or delayed until a due time it was given."""

    @settings(
        max_examples=300,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(place=st.sampled_from(PLACES), damage=damages)
    def case(place: str, damage: Damage) -> None:
        loop = asyncio.new_event_loop()
        redis = client_from_url(own_redis.url)
        clock = ManualClock()
        namespace = f"fz{uuid.uuid4().hex[:10]}"
        store = Store(redis, make_settings(own_redis, namespace), clock=clock)
        try:
            loop.run_until_complete(_fuzz_case(store, clock, place, damage))
        finally:
            loop.run_until_complete(_drop(store))
            loop.close()

    case()


async def _drop(store: Store) -> None:
    async for key in store.redis.scan_iter(match=f"{store.keys.prefix}*", count=1000):
        await store.redis.delete(key)
    await store.close()
    await store.redis.aclose()


def test_waits_on_a_signal_key_of_wrong_type_do_not_fail(store: Store, run: Runner) -> None:
    """A blocked router or worker whose signal key holds the wrong type waits its timeout out
    instead of failing; the next read moves the key aside, and signals work again."""
    run(store.redis.set(store.keys.queue_signal(QUEUE), "x"))
    run(store.redis.set(store.keys.ingress_signal, "x"))
    assert run(store.wait_for_queue(QUEUE, 0.01)) is False
    assert run(store.wait_for_ingress(0.01)) is False
    assert run(store.lease(QUEUE)) == []
    assert run(store.pending(10)) == []
    run(submit_to_queue(store, QUEUE, new_job()))
    assert run(store.wait_for_queue(QUEUE, 0.01)) is True
    assert run(store.wait_for_ingress(0.01)) is True
    assert run(store.stats()).keys_moved_aside == 2


class TestRouterKeepsServing:
    def test_pending_fills_the_places_of_corrupt_jobs(self, store: Store, run: Runner) -> None:
        """pending(n) returns n routable jobs when the oldest ones are corrupt in any way, so a
        router reading in batches never takes a short batch for an empty ingress."""
        jobs = [new_job(payload=i) for i in range(8)]
        run(store.submit(jobs))
        bad = [j.id for j in jobs[:4]]
        run(store.redis.hset(store.keys.job(bad[0]), "rt", '{"t":"embed","p":1e400}'))
        run(store.redis.hset(store.keys.job(bad[1]), "rt", view(g=[[1]])))
        run(store.redis.hdel(store.keys.job(bad[2]), "order"))
        run(store.redis.delete(store.keys.job(bad[3])))
        run(store.redis.rpush(store.keys.job(bad[3]), "x"))
        assert [p.id for p in run(store.pending(4))] == [j.id for j in jobs[4:]]
        assert sorted(run(store.dead_ids(INGRESS_QUEUE))) == sorted(bad)

    def test_router_loop_routes_every_job_behind_corrupt_ones(
        self, store: Store, settings: Settings, run: Runner
    ) -> None:
        """The reported outage: the router loop, meeting each corrupt kind at the head of the
        ingress, routes every healthy job behind it, batch after batch."""
        loop = RouterLoop(store, service_config(settings, routing={"batch_size": 3}))
        # The router reads what routing needs; the spec and attempts are judged by the lease.
        lease_only = {"attempts garbled", "no spec", "spec not JSON", "spec not UTF-8"}
        kinds = [k for k in KINDS if INGRESS in k.fatal_in and k.name not in lease_only]
        victims = [new_job(payload=i) for i in range(len(kinds))]
        healthy = [new_job(payload=i) for i in range(2 * len(kinds))]
        # Each victim heads a batch: victim, healthy, healthy, victim, ...
        order = [j for v, i in zip(victims, range(len(kinds)), strict=True)
                 for j in (v, healthy[2 * i], healthy[2 * i + 1])]  # fmt: skip
        run(store.submit(order))
        for kind, victim in zip(kinds, victims, strict=True):
            run(kind.apply(store, victim.id))
        run(loop.drain())
        assert run(store.stats()).ingress == 0
        for job in healthy:
            assert run(store.get(job.id)).status is JobStatus.QUEUED
        for kind, victim in zip(kinds, victims, strict=True):
            if kind.dropped:
                with pytest.raises(JobNotFound):
                    run(store.get(victim.id))
                continue
            dead = run(store.get(victim.id))
            assert dead.status is JobStatus.DEAD, kind.name
            assert dead.error is not None
            assert kind.reason in dead.error.message, kind.name


@pytest.mark.parametrize("ended", ["dead", "succeeded", "cancelled"])
@pytest.mark.parametrize("place", [INGRESS, QUEUED, EXPIRED, DELAYED])
def test_a_record_that_says_it_ended_is_kept_and_indexed_where_it_ended(
    store: Store, run: Runner, clock: ManualClock, ended: str, place: str
) -> None:
    """A record whose status says the job ended while its entry sits in a live index: the stale
    entry is dropped and the job is in the one index of its end, so listings, replay and purge
    find it: a finished list for a succeeded or cancelled record (which stands), the dead-letter
    set for a dead one, dead-lettered as corrupt so that it carries a reason."""
    planted = run(plant(store, place))
    run(store.redis.hset(store.keys.job(planted.victim), "status", ended))
    run(serve(store, clock, place, planted))
    run(assert_each_job_in_one_place(store, [planted.victim, *planted.healthy]))
    victim = run(store.get(planted.victim))
    assert victim.status is JobStatus(ended)
    if ended == "dead":
        assert victim.error is not None
        assert "job record says it is dead" in victim.error.message
