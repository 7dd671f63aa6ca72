"""The arrival record every workload generator and trace adapter produces."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Arrival:
    """One job arriving at the system, before level 1 routes it."""

    arrival_s: float
    job_type: str
    # Service seconds on one worker when the source knows it (a trace's duration); None = draw it
    # from the job type's service-time model.
    service_s: float | None = None
    tokens_in: int | None = None
    tokens_out: int | None = None
    tenant: str | None = None
    priority: int = 0
    # Relative deadline (seconds after arrival); None means none.
    deadline_s: float | None = None
