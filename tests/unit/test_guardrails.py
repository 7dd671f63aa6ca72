"""Guardrails: bounds, budget, move cap, hysteresis, fallback, and configuration errors."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.allocation import MaxWeightAllocator, StaticAllocator
from policies.guardrails import Guardrails, invalid_reason
from policies.registry import HEURISTIC_ALLOCATORS, make_allocator
from policies.views import Allocation, AllocationBounds, ClusterView, QueueView


def _queue(name: str, **kw: Any) -> QueueView:
    return QueueView(name=name, job_types=frozenset({"t"}), **kw)


def _view(current: dict[str, int], budget: int) -> ClusterView:
    queues = tuple(_queue(name, workers_ready=n) for name, n in current.items())
    return ClusterView(now_s=0.0, tick_s=1.0, budget=budget, queues=queues)


class _Fixed:
    """An allocator that proposes whatever it is told to, for driving the guardrails."""

    def __init__(self, proposal: object, name: str = "fixed") -> None:
        self.proposal = proposal
        self.name = name

    def allocate(self, view: ClusterView) -> Allocation:
        return self.proposal  # type: ignore[return-value]


class _Raising:
    name = "broken"

    def allocate(self, view: ClusterView) -> Allocation:
        raise RuntimeError("checkpoint missing")


class TestBounds:
    def test_min_and_max_clip(self) -> None:
        """Targets are raised to the minimum and cut to the maximum of each queue."""
        bounds = AllocationBounds(min_workers={"a": 2}, max_workers={"b": 3})
        guarded = Guardrails(_Fixed({"a": 0, "b": 8}), bounds)
        assert guarded.allocate(_view({"a": 1, "b": 1}, budget=10)) == {"a": 2, "b": 3}

    def test_defaults_apply_to_unnamed_queues(self) -> None:
        """default_min and default_max cover queues missing from the maps."""
        bounds = AllocationBounds(default_min=1, default_max=4)
        guarded = Guardrails(_Fixed({"a": 0, "b": 9}), bounds)
        assert guarded.allocate(_view({"a": 0, "b": 0}, budget=10)) == {"a": 1, "b": 4}

    def test_budget_cut_respects_minimums(self) -> None:
        """Over budget after raising minimums: the excess comes out of queues above their min."""
        bounds = AllocationBounds(min_workers={"a": 3})
        guarded = Guardrails(_Fixed({"a": 0, "b": 6, "c": 2}), bounds)
        allocation = guarded.allocate(_view({"a": 0, "b": 0, "c": 0}, budget=8))
        assert allocation["a"] == 3
        assert sum(allocation.values()) == 8
        assert allocation == {"a": 3, "b": 4, "c": 1}

    def test_hold_over_shrunken_budget_is_cut(self) -> None:
        """Even holding the current allocation respects a budget that shrank below it."""
        guarded = Guardrails(_Fixed({"a": 5, "b": 5}))
        allocation = guarded.allocate(_view({"a": 5, "b": 5}, budget=10))
        assert allocation == {"a": 5, "b": 5}
        shrunk = Guardrails(_Raising(), fallback=_Raising())
        assert sum(shrunk.allocate(_view({"a": 5, "b": 5}, budget=6)).values()) == 6


class TestContradictoryBounds:
    def test_min_above_max_at_construction(self) -> None:
        """min > max for a queue is refused when the guardrails are built, naming the queue."""
        bounds = AllocationBounds(min_workers={"gpu-q": 5}, max_workers={"gpu-q": 2})
        with pytest.raises(ValueError, match="'gpu-q'"):
            Guardrails(StaticAllocator(), bounds)

    def test_min_above_default_max(self) -> None:
        """A named minimum above the default maximum is contradictory too."""
        bounds = AllocationBounds(min_workers={"a": 5}, default_max=3)
        with pytest.raises(ValueError, match="'a'"):
            Guardrails(StaticAllocator(), bounds)

    def test_minimums_over_budget_at_first_tick(self) -> None:
        """Minimums summing past the budget fail at the first tick, naming the queues."""
        bounds = AllocationBounds(min_workers={"a": 4, "b": 3})
        guarded = Guardrails(StaticAllocator(), bounds)
        with pytest.raises(ValueError, match=r"sum to 7, over the budget of 5.*a=4, b=3"):
            guarded.allocate(_view({"a": 0, "b": 0}, budget=5))

    def test_negative_values(self) -> None:
        """Negative minimums, caps or hysteresis are refused."""
        with pytest.raises(ValueError, match="'a'"):
            Guardrails(StaticAllocator(), AllocationBounds(min_workers={"a": -1}))
        with pytest.raises(ValueError, match="max_moves_per_tick"):
            Guardrails(StaticAllocator(), AllocationBounds(max_moves_per_tick=-1))
        with pytest.raises(ValueError, match="hysteresis_workers"):
            Guardrails(StaticAllocator(), hysteresis_workers=0)


class TestMoveCap:
    def test_largest_moves_kept_first(self) -> None:
        """Over the cap, the largest increases are kept first and the last one partially."""
        bounds = AllocationBounds(max_moves_per_tick=4)
        guarded = Guardrails(_Fixed({"a": 0, "b": 4, "c": 3, "d": 1}), bounds)
        allocation = guarded.allocate(_view({"a": 8, "b": 0, "c": 0, "d": 0}, budget=8))
        increases = {k: v for k, v in allocation.items() if k != "a"}
        assert increases == {"b": 4, "c": 0, "d": 0}
        # The workers whose moves were cut stay where they are instead of idling.
        assert allocation["a"] == 4

    def test_ties_break_toward_earlier_queue(self) -> None:
        """Equal increases: the earlier queue keeps its move."""
        bounds = AllocationBounds(max_moves_per_tick=1)
        guarded = Guardrails(_Fixed({"a": 0, "b": 1, "c": 1}), bounds)
        assert guarded.allocate(_view({"a": 2, "b": 0, "c": 0}, budget=2)) == {
            "a": 1,
            "b": 1,
            "c": 0,
        }

    def test_pure_decrease_is_not_a_move(self) -> None:
        """Releasing workers without moving them is not capped."""
        bounds = AllocationBounds(max_moves_per_tick=0)
        guarded = Guardrails(_Fixed({"a": 1, "b": 0}), bounds)
        assert guarded.allocate(_view({"a": 5, "b": 2}, budget=7)) == {"a": 1, "b": 0}

    def test_minimum_beats_the_cap(self) -> None:
        """Raising a queue to its minimum happens even with a cap of zero."""
        bounds = AllocationBounds(min_workers={"b": 2}, max_moves_per_tick=0)
        guarded = Guardrails(_Fixed({"a": 4, "b": 0}), bounds)
        assert guarded.allocate(_view({"a": 4, "b": 0}, budget=6)) == {"a": 4, "b": 2}


class TestExplained:
    def test_the_proposal_and_the_constraints_that_changed_it_are_kept(self) -> None:
        """Each tick keeps what the policy proposed and which constraints changed it, in order."""
        bounds = AllocationBounds(max_workers={"b": 3}, max_moves_per_tick=1)
        guarded = Guardrails(_Fixed({"a": 0, "b": 4, "c": 0}), bounds, hysteresis_workers=2)
        allocation = guarded.allocate(_view({"a": 4, "b": 0, "c": 1}, budget=5))
        assert guarded.last_proposal == {"a": 0, "b": 4, "c": 0}
        # c is held (a change of 1 < 2), b clipped to 3, then only one worker may move.
        assert guarded.last_constraints == ("hysteresis", "bounds", "move_cap")
        assert allocation["b"] == 1
        assert allocation["c"] == 1

    def test_a_proposal_taken_as_it_is_names_no_constraint(self) -> None:
        """Nothing to trim: no constraint named, and the proposal is the target."""
        guarded = Guardrails(_Fixed({"a": 1, "b": 1}), AllocationBounds())
        assert guarded.allocate(_view({"a": 2, "b": 0}, budget=2)) == {"a": 1, "b": 1}
        assert guarded.last_constraints == ()
        assert guarded.last_proposal == {"a": 1, "b": 1}


class TestHysteresis:
    def test_small_changes_are_held(self) -> None:
        """With h = 2, a change of one worker is ignored and a change of two goes through."""
        guarded = Guardrails(_Fixed({"a": 5, "b": 1, "c": 6}), hysteresis_workers=2)
        assert guarded.allocate(_view({"a": 4, "b": 3, "c": 4}, budget=20)) == {
            "a": 4,
            "b": 1,
            "c": 6,
        }

    def test_default_lets_everything_through(self) -> None:
        """With the default h = 1 every change is applied."""
        guarded = Guardrails(_Fixed({"a": 5, "b": 2}))
        assert guarded.allocate(_view({"a": 4, "b": 3}, budget=20)) == {"a": 5, "b": 2}


class TestFallback:
    @pytest.mark.parametrize(
        ("proposal", "reason"),
        [
            ({"a": 1}, "misses queues ['b']"),
            ({"a": 1, "b": 1, "zz": 1}, "unknown queues ['zz']"),
            ({"a": -1, "b": 1}, "negative"),
            ({"a": 1.5, "b": 1}, "not an int"),
            ({"a": float("nan"), "b": 1}, "NaN"),
            ({"a": True, "b": 1}, "not an int"),
            ({"a": 9, "b": 9}, "over the budget of 10"),
            ([1, 2], "not a mapping"),
        ],
    )
    def test_invalid_output_uses_fallback(self, proposal: object, reason: str) -> None:
        """Any invalid proposal is replaced by the fallback's, and the reason is recorded."""
        guarded = Guardrails(_Fixed(proposal), fallback=StaticAllocator())
        allocation = guarded.allocate(_view({"a": 0, "b": 0}, budget=10))
        assert allocation == {"a": 5, "b": 5}
        assert guarded.last_fallback_reason is not None
        assert reason in guarded.last_fallback_reason
        assert guarded.last_fallback_reason.startswith("fixed:")
        assert guarded.fallback_count == 1

    def test_exception_uses_fallback(self) -> None:
        """An allocator that raises is replaced by the fallback; the error is recorded."""
        guarded = Guardrails(_Raising(), fallback=StaticAllocator())
        assert guarded.allocate(_view({"a": 0, "b": 0}, budget=4)) == {"a": 2, "b": 2}
        assert guarded.last_fallback_reason == "broken: raised RuntimeError: checkpoint missing"

    def test_reason_clears_and_count_accumulates(self) -> None:
        """A good tick clears the reason; the counter keeps the total."""
        inner = _Fixed({"a": 1})
        guarded = Guardrails(inner)
        view = _view({"a": 0, "b": 0}, budget=4)
        guarded.allocate(view)
        guarded.allocate(view)
        inner.proposal = {"a": 1, "b": 1}
        assert guarded.allocate(view) == {"a": 1, "b": 1}
        assert guarded.last_fallback_reason is None
        assert guarded.fallback_count == 2

    def test_numpy_ints_are_valid(self) -> None:
        """numpy integers are accepted as worker counts."""
        view = _view({"a": 0}, budget=4)
        assert invalid_reason({"a": np.int64(3)}, view) is None

    def test_fallback_failing_too_holds(self) -> None:
        """When the fallback fails as well, the current allocation is held and both reasons kept."""
        guarded = Guardrails(_Raising(), fallback=_Fixed({"a": -5}, name="bad"))
        assert guarded.allocate(_view({"a": 2, "b": 1}, budget=4)) == {"a": 2, "b": 1}
        assert guarded.last_fallback_reason is not None
        assert "checkpoint missing" in guarded.last_fallback_reason
        assert "fallback bad" in guarded.last_fallback_reason
        assert "holding" in guarded.last_fallback_reason

    def test_name_is_the_wrapped_policy(self) -> None:
        """Guardrails report the wrapped allocator's name, which is the policy in charge."""
        assert Guardrails(MaxWeightAllocator()).name == "maxweight"


