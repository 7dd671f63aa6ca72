"""Strict, total reading of what the store gets back from Redis.

Anything in Redis may have been overwritten by hand or by another program, so a value read back is
input like any other. The readers here accept exactly what the store's scripts write and raise
`CorruptRecord` (a ValueError) with a reason naming the field for everything else: whatever the
JSON parser, the UTF-8 decoder or the number conversions would raise becomes that one error, so a
caller that catches it dead-letters the job and never meets an exception it did not expect.
"""

from __future__ import annotations

import functools
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from scheduler.models import (
    MAX_JOB_TYPE_LEN,
    MAX_PRIORITY,
    MAX_TAGS,
    MAX_TENANT_LEN,
    JobSpec,
    check_job_type,
    check_tags,
    parse_spec,
)

# Longer than any routing view the store writes (a type, a tenant and 32 tags of 64 characters,
# 4 bytes each at most): anything longer is refused before it is parsed at all.
MAX_ROUTE_VIEW_BYTES = 16384
# Values quoted in reasons are cut to this many characters.
_QUOTE_CHARS = 60

# Every exception a parse of stored text can raise (json's RecursionError among them); pydantic's
# ValidationError and UnicodeDecodeError are ValueErrors.
PARSE_ERRORS = (ValueError, TypeError, KeyError, RecursionError, OverflowError)


class CorruptRecord(ValueError):
    """A stored value that is not what the store writes; the message says which and why."""


class RouteView(BaseModel):
    """A pending job's routing view as stored (`rt`, short keys): only values the routing policies
    can take. Strict: a priority of 2.0 or true, a tag that is a list, a deadline of 1e400 or NaN
    are refused, not coerced. Keys it does not know are ignored, so a newer writer's view still
    routes."""

    model_config = ConfigDict(strict=True, frozen=True, extra="ignore", populate_by_name=True)

    job_type: str = Field(alias="t", min_length=1, max_length=MAX_JOB_TYPE_LEN)
    priority: int = Field(default=0, alias="p", ge=0, le=MAX_PRIORITY)
    tags: tuple[str, ...] = Field(default=(), alias="g", max_length=MAX_TAGS)
    tenant: str | None = Field(default=None, alias="n", min_length=1, max_length=MAX_TENANT_LEN)
    # Seconds after submission; finite, so the absolute deadline a router sees is too.
    deadline_s: float | None = Field(default=None, alias="d", gt=0, allow_inf_nan=False)

    @field_validator("job_type")
    @classmethod
    def _printable_job_type(cls, job_type: str) -> str:
        return check_job_type(job_type)

    @field_validator("tags")
    @classmethod
    def _plain_tags(cls, tags: tuple[str, ...]) -> tuple[str, ...]:
        return check_tags(tags)


_ROUTE_FIELDS = {"t": "job type", "p": "priority", "g": "tags", "n": "tenant", "d": "deadline"}


def quote(value: Any) -> str:
    """A short repr of a value for a reason."""
    text = repr(value)
    return text if len(text) <= _QUOTE_CHARS else f"{text[: _QUOTE_CHARS - 3]}..."


def _reason(what: str, exc: ValidationError, names: dict[str, str]) -> str:
    first = exc.errors(include_url=False)[0]
    loc = [str(p) for p in first["loc"]]
    message = str(first["msg"])
    if not loc:
        if first["type"] == "json_invalid":
            return f"{what} is not valid JSON ({message.removeprefix('Invalid JSON: ')})"
        return f"{what} is unreadable: {message} (got {quote(first.get('input'))})"
    field = names.get(loc[0], loc[0]) + "".join(f"[{p}]" for p in loc[1:])
    return f"{what}'s {field} is {quote(first.get('input'))}: {message}"


def parse_route_view(text: str | bytes) -> RouteView:
    """The routing view stored as `text`; CorruptRecord naming the field when it is not one."""
    if len(text) <= _CACHED_VIEW_BYTES:
        return _parse_short_view(text)
    return _parse_view(text)


# Jobs of one type mostly share options, so their routing views are the same few short texts:
# those are parsed once. (A failed parse raises, and is never cached.)
_CACHED_VIEW_BYTES = 512


@functools.lru_cache(maxsize=4096)
def _parse_short_view(text: str | bytes) -> RouteView:
    return _parse_view(text)


def _parse_view(text: str | bytes) -> RouteView:
    if len(text) > MAX_ROUTE_VIEW_BYTES:
        raise CorruptRecord(
            f"routing view is {len(text)} bytes long, more than any routing view "
            f"({MAX_ROUTE_VIEW_BYTES})"
        )
    try:
        return RouteView.model_validate_json(text)
    except ValidationError as exc:
        raise CorruptRecord(_reason("routing view", exc, _ROUTE_FIELDS)) from None
    except PARSE_ERRORS as exc:
        raise CorruptRecord(f"routing view is unreadable: {exc}") from None


def route_view_of(spec: JobSpec) -> RouteView:
    """The routing view of a sound spec (for a record that lost its own)."""
    o = spec.options
    return RouteView(
        job_type=spec.job_type,
        priority=o.priority,
        tags=o.tags,
        tenant=o.tenant,
        deadline_s=o.deadline_s,
    )


_SPEC_FIELDS = {"t": "job type", "p": "payload", "o": "options"}


def parse_stored_spec(text: str | bytes) -> JobSpec:
    """The spec stored as `text`; CorruptRecord with the parser's first complaint otherwise."""
    try:
        return parse_spec(text)
    except ValidationError as exc:
        raise CorruptRecord(_reason("stored spec", exc, _SPEC_FIELDS)) from None
    except PARSE_ERRORS as exc:
        raise CorruptRecord(f"stored spec is unreadable: {exc}") from None


def parse_ms(text: str | bytes, field: str) -> int:
    """A whole number of ms as the scripts write it."""
    try:
        value = int(text)
    except PARSE_ERRORS:
        raise CorruptRecord(f"job record's {field} {quote(text)} is not a whole number") from None
    if value < 0:
        raise CorruptRecord(f"job record's {field} {value} is negative")
    return value


def decode_text(raw: bytes, field: str) -> str:
    """Stored bytes as text; CorruptRecord naming the field when they are not UTF-8."""
    try:
        return raw.decode()
    except UnicodeDecodeError as exc:
        raise CorruptRecord(f"job record's {field} is not UTF-8 text ({exc.reason})") from None


__all__ = [
    "MAX_ROUTE_VIEW_BYTES",
    "PARSE_ERRORS",
    "CorruptRecord",
    "RouteView",
    "decode_text",
    "parse_ms",
    "parse_route_view",
    "parse_stored_spec",
    "quote",
    "route_view_of",
]
