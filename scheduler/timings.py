"""What finished jobs took, per queue, as Redis keeps it (Keys.timing): histograms any process reads.

complete.lua counts each succeeded job's completion time (submit to success) and queue wait
(submit to first lease) into per-queue bucket counts, and its SLO outcome (its own deadline, else
the queue's SLO, which the controller writes here with `write_slos`); a worker that loads a model
for a queue counts the load's seconds with `record_model_load`. Bucket counts are stored per
bucket (not cumulative) so one observation is one HINCRBY; `Histogram` accumulates them the way
Prometheus wants them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import redis.asyncio as aioredis

from scheduler.keys import TIMING_BUCKETS_MS, Keys

# The bucket upper bounds in seconds, +Inf last, as exported.
BUCKET_BOUNDS_S: tuple[float, ...] = (*(ms / 1000 for ms in TIMING_BUCKETS_MS), math.inf)


def bucket_of(ms: float) -> int:
    """The 1-based bucket of a duration in ms (len(TIMING_BUCKETS_MS) + 1 is +Inf), as
    _common.lua's bucket_of picks it."""
    for i, bound in enumerate(TIMING_BUCKETS_MS, start=1):
        if ms <= bound:
            return i
    return len(TIMING_BUCKETS_MS) + 1


@dataclass(frozen=True, slots=True)
class Histogram:
    """Counts per bucket of BUCKET_BOUNDS_S (not cumulative) and the sum of what was observed."""

    counts: tuple[int, ...] = (0,) * len(BUCKET_BOUNDS_S)
    sum_s: float = 0.0

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound in s, observations at or under it) per bucket, +Inf last: Prometheus'
        `_bucket{le=...}` series."""
        out, running = [], 0
        for bound, n in zip(BUCKET_BOUNDS_S, self.counts, strict=True):
            running += n
            out.append((bound, running))
        return out

    def quantile(self, q: float) -> float | None:
        """The q-quantile estimated as Prometheus' histogram_quantile does (linear within the
        bucket it falls in; the last finite bound when it falls in +Inf); None when empty."""
        total = self.count
        if total == 0:
            return None
        rank = q * total
        lower, below = 0.0, 0
        for bound, n in zip(BUCKET_BOUNDS_S, self.counts, strict=True):
            if below + n >= rank and n > 0:
                if math.isinf(bound):
                    return lower
                return lower + (bound - lower) * (rank - below) / n
            below += n
            lower = bound if not math.isinf(bound) else lower
        return lower

    @property
    def mean_s(self) -> float | None:
        return self.sum_s / self.count if self.count else None


def _histogram(raw: Mapping[str, str], prefix: str) -> Histogram:
    counts = tuple(_count(raw.get(f"{prefix}{i}")) for i in range(1, len(BUCKET_BOUNDS_S) + 1))
    return Histogram(counts, _count(raw.get(f"{prefix}s")) / 1000)


def _count(value: str | None) -> int:
    """A counter as the scripts write it; anything else reads as 0 (counters are never trusted)."""
    if value is None or not value.isdigit() or len(value) > 15:
        return 0
    return int(value)


@dataclass(frozen=True, slots=True)
class QueueTimings:
    """One queue's histograms and SLO outcomes since the namespace was created."""

    jct: Histogram = field(default_factory=Histogram)
    wait: Histogram = field(default_factory=Histogram)
    model_load: Histogram = field(default_factory=Histogram)
    slo_judged: int = 0
    slo_met: int = 0
    slo_s: float | None = None

    @property
    def slo_attainment(self) -> float | None:
        """Share of the judged jobs that met their deadline or SLO; None when none was judged."""
        return self.slo_met / self.slo_judged if self.slo_judged else None

    @classmethod
    def parse(cls, raw: Mapping[str, str]) -> QueueTimings:
        slo_ms = raw.get("slo_ms")
        return cls(
            jct=_histogram(raw, "j"),
            wait=_histogram(raw, "w"),
            model_load=_histogram(raw, "l"),
            slo_judged=_count(raw.get("sn")),
            slo_met=_count(raw.get("sm")),
            slo_s=_count(slo_ms) / 1000 if slo_ms is not None and slo_ms.isdigit() else None,
        )


@dataclass(frozen=True, slots=True)
class TenantUsage:
    """What one tenant's jobs used: jobs succeeded, and seconds from first lease to success."""

    completed: int = 0
    leased_s: float = 0.0


def parse_tenants(raw: Mapping[str, str]) -> dict[str, TenantUsage]:
    """Keys.tenant_usage's fields ('c:<tenant>', 's:<tenant>') as usage per tenant, sorted by name."""
    completed: dict[str, int] = {}
    leased_ms: dict[str, int] = {}
    for name, value in raw.items():
        kind, _, tenant = name.partition(":")
        if kind == "c":
            completed[tenant] = _count(value)
        elif kind == "s":
            leased_ms[tenant] = _count(value)
    return {
        t: TenantUsage(completed.get(t, 0), leased_ms.get(t, 0) / 1000)
        for t in sorted(set(completed) | set(leased_ms))
    }


async def read_timings(
    redis: aioredis.Redis, keys: Keys, queues: Iterable[str]
) -> dict[str, QueueTimings]:
    """Every named queue's timings, in one round trip (a key of the wrong type reads as empty)."""
    names = list(queues)
    pipe = redis.pipeline(transaction=False)
    for name in names:
        pipe.hgetall(keys.timing(name))
    raw = await pipe.execute(raise_on_error=False)
    return {
        name: QueueTimings.parse(_texts(r) if isinstance(r, dict) else {})
        for name, r in zip(names, raw, strict=True)
    }


def _texts(raw: Mapping[bytes | str, bytes | str]) -> dict[str, str]:
    out = {}
    for k, v in raw.items():
        try:
            out[k.decode() if isinstance(k, bytes) else k] = (
                v.decode() if isinstance(v, bytes) else v
            )
        except UnicodeDecodeError:
            continue
    return out


async def record_model_load(redis: aioredis.Redis, keys: Keys, queue: str, load_s: float) -> None:
    """Count one model load of `load_s` seconds for `queue` (a worker moved to it)."""
    ms = max(0, round(load_s * 1000))
    pipe = redis.pipeline(transaction=False)
    pipe.hincrby(keys.timing(queue), f"l{bucket_of(ms)}", 1)
    pipe.hincrby(keys.timing(queue), "ls", ms)
    await pipe.execute()


async def write_slos(redis: aioredis.Redis, keys: Keys, slos_s: Mapping[str, float | None]) -> None:
    """Give complete.lua each queue's SLO (None: the queue has none, its jobs without a deadline
    are not judged)."""
    pipe = redis.pipeline(transaction=False)
    for name, slo_s in slos_s.items():
        if slo_s is None:
            pipe.hdel(keys.timing(name), "slo_ms")
        else:
            pipe.hset(keys.timing(name), "slo_ms", str(round(slo_s * 1000)))
    # A timing key of the wrong type is left to the next completion, which moves it aside.
    await pipe.execute(raise_on_error=False)


__all__ = [
    "BUCKET_BOUNDS_S",
    "Histogram",
    "QueueTimings",
    "TenantUsage",
    "bucket_of",
    "parse_tenants",
    "read_timings",
    "record_model_load",
    "write_slos",
]