@st.composite
def _views_and_bounds(draw: st.DrawFn) -> tuple[ClusterView, AllocationBounds]:
    n = draw(st.integers(1, 8))
    queues = tuple(
        _queue(
            f"q{i}",
            depth=draw(st.integers(0, 60)),
            arrival_rate_per_s=draw(st.floats(0, 5)),
            workers_ready=draw(st.integers(0, 5)),
            model_load_s=draw(st.floats(0, 20)),
        )
        for i in range(n)
    )
    budget = draw(st.integers(0, 30))
    mins: dict[str, int] = {}
    room = budget
    for q in queues:
        low = draw(st.integers(0, min(room, 3)))
        mins[q.name] = low
        room -= low
    maxes = {q.name: mins[q.name] + draw(st.integers(0, 6)) for q in queues if draw(st.booleans())}
    cap = draw(st.none() | st.integers(0, 6))
    view = ClusterView(now_s=0.0, tick_s=1.0, budget=budget, queues=queues)
    return view, AllocationBounds(min_workers=mins, max_workers=maxes, max_moves_per_tick=cap)


class TestInvariants:
    @pytest.mark.parametrize("name", HEURISTIC_ALLOCATORS)
    @settings(max_examples=100, deadline=None)
    @given(case=_views_and_bounds(), hysteresis=st.integers(1, 3))
    def test_output_always_within_limits(
        self, name: str, case: tuple[ClusterView, AllocationBounds], hysteresis: int
    ) -> None:
        """Whatever the allocator proposes, the result is valid, bounded and within the move cap."""
        view, bounds = case
        guarded = Guardrails(make_allocator(name), bounds, hysteresis_workers=hysteresis)
        allocation = guarded.allocate(view)
        assert invalid_reason(allocation, view) is None
        current = view.allocation()
        for q in view.queues:
            assert allocation[q.name] >= bounds.min_workers.get(q.name, 0)
            high = bounds.max_workers.get(q.name)
            if high is not None:
                assert allocation[q.name] <= high
        if bounds.max_moves_per_tick is not None:
            mandatory = sum(max(bounds.min_workers.get(n, 0) - current[n], 0) for n in current)
            moves = sum(max(allocation[n] - current[n], 0) for n in current)
            assert moves <= max(bounds.max_moves_per_tick, mandatory)
        assert guarded.last_fallback_reason is None
