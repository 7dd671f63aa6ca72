"""Test-only handlers, registered in REGISTRY on import (Ray workers import this module too).

Handlers that block take their cue from threading.Events the test controls, never from a timer the
test must outguess.
"""

from __future__ import annotations

import os
import threading
import time
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
