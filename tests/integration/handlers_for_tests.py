"""Test-only handlers, registered in REGISTRY on import (Ray workers import this module too).

Handlers that block take their cue from threading.Events the test controls, never from a timer the
test must outguess.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from typing import Any

from workers.registry import REGISTRY

# Set by "test.hang" when it starts; it then blocks until HANG_RELEASE is set (bounded, so a test
# that forgets to release it cannot wedge the session).
HANG_STARTED = threading.Event()
HANG_RELEASE = threading.Event()
# Sizes of the batches "test.batch" was called with, in order.
BATCH_SIZES: list[int] = []


def _no_model() -> None:
    return None


@REGISTRY.handler("test.echo", loader=_no_model)
def echo(model: None, payload: Any) -> Any:
    return payload


@REGISTRY.handler("test.batch", loader=_no_model, max_batch=8, batch_wait_ms=20.0)
def batch(model: None, payloads: list[Any]) -> list[Any]:
    BATCH_SIZES.append(len(payloads))
    return [{"echo": p, "batch": len(payloads)} for p in payloads]


@REGISTRY.handler("test.fail", loader=_no_model)
def fail(model: None, payload: Any) -> Any:
    raise RuntimeError(f"boom on {payload!r}")


@REGISTRY.handler("test.hang", loader=_no_model)
def hang(model: None, payload: Any) -> str:
    HANG_STARTED.set()
    HANG_RELEASE.wait(timeout=60.0)
    return "released"


@REGISTRY.handler("test.not_json", loader=_no_model)
def not_json(model: None, payload: Any) -> Any:
    return {1, 2, 3} if payload == "set" else b"raw bytes"


@REGISTRY.handler("test.sleep", loader=_no_model)
def sleep(model: None, payload: Any) -> dict[str, int]:
    """Sleeps `payload["seconds"]`; returns the process id that ran it."""
    time.sleep(float(payload["seconds"]))
    return {"pid": os.getpid()}


# -- streaming handlers -----------------------------------------------------------------------


# Set when a "test.stream" generator is closed before its end (GeneratorExit at its yield).
STREAM_CLOSED = threading.Event()


@REGISTRY.handler("test.stream", loader=_no_model)
def stream(model: None, payload: Any) -> Iterator[Any]:
    """Yields payload["n"] chunks: their indexes, or with "stamp" {"i", "t": wall time of the
    yield}, `pace_s` apart; returns {"count": n}."""
    pace_s = float(payload.get("pace_s", 0.0))
    try:
        for i in range(int(payload["n"])):
            yield {"i": i, "t": time.time()} if payload.get("stamp") else i
            if pace_s:
                time.sleep(pace_s)
    except GeneratorExit:
        STREAM_CLOSED.set()
        raise
    return {"count": payload["n"]}


@REGISTRY.handler("test.stream_list", loader=_no_model)
def stream_list(model: None, payload: Any) -> Iterator[str]:
    """Yields the words of payload and returns nothing: its result is the list of its chunks."""
    yield from str(payload).split()


@REGISTRY.handler("test.stream_returned", loader=_no_model, stream=True)
def stream_returned(model: None, payload: Any) -> Any:
    """Not a generator: returns an iterator (or, for payload "str", a str, which is refused)."""
    return "not chunks" if payload == "str" else iter(range(int(payload)))


@REGISTRY.handler("test.stream_bad_chunk", loader=_no_model)
def stream_bad_chunk(model: None, payload: Any) -> Iterator[Any]:
    """Yields one good chunk, then a set (not JSON)."""
    yield "fine"
    yield {1, 2}


class GatedRun:
    """One call of "test.stream_gated": it yields a chunk per permit of `gate`."""

    def __init__(self) -> None:
        self.gate = threading.Semaphore(0)
        self.yielded = 0
        self.closed = threading.Event()


# Every call of "test.stream_gated", in order (an attempt that runs again is a new call).
GATED_RUNS: list[GatedRun] = []


@REGISTRY.handler("test.stream_gated", loader=_no_model)
def stream_gated(model: None, payload: Any) -> Iterator[int]:
    """Yields 0..n-1, each once the test releases a permit of its run's gate (bounded: a run
    nobody releases returns after 30 s); records when its generator is closed early."""
    run = GatedRun()
    GATED_RUNS.append(run)
    try:
        for i in range(int(payload["n"])):
            if not run.gate.acquire(timeout=30.0):
                return {"gave_up_at": i}
            run.yielded += 1
            yield i
    except GeneratorExit:
        run.closed.set()
        raise
    return {"count": payload["n"]}
