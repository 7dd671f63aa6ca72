"""Typed uses of the client API; checked by mypy --strict in tests/unit/test_public_api.py."""

from __future__ import annotations

from typing import Any

from scheduler import (
    AsyncClient,
    Client,
    InvalidJob,
    JobFailed,
    JobHandle,
    JobRequest,
    JobStatus,
    JobTimeout,
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
