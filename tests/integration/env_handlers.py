"""A handler that reports its worker's environment, for the runtime_env tests."""

from __future__ import annotations

import os
from typing import Any

from workers.registry import REGISTRY, PayloadError


def _report(model: None, payload: Any) -> dict[str, Any]:
    if not isinstance(payload, dict) or not isinstance(payload.get("name"), str):
        raise PayloadError('payload must be {"name": "VARIABLE"}')
    return {"value": os.environ.get(payload["name"]), "cwd": os.getcwd()}


REGISTRY.register("worker_env", loader=lambda: None, run=_report)
