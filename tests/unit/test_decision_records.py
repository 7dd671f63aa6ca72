"""Guardrails say which of them changed a proposal, and a decision record carries it."""

from __future__ import annotations

import dataclasses
import json

from policies.allocation import StaticAllocator
from policies.guardrails import Guardrails
from policies.views import Allocation, AllocationBounds, ClusterView, QueueView
from scheduler.service.decisions import DecisionRecord, decision_record, totals_of


def _view(allocated: dict[str, int], budget: int = 4) -> ClusterView:
    queues = tuple(
        QueueView(name=n, job_types=frozenset({n}), depth=3, workers_ready=w)
        for n, w in allocated.items()
    )
    return ClusterView(now_s=100.0, tick_s=1.0, budget=budget, queues=queues)


class Fixed:
    name = "fixed"

    def __init__(self, target: Allocation) -> None:
        self.target = target

    def allocate(self, view: ClusterView) -> Allocation:
        return dict(self.target)


class TestInterventions:
    def test_each_guardrail_that_changed_the_proposal_is_named_in_order(self) -> None:
        """Hysteresis holds b, the bounds clip a and raise c to its minimum, the budget cuts a,
        and the move cap keeps only the mandatory move; each with the counts it changed."""
        guard = Guardrails(
            Fixed({"a": 4, "b": 1, "c": 0}),
            AllocationBounds(max_workers={"a": 3}, min_workers={"c": 3}, max_moves_per_tick=1),
            hysteresis_workers=2,
        )
        target = guard.allocate(_view({"a": 0, "b": 0, "c": 0}, budget=5))
        assert guard.last_proposal == {"a": 4, "b": 1, "c": 0}
        assert [(i.guardrail, i.changes) for i in guard.last_interventions] == [
            ("hysteresis", {"b": (1, 0)}),
            ("bounds", {"a": (4, 3), "c": (0, 3)}),
            ("budget", {"a": (3, 2)}),
            ("move_cap", {"a": (2, 0)}),
        ]
        assert target == {"a": 0, "b": 0, "c": 3}

    def test_an_untouched_proposal_names_none(self) -> None:
        """A proposal within every limit passes with no intervention."""
        guard = Guardrails(Fixed({"a": 1, "b": 1}), AllocationBounds())
        assert guard.allocate(_view({"a": 1, "b": 1})) == {"a": 1, "b": 1}
        assert guard.last_interventions == ()


def _bounded_tick(fallback: str | None) -> DecisionRecord:
    """The record of a tick whose bounds and budget both changed a static proposal."""
    guard = Guardrails(StaticAllocator(), AllocationBounds(min_workers={"a": 3}))
    view = _view({"a": 0, "b": 1})
    target = guard.allocate(view)
    return decision_record(
        view,
        policy=guard.name,
        before=view.allocation(),
        proposal=guard.last_proposal,
        target=target,
        fallback=fallback,
        interventions=guard.last_interventions,
    )


class TestDecisionRecord:
    def test_a_record_round_trips_and_explains_itself(self) -> None:
        """JSON out and back is the same record; its reasons and moves read as sentences."""
        record = _bounded_tick(fallback=None)
        back = DecisionRecord.from_json(record.to_json())
        assert back == record
        assert record.worth_keeping
        assert record.moves() == "a 0->3"
        assert record.reasons() == ["bounds: a 2->3", "budget: b 2->1"]
        assert totals_of(record) == {
            "ticks": 1,
            "changes": 1,
            "guardrail:bounds": 1,
            "guardrail:budget": 1,
        }

    def test_a_quiet_tick_is_not_worth_keeping(self) -> None:
        """No change, no guardrail, no fallback: only the totals count it."""
        view = _view({"a": 1})
        record = decision_record(
            view, policy="p", before={"a": 1}, proposal={"a": 1}, target={"a": 1},
            fallback=None, interventions=(),
        )  # fmt: skip
        assert not record.worth_keeping
        assert record.reasons() == ["p's proposal, unchanged by the guardrails"]
        assert totals_of(record) == {"ticks": 1}

    def test_the_json_keeps_asdicts_shape(self) -> None:
        """Every field as dataclasses.asdict names it (interventions as lists), then the reasons
        and the moves."""
        record = _bounded_tick(fallback="why")
        expected = json.loads(json.dumps(dataclasses.asdict(record)))
        expected["interventions"] = [
            {"guardrail": i.guardrail, "changes": {q: list(c) for q, c in i.changes.items()}}
            for i in record.interventions
        ]
        expected["reasons"] = record.reasons()
        expected["moves"] = record.moves()
        assert json.loads(record.to_json()) == expected
        assert list(json.loads(record.to_json())) == list(expected)
