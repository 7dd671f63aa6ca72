"""Ray Serve: a no-op deployment with one replica per core, called through a DeploymentHandle.

Ray is started here in its own temp dir and shut down here (ray.shutdown), never `ray stop`.
Serve keeps no queue in Redis: requests go from the handle's router to a replica actor and the
response comes back the same way, so Redis is not involved.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from benchmarks.peers import processes, procstat
from benchmarks.peers.base import Load, Session
from benchmarks.peers.harness import SyncSession

REPLICAS = processes.CORES
# Serve's default (5, since Ray 2.32) is sized for model calls: with 2 replicas it lets 10 requests
# out of the handle at a time and the rest wait in the handle's back-off, which here held a no-op
# to 45 jobs/s batched against 322 with 100 (the default before 2.32). An async no-op holds any
# number at once.
MAX_ONGOING_REQUESTS = 100
_ACTOR_TITLES = ("ray::ServeController", "ray::ServeReplica")


class _Driver:
    def __init__(self, handle: Any) -> None:
        self._handle = handle

    def submit_batch(self, payloads: Sequence[int]) -> Any:
        # No batch submission in Serve: handle calls return at once, so a loop of them is its
        # way to have many in flight.
        return [self._handle.remote(x) for x in payloads]

    def wait_batch(self, handle: Any, timeout_s: float) -> list[Any]:
        return [response.result(timeout_s=timeout_s) for response in handle]

    def submit(self, payload: int) -> Any:
        return self._handle.remote(payload)

    def wait(self, handle: Any, timeout_s: float) -> Any:
        return handle.result(timeout_s=timeout_s)


def _serve_actors(ray_temp_dir: str) -> list[procstat.ProcStat]:
    """This run's Serve actor processes (controller and replicas): children of the raylet that
    was started in this run's temp dir, so another Ray on the machine is not counted."""

    def ours(pid: int, cmdline: str) -> bool:
        if not cmdline.startswith(_ACTOR_TITLES):
            return False
        stat = procstat.read_stat(pid)
        return stat is not None and ray_temp_dir in procstat.read_cmdline(stat.ppid)

    return procstat.matching(ours)


class RayServePeer:
    name = "ray_serve"
    settings: Mapping[str, str] = {
        "replicas": f"{REPLICAS} replicas of an async no-op deployment, one per core "
        "(num_cpus 1 each, Serve's default)",
        "max_ongoing_requests": f"{MAX_ONGOING_REQUESTS}: the async no-op holds any number at once; "
        "Serve's default of 5 (sized for model calls) held it to 45 jobs/s batched here against 322",
        "proxy_location": "Disabled: Serve's setting for an application called only through "
        "deployment handles (no HTTP)",
        "client": "DeploymentHandle.remote(...).result() from the driver; 16 threads share the "
        "handle",
        "batch API": "none in Serve: 100 handle.remote calls in a loop (each returns at once)",
        "delivery": "a request whose replica dies fails back to the caller (no retry queue)",
        "idle CPU": "the Serve actor processes (controller and replicas), as bilevel's figure "
        "counts its actor processes; Ray's own daemons are left out of both",
    }
    # With thousands of requests outstanding, the handle's router does not send them in order, so
    # one result may wait for most of the phase: a smaller batched phase and a longer bound.
    load = Load(batched_jobs=4000, individual_jobs=1600, result_timeout_s=300.0)

    def unavailable(self) -> str | None:
        return None

    def start(self, redis_url: str, workdir: Path, stack: ExitStack) -> Session:
        import ray
        from ray import serve

        # Ray's socket paths must stay short: a temp dir directly under /tmp.
        ray_temp_dir = tempfile.mkdtemp(prefix="blserve", dir="/tmp")
        stack.callback(shutil.rmtree, ray_temp_dir, ignore_errors=True)
        ray.init(
            _temp_dir=ray_temp_dir,
            num_cpus=processes.CORES,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
            namespace="bilevel-bench-serve",
        )
        stack.callback(ray.shutdown)

        @serve.deployment(num_replicas=REPLICAS, max_ongoing_requests=MAX_ONGOING_REQUESTS)
        class Noop:
            async def __call__(self, x: int) -> int:
                return x

        serve.start(proxy_location="Disabled")
        stack.callback(serve.shutdown)
        handle = serve.run(Noop.bind(), name="noop", route_prefix=None)
        return SyncSession(_Driver(handle), lambda: _serve_actors(ray_temp_dir))


PEER = RayServePeer()
