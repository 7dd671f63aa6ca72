"""Level-2 decisions explained: what the policy saw, what it proposed, and what shaped the result.

Each full controller tick builds a `DecisionRecord`: per queue the inputs the allocator saw (depth,
oldest wait, arrival rate, service time, workers ready and loading, SLO), the workers before, the
proposal and the target; which guardrails changed the proposal (hysteresis, bounds, budget, move
cap, in that order) and how; and why the fallback decided instead, when it did. A record that
changed the allocation, or that a guardrail or the fallback shaped, is kept in a capped Redis list
(Keys.decisions, the newest DECISIONS_LEN), where `bilevel status --decisions N`, the dashboard and
`/api/state` read it; counts of every kind since the namespace began go to Keys.decision_totals
for the metrics.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis

from policies.guardrails import Intervention
from policies.views import ClusterView
from scheduler.keys import DECISIONS_LEN, Keys
from scheduler.service.views import field_values


@dataclass(frozen=True, slots=True)
class QueueDecision:
    """One queue in a decision: what the policy saw of it, and what became of its workers."""

    queue: str
    depth: int
    oldest_wait_s: float
    arrival_rate_per_s: float
    service_time_s: float
    ready: int
    loading: int
    slo_s: float | None
    before: int
    proposed: int
    target: int


@dataclass(frozen=True, slots=True)
class DecisionRecord:
    """One full tick's decision (JSON in Keys.decisions)."""

    t_s: float
    # The allocator that proposed ("initial" for a first decision from allocation.initial).
    policy: str
    budget: int
    changed: bool
    # Why the fallback allocator proposed instead of the policy; None when the policy did.
    fallback: str | None = None
    # Each guardrail that changed the proposal, in the order they apply.
    interventions: tuple[Intervention, ...] = ()
    queues: tuple[QueueDecision, ...] = ()

    @property
    def worth_keeping(self) -> bool:
        """Changed the allocation, or a guardrail or the fallback shaped it."""
        return self.changed or self.fallback is not None or bool(self.interventions)

    def reasons(self) -> list[str]:
        """Why the target is what it is, one line per cause, the fallback first."""
        out = []
        if self.fallback is not None:
            out.append(f"fallback: {self.fallback}")
        out += [i.describe() for i in self.interventions]
        if not out:
            out.append(f"{self.policy}'s proposal, unchanged by the guardrails")
        return out

    def moves(self) -> str:
        """The queues whose workers change: 'a 1->2, b 2->1' (or 'no change')."""
        cells = [f"{q.queue} {q.before}->{q.target}" for q in self.queues if q.before != q.target]
        return ", ".join(cells) or "no change"

    def to_dict(self) -> dict[str, Any]:
        # dataclasses.asdict's shape, built shallowly: its deep copy of one QueueDecision per
        # queue took a controller tick at 256 queues about 15 ms.
        raw = field_values(self)
        raw["interventions"] = [
            {"guardrail": i.guardrail, "changes": {q: list(c) for q, c in i.changes.items()}}
            for i in self.interventions
        ]
        raw["queues"] = [field_values(q) for q in self.queues]
        raw["reasons"] = self.reasons()
        raw["moves"] = self.moves()
        return raw

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> DecisionRecord:
        """Parse what `to_json` wrote; ValueError for anything else."""
        try:
            raw = json.loads(text)
            interventions = tuple(
                Intervention(
                    str(i["guardrail"]),
                    {str(q): (int(c[0]), int(c[1])) for q, c in dict(i["changes"]).items()},
                )
                for i in raw.get("interventions", ())
            )
            queues = tuple(QueueDecision(**q) for q in raw.get("queues", ()))
            return cls(
                t_s=float(raw["t_s"]),
                policy=str(raw["policy"]),
                budget=int(raw["budget"]),
                changed=bool(raw["changed"]),
                fallback=None if raw.get("fallback") is None else str(raw["fallback"]),
                interventions=interventions,
                queues=queues,
            )
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
            raise ValueError(f"not a decision record: {exc}") from None


def decision_record(
    view: ClusterView,
    *,
    policy: str,
    before: Mapping[str, int],
    proposal: Mapping[str, int],
    target: Mapping[str, int],
    fallback: str | None,
    interventions: Sequence[Intervention],
) -> DecisionRecord:
    """The record of one tick from what the controller had in hand."""
    queues = tuple(
        QueueDecision(
            queue=q.name,
            depth=q.depth,
            oldest_wait_s=round(q.oldest_wait_s, 3),
            arrival_rate_per_s=round(q.arrival_rate_per_s, 3),
            service_time_s=round(q.service_time_s, 4),
            ready=q.workers_ready,
            loading=q.workers_loading,
            slo_s=q.slo_s,
            before=int(before.get(q.name, 0)),
            proposed=int(proposal.get(q.name, before.get(q.name, 0))),
            target=int(target[q.name]),
        )
        for q in view.queues
    )
    return DecisionRecord(
        t_s=view.now_s,
        policy=policy,
        budget=view.budget,
        changed=dict(target) != dict(before),
        fallback=fallback,
        interventions=tuple(interventions),
        queues=queues,
    )


def totals_of(record: DecisionRecord) -> dict[str, int]:
    """The increments of Keys.decision_totals one tick makes."""
    out = {"ticks": 1}
    if record.changed:
        out["changes"] = 1
    if record.fallback is not None:
        out["fallbacks"] = 1
    for i in record.interventions:
        out[f"guardrail:{i.guardrail}"] = out.get(f"guardrail:{i.guardrail}", 0) + 1
    return out


@dataclass(frozen=True, slots=True)
class DecisionTotals:
    """Counts since the namespace began: full ticks, ticks that changed the allocation, ticks the
    fallback decided, and per guardrail the ticks it changed a proposal in."""

    ticks: int = 0
    changes: int = 0
    fallbacks: int = 0
    guardrails: dict[str, int] = field(default_factory=dict)

    @classmethod
    def parse(cls, raw: Mapping[str, str]) -> DecisionTotals:
        def count(v: str | None) -> int:
            return int(v) if v is not None and v.isdigit() and len(v) <= 15 else 0

        guardrails = {
            k.removeprefix("guardrail:"): count(v)
            for k, v in sorted(raw.items())
            if k.startswith("guardrail:")
        }
        return cls(
            count(raw.get("ticks")),
            count(raw.get("changes")),
            count(raw.get("fallbacks")),
            guardrails,
        )


def queue_decisions(redis_pipe: Any, keys: Keys, record: DecisionRecord) -> None:
    """Add the writes of one tick's record to a pipeline: its totals, and the record itself when
    it is worth keeping (the list trimmed to DECISIONS_LEN)."""
    for name, by in totals_of(record).items():
        redis_pipe.hincrby(keys.decision_totals, name, by)
    if record.worth_keeping:
        redis_pipe.lpush(keys.decisions, record.to_json())
        redis_pipe.ltrim(keys.decisions, 0, DECISIONS_LEN - 1)


async def read_decisions(
    redis: aioredis.Redis, keys: Keys, n: int = DECISIONS_LEN
) -> list[DecisionRecord]:
    """The newest `n` kept decisions, newest first (entries that do not parse are skipped)."""
    if n <= 0:
        return []
    raw = await redis.lrange(keys.decisions, 0, n - 1)
    out = []
    for text in raw:
        try:
            out.append(DecisionRecord.from_json(str(text)))
        except ValueError:
            continue
    return out


__all__ = [
    "DecisionRecord",
    "DecisionTotals",
    "QueueDecision",
    "decision_record",
    "queue_decisions",
    "read_decisions",
    "totals_of",
]
