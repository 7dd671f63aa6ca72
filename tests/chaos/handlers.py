"""The chaos suite's handlers, registered in REGISTRY on import (Ray workers import this module).

Every execution is recorded, before the result is returned, as one line "<key> <pid>" appended to
the log file named in the payload: a line is shorter than PIPE_BUF, so appends from many worker
processes never interleave. Counting the lines per key tells how often each job actually ran,
which is what at-least-once delivery promises to keep small and what a chaos test reports.
"""

from __future__ import annotations

import os
import time
from typing import Any

from workers.registry import REGISTRY, PayloadError


def _no_model() -> None:
    return None


def record_execution(payload: Any) -> dict[str, Any]:
    if not isinstance(payload, dict) or not isinstance(payload.get("key"), str):
        raise PayloadError(
            f"expected {{'key': str, 'log': path, 'work_s': float}}, got {payload!r}"
        )
    seconds = float(payload.get("work_s", 0.0))
    if seconds > 0:
        time.sleep(seconds)
    line = f"{payload['key']} {os.getpid()}\n".encode()
    fd = os.open(str(payload["log"]), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)
    return {"key": payload["key"]}


@REGISTRY.handler("chaos.a", loader=_no_model)
def chaos_a(model: None, payload: Any) -> dict[str, Any]:
    return record_execution(payload)


@REGISTRY.handler("chaos.b", loader=_no_model)
def chaos_b(model: None, payload: Any) -> dict[str, Any]:
    return record_execution(payload)
