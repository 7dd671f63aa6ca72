"""Typed uses of the client API; checked by mypy --strict in tests/unit/test_public_api.py."""

from __future__ import annotations

from typing import Any

from scheduler import (
    AsyncClient,
    CancelOutcome,
    Client,
    InvalidJob,
    Job,
    JobEvent,
    JobFailed,
    JobHandle,
    JobPage,
    JobRequest,
    JobStatus,
    JobSummary,
    JobTimeout,
    ListOrder,
    PurgeReport,
    Refusal,
    ReplayReport,
    Settings,
    StreamRestart,
    StreamTruncated,
)


def sync_usage(url: str) -> Any:
    with Client(url, settings=Settings(namespace="examples")) as client:
        handle: JobHandle = client.submit("embed", {"text": "hi"}, priority=3, tags=["a"])
        status: JobStatus = handle.status()
        handles = client.submit_many([JobRequest("classify", [1.0, 2.0], timeout_s=5.0)])
        try:
            return handle.result(timeout=1.0), status, len(handles)
        except JobFailed as exc:
            return exc.error_type, exc.message, exc.traceback
        except JobTimeout as exc:
            return exc.timeout_s


async def async_usage() -> bool:
    async with AsyncClient("redis://127.0.0.1:6379/0", namespace="demo") as client:
        try:
            handle = await client.submit("generate", {"prompt": "x"}, idempotency_key="k")
        except InvalidJob as exc:
            return exc.field == "payload"
        return await handle.cancel()


def sync_streaming(client: Client) -> str:
    text = ""
    handle = client.submit("generate", {"prompt": "once", "max_tokens": 16})
    for chunk in handle.stream(timeout=30.0):
        if isinstance(chunk, StreamRestart):
            text = ""
            continue
        text += str(chunk)
    final: str = handle.result()
    return final or text


async def async_streaming(client: AsyncClient) -> Any:
    handle = await client.submit("generate", {"prompt": "once"})
    chunks: list[Any] = []
    try:
        async for chunk in handle.stream():
            chunks.append(chunk)
    except StreamTruncated as exc:
        return exc.missed
    return await handle


def dead_letter_usage(url: str) -> tuple[int, int]:
    with Client(url, namespace="examples") as client:
        page: JobPage = client.dead_letters(queue="embed", limit=50)
        failed: list[JobSummary] = [j for j in page.jobs if j.unreadable is None]
        report: ReplayReport = client.replay([j.id for j in failed], reset_retries=False)
        refused: list[Refusal] = list(report.refused)
        purged: PurgeReport = client.purge_all(queue="embed", older_than_s=7 * 86400.0)
        for job in client.iter_jobs(status=JobStatus.SUCCEEDED, order=ListOrder.OLDEST):
            _ = job.finished_s
        job_record: Job = client.get(report.replayed[0])
        events: tuple[JobEvent, ...] = job_record.history
        cancelled = [c for c in client.cancel(["a", "b"]) if c.outcome is CancelOutcome.CANCELLED]
        return purged.purged + len(refused) + len(events), len(cancelled)


async def async_listing_usage() -> list[str]:
    async with AsyncClient("redis://127.0.0.1:6379/0", namespace="demo") as client:
        ids = [job.id async for job in client.iter_jobs(status="dead", tenant="acme")]
        page = await client.jobs(status="queued", queue="embed", limit=10)
        more = page.cursor is not None
        if more:
            await client.jobs(status="queued", queue="embed", limit=10, cursor=page.cursor)
        await client.replay_all(queue="embed", to="embed-v2")
        return ids
