"""Celery's side of bench_e2e: a no-op task, Redis broker and result backend, set up for many
short tasks with at-least-once delivery (see benchmarks/peers/celery.py for why each setting)."""

from __future__ import annotations

import os

from celery import Celery

_url = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
app = Celery("bench", broker=_url, backend=_url)
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    worker_prefetch_multiplier=64,
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)


@app.task(name="noop")
def noop(x: int) -> int:
    return x
