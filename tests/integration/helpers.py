"""Small builders shared by the store tests."""

from __future__ import annotations

from typing import Any

from scheduler.models import build_spec, new_job_id
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
