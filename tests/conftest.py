"""Shared fixtures: one real Redis server per test session (the embedded one, started here), a fresh
namespace per test, and a clock the test moves by hand."""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import sys
import tempfile
import uuid
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

# hypothesis is imported here, at the shallow stack of conftest loading: left to its pytest plugin,
# it is first imported from deep inside the session's end, where Python 3.11.7's parser can fail
# with "AST constructor recursion depth mismatch" (CPython gh-106905) after the tests all passed.
import hypothesis  # noqa: F401
import pytest

from scheduler.connection import client_from_url
from scheduler.embedded_redis import EmbeddedRedis
from scheduler.settings import Settings
from scheduler.store import Store

T = TypeVar("T")

REPO_ROOT = Path(__file__).resolve().parent.parent

# Tests must never reach a server configured in the developer's shell.
os.environ.pop("BILEVEL_REDIS_URL", None)
# Every service a test starts serves its metrics and dashboard on a free port (services of the
# same test, and test runs side by side on one machine, would fight over the default port).
os.environ["BILEVEL_METRICS__PORT"] = "0"
# The Redis the project installs (make: Debian's 7.x, with TLS) before any other, as the Makefile
# puts it, so a bare `pytest` tests the same server as `make test`.
_PROJECT_REDIS = REPO_ROOT / ".cache" / "redis" / "bin"
if _PROJECT_REDIS.is_dir():
    os.environ["PATH"] = f"{_PROJECT_REDIS}{os.pathsep}{os.environ.get('PATH', '')}"


class ManualClock:
    """A clock that only moves when the test says so (seconds since the epoch)."""

    def __init__(self, start_s: float = 1_800_000_000.0) -> None:
        self.now_s = start_s

    def __call__(self) -> float:
        return self.now_s

    def advance(self, seconds: float) -> None:
        self.now_s += seconds


@pytest.fixture(scope="session")
def redis_server() -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis() as server:
        yield server


@pytest.fixture(scope="module")
def own_redis() -> Iterator[EmbeddedRedis]:
    """A Redis server of the module's own, for tests that scan the keyspace once per example:
    on the session's server the keys every earlier test left would make each scan long."""
    with EmbeddedRedis() as server:
        yield server


@pytest.fixture
def namespace() -> str:
    return f"t{uuid.uuid4().hex[:12]}"


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


class Runner:
    """Runs coroutines on the test's event loop from plain (sync) test code."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop

    def __call__(self, coro: Coroutine[Any, Any, T]) -> T:
        # Before pytest-timeout kills a hung test, print where every task of the loop is waiting:
        # its thread dump shows only that the loop is idle.
        dump = self.loop.call_later(TASK_DUMP_AFTER_S, _dump_tasks, self.loop)
        try:
            return self.loop.run_until_complete(coro)
        finally:
            dump.cancel()


TASK_DUMP_AFTER_S = 240.0


def _dump_tasks(loop: asyncio.AbstractEventLoop) -> None:
    for task in asyncio.all_tasks(loop):
        print(f"~~~ task {task.get_name()} ~~~", file=sys.stderr)
        # Follow the await chain down: a suspended task's own stack is only its outer frame.
        awaited: Any = task.get_coro()
        while awaited is not None:
            frame = getattr(awaited, "cr_frame", None) or getattr(awaited, "gi_frame", None)
            if frame is None:
                print(f"  awaiting {awaited!r}", file=sys.stderr)
                break
            code = frame.f_code
            print(f"  {code.co_filename}:{frame.f_lineno} {code.co_name}", file=sys.stderr)
            awaited = getattr(awaited, "cr_await", None) or getattr(awaited, "gi_yieldfrom", None)


@pytest.fixture
def run(loop: asyncio.AbstractEventLoop) -> Runner:
    return Runner(loop)


def make_settings(server: EmbeddedRedis, namespace: str, **overrides: Any) -> Settings:
    # Most tests drive the store and the loops without a service publishing its health, so they
    # do not require one; the tests of that check ask for it.
    values: dict[str, Any] = {
        "namespace": namespace,
        "retry_jitter": 0.0,
        "require_service": False,
        **overrides,
    }
    return Settings.from_url(server.url, **values)


@pytest.fixture
def settings(redis_server: EmbeddedRedis, namespace: str) -> Settings:
    return make_settings(redis_server, namespace)


@pytest.fixture
def store(
    redis_server: EmbeddedRedis, settings: Settings, clock: ManualClock, run: Runner
) -> Iterator[Store]:
    redis = client_from_url(redis_server.url)
    store = Store(redis, settings, clock=clock, rng=random.Random(7))
    yield store
    run(store.close())
    run(_drop_namespace(redis, settings.namespace))


async def _drop_namespace(redis: Any, namespace: str) -> None:
    async for key in redis.scan_iter(match=f"bilevel:{{{namespace}}}:*", count=1000):
        await redis.delete(key)
    await redis.aclose()


@pytest.fixture(scope="session")
def ray_local() -> Iterator[None]:
    """One local Ray for the session, in its own temp dir, shut down at the end (never `ray stop`).

    Started only by tests that ask for it. Unix socket paths must stay short, hence /tmp.
    """
    import ray

    temp_dir = tempfile.mkdtemp(prefix="blray", dir="/tmp")
    ray.init(
        num_cpus=4,
        include_dashboard=False,
        _temp_dir=temp_dir,
        namespace=f"bilevel-test-{uuid.uuid4().hex[:8]}",
        # Worker processes import test-only handler modules (tests.*) from the repo root.
        runtime_env={"env_vars": {"PYTHONPATH": str(REPO_ROOT)}},
        log_to_driver=False,
        configure_logging=False,
    )
    try:
        yield
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
