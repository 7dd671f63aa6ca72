"""A live service with a load for the metrics and dashboard tests, and readers of what it serves."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.request
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from scheduler.client import AsyncClient, JobRequest
from scheduler.config import ServiceConfig
from scheduler.connection import client_from_url
from scheduler.settings import Settings
from scheduler.store import Store

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str) -> Samples:
    """Every sample of /metrics, by (sample name, sorted labels without the namespace)."""
    text = urllib.request.urlopen(f"{url}/metrics", timeout=30).read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = tuple(sorted((k, v) for k, v in s.labels.items() if k != "namespace"))
            out[(s.name, labels)] = s.value
    return out


def api_state(url: str) -> dict[str, Any]:
    state: dict[str, Any] = json.loads(
        urllib.request.urlopen(f"{url}/api/state", timeout=30).read()
    )
    return state


LIVE_QUEUES = [
    {"name": "echo", "job_types": ["test.echo"], "min_workers": 1, "slo_s": 5.0},
    {"name": "batch", "job_types": ["test.batch"], "min_workers": 1, "slo_s": 0.001},
]


def live_config(settings: Settings) -> ServiceConfig:
    """Two queues of the test handlers, one worker each; an SLO of 1 ms on one (met
    only by the few batch jobs that arrive as their batch closes)."""
    raw: dict[str, Any] = {
        "store": {**settings.model_dump(), "redis_url": settings.url(), "lease_s": 5.0},
        "handlers": ["tests.integration.handlers_for_tests"],
        "queues": LIVE_QUEUES,
        "allocation": {"budget": 2, "tick_s": 0.3, "policy": "proportional"},
        "metrics": {"port": 0},
    }
    return ServiceConfig.from_mapping(raw)


class Load:
    """Submits jobs of both queues from a thread of its own for `seconds`, then waits for all."""

    def __init__(self, settings: Settings, seconds: float) -> None:
        self.settings = settings
        self.seconds = seconds
        self.submitted = 0
        self.results: list[Any] = []
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            asyncio.run(self._load())
        except BaseException as exc:
            self.error = exc

    async def _load(self) -> None:
        async with AsyncClient(settings=self.settings) as client:
            handles = []
            end = time.monotonic() + self.seconds
            i = 0
            while time.monotonic() < end:
                batch = [
                    JobRequest("test.echo", {"i": i}, tenant="acme" if i % 3 == 0 else None),
                    JobRequest("test.batch", {"i": i}),
                ]
                handles += await client.submit_many(batch)
                self.submitted = len(handles)
                i += 1
                await asyncio.sleep(0.02)
            self.results = await client.gather(handles, timeout=60)

    def __enter__(self) -> Load:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.thread.join(timeout=90)


def store_totals(settings: Settings) -> dict[str, int]:
    async def read() -> dict[str, int]:
        url = settings.url()
        assert url is not None
        store = Store(client_from_url(url), settings)
        try:
            stats = await store.stats([q["name"] for q in LIVE_QUEUES])
        finally:
            await store.close()
        return {n: q.completed_total for n, q in stats.queues.items()}

    return asyncio.run(read())
