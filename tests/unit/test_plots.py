"""The plots' rules: one colour per queue in every panel and every figure, legends outside the
axes, integer ticks on axes that count workers or jobs."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from policies.sim.metrics import RunRecord
from policies.sim.scenario import make_allocator_for, make_router_for, parse_scenario, prepare
from scheduler import plots
from scheduler.plots import demo_figure, queue_colors, runs_figure

QUEUES = ["chat", "embed", "vision"]


def _scenario(n_queues: int) -> dict[str, object]:
    names = QUEUES if n_queues == 3 else [f"q{i:02d}" for i in range(n_queues)]
    return {
        "name": f"s{n_queues}",
        "queues": [
            {"name": n, "job_types": [n], "service": {"kind": "exponential", "mean_s": 0.5},
             "model_load_s": 2.0}
            for n in names
        ],
        "allocation": {"policy": "proportional", "tick_s": 1.0, "budget": n_queues + 2},
        "workload": {"generators": [
            {"kind": "poisson", "rate_per_s": 1.2 * n_queues, "mix": dict.fromkeys(names, 1)}
        ]},
        "duration_s": 120.0,
    }  # fmt: skip


def _runs(n_queues: int, policies: Iterable[str]) -> dict[str, RunRecord]:
    """Real simulator runs of each policy on the same jobs."""
    scenario = parse_scenario(_scenario(n_queues))
    prepared = prepare(scenario, 0)
    out = {}
    for name in policies:
        run = prepared.start(make_router_for(scenario, None))
        run.run(make_allocator_for(scenario, name))
        out[name] = run.record()
    return out


def _queue_lines(ax: Axes) -> list[Line2D]:
    return [line for line in ax.get_lines() if not line.get_label().startswith("_")]


def _drawn(fig: Figure) -> Figure:
    fig.canvas.draw()
    return fig


def _assert_legends_outside(fig: Figure) -> None:
    for ax in fig.axes:
        legend = ax.get_legend()
        assert legend is not None, ax.get_title()
        assert legend.get_window_extent().x0 >= ax.get_window_extent().x1, ax.get_title()


def _assert_integer_ticks(ax: Axes) -> None:
    low, high = ax.get_ylim()
    ticks = [t for t in ax.get_yticks() if low <= t <= high]
    assert len(ticks) >= 2
    assert np.allclose(ticks, np.round(ticks)), (ax.get_ylabel(), ticks)


def test_queue_colours_are_distinct_and_follow_the_queue_order() -> None:
    """Every queue of a scenario gets its own colour, whatever the number of queues, and the
    same list always gives the same colours."""
    for n in (1, 3, 10, 11, 20, 21, 60):
        names = [f"q{i}" for i in range(n)]
        colors = queue_colors(names)
        assert list(colors) == names
        assert len(set(colors.values())) == n
        assert queue_colors(list(names)) == colors
    assert queue_colors(QUEUES)["chat"] == queue_colors(["chat", "other"])["chat"]


def test_simulate_figure_gives_each_queue_its_colour_in_every_panel_and_figure() -> None:
    """In the depth and allocation panels each queue's line has its scenario colour, and a figure
    drawing another policy's run colours the same queues the same way; policies' CDF lines use
    none of the queue colours."""
    runs = _runs(3, ["proportional", "static"])
    colors = queue_colors(QUEUES)
    seen: dict[str, str] = {}
    for first in ("proportional", "static"):
        ordered = {first: runs[first], **{k: v for k, v in runs.items() if k != first}}
        fig = _drawn(runs_figure(ordered, title="t"))
        ax_cdf, ax_depth, ax_alloc = fig.axes
        for ax in (ax_depth, ax_alloc):
            lines = _queue_lines(ax)
            assert sorted(line.get_label() for line in lines) == sorted(QUEUES)
            for line in lines:
                label = str(line.get_label())
                assert line.get_color() == colors[label]
                assert seen.setdefault(label, str(line.get_color())) == line.get_color()
        assert not {str(line.get_color()) for line in _queue_lines(ax_cdf)} & set(colors.values())
        _assert_legends_outside(fig)
        _assert_integer_ticks(ax_depth)
        _assert_integer_ticks(ax_alloc)
        plots.plt.close(fig)


def test_with_many_queues_the_busiest_keep_their_scenario_colours() -> None:
    """With more queues than the panels show, each drawn queue keeps the colour of its place in
    the scenario, not of its place among the busiest."""
    [run] = _runs(12, ["proportional"]).values()
    colors = queue_colors(run.queue_names)
    fig = _drawn(runs_figure({"proportional": run}))
    lines = _queue_lines(fig.axes[2])
    assert 0 < len(lines) < 12
    assert [line.get_color() for line in lines] == [colors[str(x.get_label())] for x in lines]
    plots.plt.close(fig)


def test_demo_figure_colours_legends_and_worker_ticks() -> None:
    """The demo's load, allocation and JCT panels colour each queue the same way, keep their
    legends outside and count workers in whole numbers (even when an allocation has 1-2)."""
    rng = np.random.default_rng(0)
    submitted = {q: list(rng.uniform(0, 30, 50)) for q in QUEUES}
    jct = {q: list(rng.lognormal(-1, 1, 50)) for q in QUEUES}
    allocation = [(0.0, {"chat": 1, "embed": 1, "vision": 1}), (10.0, {"chat": 2, "embed": 1})]
    fig = _drawn(demo_figure(QUEUES, submitted, allocation, jct, 30.0))
    colors = queue_colors(QUEUES)
    for ax in fig.axes:
        for line in _queue_lines(ax):
            assert line.get_color() == colors[str(line.get_label())]
    _assert_legends_outside(fig)
    _assert_integer_ticks(fig.axes[0])
    _assert_integer_ticks(fig.axes[1])
    plots.plt.close(fig)


def test_outside_legends_stay_inside_the_written_image(tmp_path: Path) -> None:
    """The layout makes room for the legends: each lies within the figure, so the PNG holds it
    whole; an empty set of runs is refused."""
    fig = _drawn(runs_figure(_runs(3, ["proportional", "static"])))
    for ax in fig.axes:
        box = ax.get_legend().get_window_extent()
        assert fig.bbox.x0 <= box.x0, ax.get_title()
        assert box.x1 <= fig.bbox.x1, ax.get_title()
    path = tmp_path / "x.png"
    plots.save(fig, path, dpi=50)
    assert path.read_bytes().startswith(b"\x89PNG")
    with pytest.raises(ValueError, match="nothing to plot"):
        runs_figure({})
