"""Synthetic arrival generators, and the columnar arrival table the simulator runs on.

Generators draw whole arrays at once (inter-arrival gaps, job types, token counts), so building a
million arrivals costs milliseconds. `Arrival` records (the contract shared with trace adapters)
convert to and from the columnar `ArrivalTable`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Literal

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field, field_validator

from policies.sim.arrivals import Arrival

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]


@dataclass(frozen=True, eq=False)
class ArrivalTable:
    """Arrivals sorted by time, one array per field; NaN marks an unknown float field."""

    arrival_s: FloatArray
    # Index into `job_types` per job.
    type_idx: IntArray
    job_types: tuple[str, ...]
    service_s: FloatArray
    tokens_in: FloatArray
    tokens_out: FloatArray
    priority: IntArray
    # Relative deadline (seconds after arrival).
    deadline_s: FloatArray
    # Per-job tenant, or None when no job has one (the common case, kept cheap).
    tenants: tuple[str | None, ...] | None = None

    def __len__(self) -> int:
        return len(self.arrival_s)

    @classmethod
    def empty(cls, job_types: Sequence[str] = ()) -> ArrivalTable:
        """A table with no arrivals."""
        return cls._of(np.empty(0), np.empty(0, dtype=np.int64), tuple(job_types))

    @classmethod
    def _of(
        cls,
        arrival_s: FloatArray,
        type_idx: IntArray,
        job_types: tuple[str, ...],
        tokens_in: FloatArray | None = None,
        tokens_out: FloatArray | None = None,
    ) -> ArrivalTable:
        n = len(arrival_s)
        nan = np.full(n, np.nan)
        return cls(
            arrival_s=arrival_s,
            type_idx=type_idx,
            job_types=job_types,
            service_s=nan,
            tokens_in=nan.copy() if tokens_in is None else tokens_in,
            tokens_out=nan.copy() if tokens_out is None else tokens_out,
            priority=np.zeros(n, dtype=np.int64),
            deadline_s=nan.copy(),
        )

    @classmethod
    def from_arrivals(cls, arrivals: Sequence[Arrival]) -> ArrivalTable:
        """Columns of `arrivals`, stably sorted by arrival time."""
        job_types = tuple(sorted({a.job_type for a in arrivals}))
        index = {name: i for i, name in enumerate(job_types)}

        def floats(values: list[float | None]) -> FloatArray:
            return np.array([math.nan if v is None else float(v) for v in values], dtype=float)

        tenants = tuple(a.tenant for a in arrivals)
        table = cls(
            arrival_s=np.array([a.arrival_s for a in arrivals], dtype=float),
            type_idx=np.array([index[a.job_type] for a in arrivals], dtype=np.int64),
            job_types=job_types,
            service_s=floats([a.service_s for a in arrivals]),
            tokens_in=floats(
                [None if a.tokens_in is None else float(a.tokens_in) for a in arrivals]
            ),
            tokens_out=floats(
                [None if a.tokens_out is None else float(a.tokens_out) for a in arrivals]
            ),
            priority=np.array([a.priority for a in arrivals], dtype=np.int64),
            deadline_s=floats([a.deadline_s for a in arrivals]),
            tenants=tenants if any(t is not None for t in tenants) else None,
        )
        return table.take(np.argsort(table.arrival_s, kind="stable"))

    def to_arrivals(self) -> list[Arrival]:
        """The same arrivals as `Arrival` records."""

        def opt(x: float) -> float | None:
            return None if math.isnan(x) else x

        def opt_int(x: float) -> int | None:
            return None if math.isnan(x) else int(x)

        return [
            Arrival(
                arrival_s=float(self.arrival_s[i]),
                job_type=self.job_types[int(self.type_idx[i])],
                service_s=opt(float(self.service_s[i])),
                tokens_in=opt_int(float(self.tokens_in[i])),
                tokens_out=opt_int(float(self.tokens_out[i])),
                tenant=None if self.tenants is None else self.tenants[i],
                priority=int(self.priority[i]),
                deadline_s=opt(float(self.deadline_s[i])),
            )
            for i in range(len(self))
        ]

    def take(self, idx: IntArray) -> ArrivalTable:
        """The rows `idx`, in that order."""
        return ArrivalTable(
            arrival_s=self.arrival_s[idx],
            type_idx=self.type_idx[idx],
            job_types=self.job_types,
            service_s=self.service_s[idx],
            tokens_in=self.tokens_in[idx],
            tokens_out=self.tokens_out[idx],
            priority=self.priority[idx],
            deadline_s=self.deadline_s[idx],
            tenants=None if self.tenants is None else tuple(self.tenants[i] for i in idx.tolist()),
        )

    def with_job_types(self, job_types: tuple[str, ...]) -> ArrivalTable:
        """The same table with type indices into `job_types`, a superset of this table's types."""
        index = {name: i for i, name in enumerate(job_types)}
        missing = [t for t in self.job_types if t not in index]
        if missing:
            raise ValueError(f"job types {missing} are not in {list(job_types)}")
        remap = np.array([index[t] for t in self.job_types], dtype=np.int64)
        type_idx = remap[self.type_idx] if len(self) else self.type_idx
        return ArrivalTable(
            arrival_s=self.arrival_s,
            type_idx=type_idx,
            job_types=job_types,
            service_s=self.service_s,
            tokens_in=self.tokens_in,
            tokens_out=self.tokens_out,
            priority=self.priority,
            deadline_s=self.deadline_s,
            tenants=self.tenants,
        )

    @staticmethod
    def merge(tables: Sequence[ArrivalTable]) -> ArrivalTable:
        """All arrivals of `tables`, sorted by time; ties keep the order of `tables`."""
        job_types = tuple(sorted({t for table in tables for t in table.job_types}))
        parts = [table.with_job_types(job_types) for table in tables]
        if not parts:
            return ArrivalTable.empty(job_types)
        any_tenant = any(p.tenants is not None for p in parts)
        tenants: tuple[str | None, ...] | None = None
        if any_tenant:
            tenants = tuple(
                x for p in parts for x in (p.tenants if p.tenants is not None else (None,) * len(p))
            )
        merged = ArrivalTable(
            arrival_s=np.concatenate([p.arrival_s for p in parts]),
            type_idx=np.concatenate([p.type_idx for p in parts]),
            job_types=job_types,
            service_s=np.concatenate([p.service_s for p in parts]),
            tokens_in=np.concatenate([p.tokens_in for p in parts]),
            tokens_out=np.concatenate([p.tokens_out for p in parts]),
            priority=np.concatenate([p.priority for p in parts]),
            deadline_s=np.concatenate([p.deadline_s for p in parts]),
            tenants=tenants,
        )
        return merged.take(np.argsort(merged.arrival_s, kind="stable"))

    def head(self, n: int) -> ArrivalTable:
        """The first `n` arrivals."""
        return self.take(np.arange(min(n, len(self)), dtype=np.int64))

    def before(self, horizon_s: float) -> ArrivalTable:
        """The arrivals strictly before `horizon_s`."""
        return self.head(int(np.searchsorted(self.arrival_s, horizon_s, side="left")))


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TokenSpec(_Config):
    """Lognormal token counts of one job type (for token-based service models)."""

    in_mean: float = Field(gt=0)
    out_mean: float = Field(gt=0)
    cv: float = Field(default=1.0, gt=0)


