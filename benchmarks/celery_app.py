"""Celery reference for bench_e2e: a no-op task, Redis broker and result backend."""

from __future__ import annotations

import os

from celery import Celery

_url = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
app = Celery("bench", broker=_url, backend=_url)
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    worker_prefetch_multiplier=4,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)


@app.task(name="noop")
def noop(x: int) -> int:
    return x
