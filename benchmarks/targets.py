"""What the benchmarks share to report issue 19's targets: Redis CPU readings and target rows.

Each benchmark prints a `targets` block, one row per target: {"target": X, "measured": Y,
"met": bool}. A target that a run could not measure (a peer that did not run, say) has measured
None and met False, with a note saying why, so a reader never takes an absent figure for a met one.
"""

from __future__ import annotations

from typing import Any


async def redis_cpu_s(redis: Any) -> float:
    """CPU seconds the Redis server has used (user + system, INFO cpu): read before and after a
    phase, the difference over the phase's jobs is its Redis CPU per job. The server's own clock,
    so other load on the machine hardly moves it, unlike wall-clock throughput."""
    cpu = await redis.info("cpu")
    return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])


def target(
    limit: float | None,
    measured: float | None,
    *,
    at_most: bool = True,
    note: str | None = None,
) -> dict[str, Any]:
    """One row: `measured` against `limit` (an upper bound when at_most, else a lower one). A
    missing limit or measurement is not met."""
    met = (
        limit is not None
        and measured is not None
        and (measured <= limit if at_most else measured >= limit)
    )
    row: dict[str, Any] = {
        "target": limit,
        "measured": measured,
        "met": met,
        "bound": "at_most" if at_most else "at_least",
    }
    if note is not None:
        row["note"] = note
    return row


__all__ = ["redis_cpu_s", "target"]
