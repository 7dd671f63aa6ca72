"""Redis memory one queued job holds, the figure behind admission's default total cap.

Submits N jobs of a typical payload (about 200 bytes of JSON: a prompt and a few options) into
a private embedded Redis and reads INFO memory before and after: bytes per job is the growth over
N. Measured twice: jobs waiting in the ingress (just submitted), and routed into a queue (their
queue order and age entries instead of the ingress entry). Prints one JSON object.
Run: `python -m benchmarks.bench_admission [N]`.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

from scheduler.admission import DEFAULT_MAX_QUEUED, MEASURED_BYTES_PER_JOB
from scheduler.connection import client_from_url
from scheduler.embedded_redis import EmbeddedRedis
from scheduler.models import build_spec, new_job_id
from scheduler.settings import Settings
from scheduler.store import NewJob, Store

BATCH = 500
PAYLOAD = {
    "prompt": "Summarise the following support ticket in two sentences for the on-call engineer.",
    "max_tokens": 256,
    "temperature": 0.2,
    "user": "u-1234567",
}


def _jobs(n: int) -> list[NewJob]:
    out = []
    for _ in range(n):
        options = {"tenant": "acme", "tags": ("gpu",)}
        spec, text = build_spec("llm_small", PAYLOAD, options, max_payload_bytes=1 << 20)
        out.append(NewJob(new_job_id(), spec, text))
    return out


async def _used(store: Store) -> int:
    info = await store.redis.info("memory")
    return int(info["used_memory"])


async def main(n: int) -> dict[str, Any]:
    with EmbeddedRedis() as server:
        settings = Settings.from_url(server.url, namespace="mem", require_service=False)
        store = Store(client_from_url(server.url), settings)
        spec_bytes = len(_jobs(1)[0].spec_json)
        before = await _used(store)
        ids: list[str] = []
        for _ in range(n // BATCH):
            ids += [job_id for _, job_id in await store.submit(_jobs(BATCH))]
        pending = await _used(store)
        for i in range(0, len(ids), BATCH):
            await store.enqueue([(job_id, "llm_small") for job_id in ids[i : i + BATCH]])
        queued = await _used(store)
        await store.close()
    return {
        "benchmark": "admission_bytes_per_queued_job",
        "jobs": len(ids),
        "spec_json_bytes": spec_bytes,
        "bytes_per_job_in_ingress": round((pending - before) / len(ids)),
        "bytes_per_job_in_queue": round((queued - before) / len(ids)),
        "assumed_bytes_per_job": MEASURED_BYTES_PER_JOB,
        "default_max_queued_total": DEFAULT_MAX_QUEUED,
        "default_cap_memory_gb": round(DEFAULT_MAX_QUEUED * (queued - before) / len(ids) / 1e9, 2),
    }


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 100_000))))
