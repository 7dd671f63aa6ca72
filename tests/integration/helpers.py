"""Small builders shared by the store tests."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from redis.client import NEVER_DECODE

from scheduler.models import JobStatus, build_spec, new_job_id
from scheduler.store import NewJob, Store


def new_job(job_type: str = "embed", payload: Any = None, **options: Any) -> NewJob:
    spec, text = build_spec(job_type, payload, options, max_payload_bytes=1 << 20)
    return NewJob(new_job_id(), spec, text)


async def submit_to_queue(store: Store, queue: str, *jobs: NewJob) -> list[str]:
    """Submit jobs and route them all to `queue`; returns their ids."""
    results = await store.submit(list(jobs))
    ids = [job_id for _, job_id in results]
    await store.enqueue([(job_id, queue) for job_id in ids])
    return ids


# Where a job of each unfinished status must be (and nowhere else); a finished one is in no index
# but one dead-letter set (dead) or one finished index (succeeded, cancelled).
_PLACE_OF = {
    JobStatus.PENDING: "ingress",
    JobStatus.DELAYED: "delayed",
    JobStatus.RETRYING: "delayed",
}


async def job_places(store: Store) -> dict[str, list[str]]:
    """Every index entry of the namespace, by job id: 'ingress', 'delayed', 'queued:<q>',
    'running:<q>', 'dead' or 'finished'. Found by scanning the namespace, so queues nobody configured (a
    corrupt record's) are seen too."""
    keys = store.keys
    places: dict[str, list[str]] = {}

    def add(job_id: str | bytes, place: str) -> None:
        text = job_id.decode(errors="replace") if isinstance(job_id, bytes) else job_id
        places.setdefault(text, []).append(place)

    for key, place in ((keys.ingress, "ingress"), (keys.delayed, "delayed")):
        if await store.redis.type(key) == "zset":
            for job_id in await _members(store, key):
                add(job_id, place)
    async for key in store.redis.scan_iter(match=f"{keys.prefix}*", count=1000):
        kind, _, queue = key.removeprefix(keys.prefix).partition(":")
        if kind not in ("q", "leased", "dead", "done"):
            continue
        if await store.redis.type(key) != ("list" if kind == "done" else "zset"):
            continue
        for member in await _members(store, key, kind == "done"):
            if kind == "q":
                add(member[35:], f"queued:{queue}")
            else:
                add(member, _INDEX_PLACES.get(kind, f"running:{queue}"))
    return places


_INDEX_PLACES = {"dead": "dead", "done": "finished"}


async def _members(store: Store, key: str, is_list: bool = False) -> list[bytes]:
    client: Any = store.redis
    members: list[bytes] = await client.execute_command(
        "LRANGE" if is_list else "ZRANGE", key, 0, -1, **{NEVER_DECODE: True}
    )
    return members


async def assert_each_job_in_one_place(store: Store, job_ids: Iterable[str]) -> None:
    """Each job is in exactly the one place its status names, and one with no record is in none."""
    ids = sorted(set(job_ids))
    places = await job_places(store)
    pipe = store.redis.pipeline(transaction=False)
    for job_id in ids:
        pipe.execute_command(
            "HMGET", store.keys.job(job_id), "status", "queue", **{NEVER_DECODE: True}
        )
    records = await pipe.execute()
    for job_id, (status, raw_queue) in zip(ids, records, strict=True):
        found = places.get(job_id, [])
        if status is None:
            assert found == [], f"job {job_id} has no record but is in {found}"
            continue
        s = JobStatus(status.decode())
        queue = None if raw_queue is None else raw_queue.decode(errors="replace")
        if s is JobStatus.QUEUED:
            expected = [f"queued:{queue}"]
        elif s is JobStatus.RUNNING:
            expected = [f"running:{queue}"]
        elif s is JobStatus.DEAD:
            expected = ["dead"]
        elif s.finished:
            expected = ["finished"]
        else:
            expected = [_PLACE_OF[s]]
        assert found == expected, (job_id, status, found)
