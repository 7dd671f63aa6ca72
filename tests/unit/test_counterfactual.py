"""The shadow estimate on the simulator: a window of live history replayed under two allocators."""

from __future__ import annotations

import pytest

from policies.registry import make_allocator
from policies.schema import Layout
from policies.sim.counterfactual import ReplayWindow, WindowTick, replay_window
from policies.views import Allocator, ClusterView, QueueView

LAYOUT = Layout.model_validate(
    {
        "queues": [{"name": "a", "job_types": ["a"]}, {"name": "b", "job_types": ["b"]}],
        "allocation": {"budget": 4, "policy": "proportional"},
    }
)


def _start(depth_a: int = 0, ready: tuple[int, int] = (2, 2)) -> ClusterView:
    return ClusterView(
        now_s=1000.0,
        tick_s=1.0,
        budget=4,
        queues=(
            QueueView("a", frozenset({"a"}), depth=depth_a, service_time_s=0.5,
                      workers_ready=ready[0], model_load_s=2.0),
            QueueView("b", frozenset({"b"}), service_time_s=0.5, workers_ready=ready[1],
                      model_load_s=2.0),
        ),
    )  # fmt: skip


def _shift_window(seconds: int = 60) -> ReplayWindow:
    """Even load for 10 s, then all of it (and more) on queue a."""
    ticks = tuple(
        WindowTick(1000.0 + t, (12, 0) if t > 10 else (2, 2)) for t in range(1, seconds + 1)
    )
    return ReplayWindow(_start(), ticks)


def _named(name: str) -> Allocator:
    return make_allocator(name)


class TestReplay:
    def test_the_same_policy_on_both_sides_differs_by_nothing(self) -> None:
        """Both runs see the same jobs and service times, so one policy against itself is exact."""
        estimate = replay_window(
            LAYOUT, _shift_window(), lambda: _named("switch_aware"), lambda: _named("switch_aware")
        )
        assert estimate.difference_s == 0.0
        assert estimate.gain == 0.0
        assert estimate.acting_mean_jct_s > 0

    def test_a_policy_that_follows_the_shift_is_estimated_faster(self) -> None:
        """Static keeps two workers on a queue with no load; proportional moves them to the burst."""
        estimate = replay_window(
            LAYOUT, _shift_window(), lambda: _named("static"), lambda: _named("proportional")
        )
        assert estimate.shadow_mean_jct_s < estimate.acting_mean_jct_s
        assert estimate.difference_s < 0
        assert 0 < estimate.gain < 1
        swapped = replay_window(
            LAYOUT, _shift_window(), lambda: _named("proportional"), lambda: _named("static")
        )
        assert swapped.acting_mean_jct_s == pytest.approx(estimate.shadow_mean_jct_s)
        assert swapped.difference_s == pytest.approx(-estimate.difference_s)

    def test_every_job_of_the_window_and_its_start_is_replayed(self) -> None:
        """Jobs in system at the start arrive at 0; each tick's count is spread over its interval."""
        window = ReplayWindow(
            _start(depth_a=5),
            (WindowTick(1001.0, (3, 1)), WindowTick(1003.0, (0, 2))),
        )
        table = window.arrival_table()
        assert len(table) == 5 + 3 + 1 + 2
        assert list(table.arrival_s[:5]) == [0.0] * 5
        assert list(table.arrival_s[-2:]) == [1.5, 2.5]
        assert table.job_types == ("a", "b")
        estimate = replay_window(LAYOUT, window, lambda: _named("static"), lambda: _named("static"))
        assert estimate.jobs == 11
        assert estimate.window_s == 3.0
        assert estimate.seeds == 3

    def test_each_run_gets_a_fresh_allocator(self) -> None:
        """The factories are called once per run (two allocators, each seed), never shared."""
        calls: list[str] = []

        def factory(name: str) -> Allocator:
            calls.append(name)
            return _named(name)

        replay_window(
            LAYOUT,
            _shift_window(20),
            lambda: factory("static"),
            lambda: factory("proportional"),
            seeds=(0, 1),
        )
        assert calls == ["static", "proportional"] * 2

    def test_an_empty_window_estimates_no_difference(self) -> None:
        """No jobs in system and none arriving: both means are 0 and the gain is 0."""
        window = ReplayWindow(_start(), tuple(WindowTick(1000.0 + t, (0, 0)) for t in range(1, 6)))
        estimate = replay_window(LAYOUT, window, lambda: _named("static"), lambda: _named("static"))
        assert (estimate.jobs, estimate.difference_s, estimate.gain) == (0, 0.0, 0.0)


class TestWindowChecks:
    def test_arrival_counts_must_cover_every_queue(self) -> None:
        """A tick with the wrong number of counts is refused, naming the tick."""
        with pytest.raises(ValueError, match=r"ticks\[0\]: 1 arrival counts for 2 queues"):
            ReplayWindow(_start(), (WindowTick(1001.0, (1,)),))

    def test_ticks_must_not_go_back_in_time(self) -> None:
        """A tick before the one before it is refused."""
        with pytest.raises(ValueError, match=r"ticks\[1\]: at 1000.5 s"):
            ReplayWindow(_start(), (WindowTick(1001.0, (0, 0)), WindowTick(1000.5, (0, 0))))

    def test_negative_counts_are_refused(self) -> None:
        """Arrival counts are counts."""
        with pytest.raises(ValueError, match="must be >= 0"):
            ReplayWindow(_start(), (WindowTick(1001.0, (-1, 0)),))

    def test_no_seeds_is_refused(self) -> None:
        """An estimate needs at least one draw of the service times."""
        with pytest.raises(ValueError, match="at least one seed"):
            replay_window(LAYOUT, _shift_window(5), lambda: _named("static"),
                          lambda: _named("static"), seeds=())  # fmt: skip