class _Generator(_Config):
    # Relative weights of job types; every arrival of this generator gets one type drawn by weight.
    mix: dict[str, float]
    tokens: dict[str, TokenSpec] = Field(default_factory=dict)

    @field_validator("mix")
    @classmethod
    def _mix_ok(cls, mix: dict[str, float]) -> dict[str, float]:
        if not mix:
            raise ValueError("mix needs at least one job type")
        bad = [name for name, w in mix.items() if not (w > 0 and math.isfinite(w))]
        if bad:
            raise ValueError(f"weights must be positive and finite: {bad}")
        return mix

    @property
    def mean_rate_per_s(self) -> float:
        """Long-run arrivals per second."""
        raise NotImplementedError

    def times_s(self, rng: np.random.Generator, horizon_s: float) -> FloatArray:
        """Sorted arrival times in [0, horizon_s)."""
        raise NotImplementedError

    def generate(self, rng: np.random.Generator, horizon_s: float) -> ArrivalTable:
        """Arrivals in [0, horizon_s) with job types drawn from the mix and tokens where given."""
        times = self.times_s(rng, horizon_s)
        job_types = tuple(self.mix)
        weights = np.array([self.mix[t] for t in job_types], dtype=float)
        type_idx = rng.choice(len(job_types), size=len(times), p=weights / weights.sum())
        tokens_in = np.full(len(times), np.nan)
        tokens_out = np.full(len(times), np.nan)
        for i, name in enumerate(job_types):
            spec = self.tokens.get(name)
            if spec is None:
                continue
            rows = np.flatnonzero(type_idx == i)
            tokens_in[rows] = _lognormal_counts(rng, spec.in_mean, spec.cv, len(rows))
            tokens_out[rows] = _lognormal_counts(rng, spec.out_mean, spec.cv, len(rows))
        return ArrivalTable._of(times, type_idx.astype(np.int64), job_types, tokens_in, tokens_out)


def _lognormal_counts(rng: np.random.Generator, mean: float, cv: float, n: int) -> FloatArray:
    sigma = math.sqrt(math.log1p(cv * cv))
    draws: FloatArray = rng.lognormal(math.log(mean) - sigma * sigma / 2, sigma, size=n)
    # Token counts are whole and at least one.
    return np.maximum(np.rint(draws), 1.0)


def _poisson_times(
    rng: np.random.Generator, rate_per_s: float, start_s: float, end_s: float
) -> FloatArray:
    """Sorted Poisson arrival times in [start_s, end_s): a Poisson count, then uniform order stats."""
    if rate_per_s <= 0 or end_s <= start_s:
        return np.empty(0)
    n = int(rng.poisson(rate_per_s * (end_s - start_s)))
    return np.sort(rng.uniform(start_s, end_s, size=n))


