"""Strict JSON encoding of user values (payloads and results).

`json.dumps` quietly turns tuples into lists, int dict keys into strings and NaN into a token other
parsers reject, and falls over with an unhelpful message on bytes or sets. Payloads cross process and
language boundaries, so a value must be JSON exactly as given; this module says where it is not.
"""

from __future__ import annotations

import json
import math
from typing import Any

from scheduler.errors import InvalidJob

JsonValue = None | bool | int | float | str | list["JsonValue"] | dict[str, "JsonValue"]

# Deeper nesting than this is refused rather than risking the recursion limit of a reader.
MAX_DEPTH = 64


def check_json(value: Any, field: str) -> None:
    """Raise InvalidJob naming the path of the first part of `value` that is not plain JSON."""
    stack: list[tuple[Any, str, int]] = [(value, field, 0)]
    while stack:
        item, path, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise InvalidJob(path, f"nested deeper than {MAX_DEPTH} levels")
        if item is None or isinstance(item, (bool, str)):
            continue
        if isinstance(item, int):
            continue
        if isinstance(item, float):
            if not math.isfinite(item):
                raise InvalidJob(path, f"{item!r} is not a JSON number (NaN and infinity are not)")
            continue
        if isinstance(item, list):
            stack.extend((v, f"{path}[{i}]", depth + 1) for i, v in enumerate(item))
            continue
        if isinstance(item, dict):
            for k, v in item.items():
                if not isinstance(k, str):
                    raise InvalidJob(path, f"object key {k!r} is a {type(k).__name__}, not a str")
                stack.append((v, f"{path}.{k}", depth + 1))
            continue
        raise InvalidJob(
            path,
            f"a {type(item).__name__} is not JSON (use str, int, float, bool, None, list, dict)",
        )


# One encoder for the process: json.dumps builds a new one on every call made with options.
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def dumps(value: Any) -> str:
    """Compact JSON text of a value already accepted by `check_json`."""
    return _ENCODER.encode(value)


def encode(value: Any, field: str) -> str:
    """Check and encode in one step."""
    check_json(value, field)
    return dumps(value)
