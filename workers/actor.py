"""The Ray actor shell around ModelWorker: one worker process per actor, its own Redis connection.

Everything of substance is in workers/model_worker.py; this file only turns constructor arguments
into a Store and a ModelWorker inside the actor's process and forwards calls.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

import ray

from scheduler.config import WorkerConfig
from scheduler.connection import client_from_url
from scheduler.logs import configure_logging
from scheduler.settings import Settings
from scheduler.store import Store
from workers.model_worker import DrainReport, ModelWorker, WorkerState
from workers.registry import load_handler_modules


class ModelWorkerShell:
    """The actor's class. Construct it through `ModelWorkerActor.options(...).remote(...)`."""

    def __init__(
        self,
        name: str,
        settings: Settings,
        worker_config: WorkerConfig,
        handler_modules: Sequence[str],
        drain_timeout_s: float = 30.0,
    ) -> None:
        # Each actor gets a fraction of a core: one intra-op thread per worker keeps torch from
        # oversubscribing the machine when several workers share it. Set before the handler
        # modules import torch; torch itself is only touched if they did import it (importing it
        # here would cost every worker two seconds of start-up, torch or not).
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        configure_logging(settings.log_format, settings.log_level)
        registry = load_handler_modules(handler_modules)
        torch = sys.modules.get("torch")
        if torch is not None:
            torch.set_num_threads(1)
        url = settings.url()
        if url is None:
            raise ValueError(
                "a worker actor needs Settings.redis_url (an embedded server is local)"
            )
        self.worker = ModelWorker(
            Store(client_from_url(url), settings),
            registry=registry,
            config=worker_config,
            name=name,
            drain_timeout_s=drain_timeout_s,
        )

    async def assign(self, queue: str, job_types: Sequence[str]) -> float:
        return await self.worker.assign(queue, job_types)

    async def drain(self, timeout_s: float | None = None) -> DrainReport:
        return await self.worker.drain(timeout_s)

    async def stop(self, timeout_s: float | None = None) -> DrainReport:
        report = await self.worker.stop(timeout_s)
        await self.worker.store.redis.aclose()
        return report

    async def state(self) -> WorkerState:
        return self.worker.state()

    async def ping(self) -> int:
        """The actor's process id: proof of life, and which process it is."""
        return os.getpid()


# max_restarts=0: Ray must not restart a dead worker on its own; the pool notices and replaces it
# on the right queue (a restarted actor would come back with no queue and no model).
ModelWorkerActor: Any = ray.remote(max_restarts=0, max_task_retries=0)(ModelWorkerShell)


__all__ = ["ModelWorkerActor", "ModelWorkerShell"]