class PoissonWorkload(_Generator):
    """Poisson arrivals at a constant rate."""

    kind: Literal["poisson"] = "poisson"
    rate_per_s: float = Field(gt=0)

    @property
    def mean_rate_per_s(self) -> float:
        return self.rate_per_s

    def times_s(self, rng: np.random.Generator, horizon_s: float) -> FloatArray:
        # Cumulated exponential gaps, drawn in chunks sized by the expected count.
        chunks: list[FloatArray] = []
        t_s = 0.0
        while t_s < horizon_s:
            n = max(1024, int((horizon_s - t_s) * self.rate_per_s * 1.05) + 64)
            times = t_s + np.cumsum(rng.exponential(1.0 / self.rate_per_s, size=n))
            chunks.append(times)
            t_s = float(times[-1])
        out = np.concatenate(chunks) if chunks else np.empty(0)
        return out[: int(np.searchsorted(out, horizon_s, side="left"))]


class MmppState(_Config):
    """One state of a Markov-modulated Poisson process."""

    rate_per_s: float = Field(ge=0)
    mean_sojourn_s: float = Field(gt=0)


class MmppWorkload(_Generator):
    """Bursty arrivals: a Poisson rate that switches between states after exponential sojourns.

    From a state the process moves to one of the other states uniformly at random (with two states
    it alternates). It starts in the first state.
    """

    kind: Literal["mmpp"] = "mmpp"
    states: list[MmppState] = Field(min_length=2)

    @property
    def mean_rate_per_s(self) -> float:
        # The embedded chain is uniform over states, so time shares are proportional to sojourns.
        total_s = sum(s.mean_sojourn_s for s in self.states)
        return sum(s.rate_per_s * s.mean_sojourn_s for s in self.states) / total_s

    def times_s(self, rng: np.random.Generator, horizon_s: float) -> FloatArray:
        parts: list[FloatArray] = []
        state = 0
        t_s = 0.0
        k = len(self.states)
        while t_s < horizon_s:
            spec = self.states[state]
            end_s = min(horizon_s, t_s + float(rng.exponential(spec.mean_sojourn_s)))
            parts.append(_poisson_times(rng, spec.rate_per_s, t_s, end_s))
            t_s = end_s
            step = int(rng.integers(1, k)) if k > 2 else 1
            state = (state + step) % k
        return np.concatenate(parts) if parts else np.empty(0)


class DiurnalWorkload(_Generator):
    """Rate base * (1 + amplitude * sin(2 pi (t - phase) / period)), drawn by thinning."""

    kind: Literal["diurnal"] = "diurnal"
    base_rate_per_s: float = Field(gt=0)
    amplitude: float = Field(ge=0, lt=1)
    period_s: float = Field(gt=0)
    phase_s: float = 0.0

    @property
    def mean_rate_per_s(self) -> float:
        return self.base_rate_per_s

    def times_s(self, rng: np.random.Generator, horizon_s: float) -> FloatArray:
        peak = self.base_rate_per_s * (1 + self.amplitude)
        candidates = _poisson_times(rng, peak, 0.0, horizon_s)
        rate = self.base_rate_per_s * (
            1 + self.amplitude * np.sin(2 * np.pi * (candidates - self.phase_s) / self.period_s)
        )
        keep = rng.uniform(0.0, peak, size=len(candidates)) < rate
        return candidates[keep]


Generator = Annotated[PoissonWorkload | MmppWorkload | DiurnalWorkload, Field(discriminator="kind")]


def generate(
    generators: Sequence[_Generator],
    rng: np.random.Generator,
    *,
    duration_s: float | None,
    max_jobs: int | None,
) -> ArrivalTable:
    """The superposition of `generators` up to `duration_s`, cut to the first `max_jobs` arrivals.

    With only `max_jobs`, the horizon grows until enough arrivals exist; each attempt draws afresh
    from `rng`, so the result is still a function of the seed.
    """
    if duration_s is None and max_jobs is None:
        raise ValueError("give duration_s or max_jobs")
    if duration_s is not None:
        table = ArrivalTable.merge([g.generate(rng, duration_s) for g in generators])
        return table if max_jobs is None else table.head(max_jobs)
    assert max_jobs is not None
    rate = sum(g.mean_rate_per_s for g in generators)
    horizon_s = 1.1 * max_jobs / rate + 10.0
    while True:
        table = ArrivalTable.merge([g.generate(rng, horizon_s) for g in generators])
        if len(table) >= max_jobs:
            return table.head(max_jobs)
        horizon_s *= 2


def mean_rates_by_type(generators: Sequence[_Generator]) -> Mapping[str, float]:
    """Long-run arrivals per second of each job type."""
    rates: dict[str, float] = {}
    for g in generators:
        total = sum(g.mix.values())
        for name, w in g.mix.items():
            rates[name] = rates.get(name, 0.0) + g.mean_rate_per_s * w / total
    return rates
