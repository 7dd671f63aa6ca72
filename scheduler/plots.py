"""PNG plots of simulation runs and of the live demo (matplotlib, Agg backend: no display needed).

Every figure follows the same rules: a queue has one colour, `queue_colors` of its scenario's
queue order, in every panel and every file; policies (which are not queues) are told apart by
grey shades and line styles instead, so they never borrow a queue's colour; legends sit outside
the axes, to the right, never over the data; axes counting workers or jobs have integer ticks.
"""

from __future__ import annotations

import colorsys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.colors import to_hex
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from policies.sim.metrics import RunRecord

# Beyond this many queues the time-series panels show only the busiest, to stay readable.
_MAX_QUEUE_LINES = 8
# Policies in a JCT plot: (grey, line style) in turn, the first (the one whose time series are
# drawn) solid black.
_POLICY_STYLES = tuple(
    (grey, style) for style in ("-", "--", "-.", ":") for grey in ("#000000", "#999999")
)


def queue_colors(queue_names: Sequence[str]) -> dict[str, str]:
    """One colour per queue, by its place in the scenario's queue order: matplotlib's tab10 for
    up to 10 queues, tab20 for up to 20, beyond that hues a golden angle apart in three shades
    (distinct, though two of many can look alike). A queue keeps its colour however many of the
    others a panel shows, so the same queue has the same colour in every panel and every file."""
    n = len(queue_names)
    if n <= 10:
        palette = [to_hex(c) for c in plt.get_cmap("tab10").colors]  # type: ignore[attr-defined]
    elif n <= 20:
        palette = [to_hex(c) for c in plt.get_cmap("tab20").colors]  # type: ignore[attr-defined]
    else:
        golden = (5**0.5 - 1) / 2
        palette = [
            to_hex(colorsys.hsv_to_rgb((i * golden) % 1.0, 0.85, (0.9, 0.6, 0.4)[i % 3]))
            for i in range(n)
        ]
    return {name: palette[i] for i, name in enumerate(queue_names)}


def legend_outside(ax: Axes, **kwargs: Any) -> None:
    """The axes' legend to their right, outside the data."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, **kwargs)


def integer_ticks(ax: Axes) -> None:
    """Whole-number ticks on the y axis (workers and jobs come in units)."""
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))


def _busiest(record: RunRecord) -> list[int]:
    ts = record.timeseries
    if ts.depth.size == 0:
        return list(range(min(len(record.queue_names), _MAX_QUEUE_LINES)))
    load = ts.depth.mean(axis=0) + ts.allocation.mean(axis=0)
    order = np.argsort(-load, kind="stable")
    return [int(q) for q in order[:_MAX_QUEUE_LINES]]


def runs_figure(records: Mapping[str, RunRecord], *, title: str = "") -> Figure:
    """JCT CDF per policy; queue depth and allocation over time for the first one.

    `records` maps policy names to runs; the first entry (e.g. the best of a comparison) is the one
    whose time series are drawn.
    """
    if not records:
        raise ValueError("nothing to plot")
    fig, (ax_cdf, ax_depth, ax_alloc) = plt.subplots(3, 1, figsize=(10, 11))
    lows: list[float] = []
    for i, (name, record) in enumerate(records.items()):
        grey, style = _POLICY_STYLES[i % len(_POLICY_STYLES)]
        jct = np.sort((record.completion_s - record.arrival_s)[record.completed_mask])
        if len(jct) == 0:
            continue
        frac = np.arange(1, len(jct) + 1) / len(jct)
        lows.append(max(float(np.percentile(jct, 0.5)), 1e-6))
        ax_cdf.plot(np.maximum(jct, 1e-6), frac, label=name, color=grey, linestyle=style)
    ax_cdf.set_xscale("log")
    if lows:
        # Jobs served the instant they arrive would stretch the axis over empty decades.
        ax_cdf.set_xlim(left=min(lows))
    ax_cdf.set_xlabel("job completion time (s)")
    ax_cdf.set_ylabel("fraction of jobs")
    ax_cdf.set_title("JCT CDF")
    ax_cdf.grid(True, which="both", alpha=0.3)
    legend_outside(ax_cdf, title="policy")

    first_name, first = next(iter(records.items()))
    ts = first.timeseries
    colors = queue_colors(first.queue_names)
    for q in _busiest(first):
        label = first.queue_names[q]
        color = colors[label]
        ax_depth.plot(ts.t_s, ts.depth[:, q], label=label, color=color, linewidth=0.8)
        ax_alloc.step(
            ts.t_s, ts.allocation[:, q], where="post", label=label, color=color, linewidth=0.8
        )
    shown = "" if len(first.queue_names) <= _MAX_QUEUE_LINES else " (busiest queues)"
    ax_depth.set_title(f"queue depth, {first_name}{shown}")
    ax_depth.set_xlabel("simulated time (s)")
    ax_depth.set_ylabel("jobs waiting")
    integer_ticks(ax_depth)
    legend_outside(ax_depth, fontsize="small", title="queue")
    ax_alloc.set_title(f"allocation, {first_name}{shown}")
    ax_alloc.set_xlabel("simulated time (s)")
    ax_alloc.set_ylabel("workers")
    integer_ticks(ax_alloc)
    legend_outside(ax_alloc, fontsize="small", title="queue")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def save(fig: Figure, out_path: Path, *, dpi: int = 110) -> None:
    """Writes `fig` (legends outside the axes included) and frees it, even when the write fails."""
    try:
        fig.savefig(out_path, dpi=dpi, bbox_inches="tight")
    finally:
        plt.close(fig)


def plot_runs(records: Mapping[str, RunRecord], out_path: Path, *, title: str = "") -> None:
    """Writes `runs_figure(records, title=title)` to `out_path`."""
    save(runs_figure(records, title=title), out_path)


def demo_figure(
    queue_names: Sequence[str],
    submitted_at_s: Mapping[str, Sequence[float]],
    allocation: Sequence[tuple[float, Mapping[str, int]]],
    jct_s: Mapping[str, Sequence[float]],
    end_s: float,
) -> Figure:
    """The live demo: jobs submitted per second, workers per queue over time (`allocation`: the
    controller's changes as (seconds since the load started, workers per queue)) and the JCT CDF,
    each per queue (`submitted_at_s` and `jct_s` keyed by queue name)."""
    fig, (ax_load, ax_alloc, ax_jct) = plt.subplots(3, 1, figsize=(10, 9))
    colors = queue_colors(queue_names)
    # Both time axes run until the last allocation change: workers still move while the last
    # jobs drain, after the load has stopped.
    start_s = min([0.0, *(t for t, _ in allocation)])
    stop_s = max([end_s, *(t for t, _ in allocation)]) + 1.0
    bins = np.arange(0.0, end_s + 1.0, 1.0)
    for queue in queue_names:
        counts, _ = np.histogram(submitted_at_s.get(queue, []), bins=bins)
        ax_load.plot(bins[:-1], counts, label=queue, color=colors[queue])
    ax_load.set_title("load")
    ax_load.set_ylabel("jobs submitted / s")
    ax_load.set_xlabel("seconds since the load started")
    integer_ticks(ax_load)
    legend_outside(ax_load, title="queue")
    if allocation:
        times = [t for t, _ in allocation] + [stop_s]
        for queue in queue_names:
            values = [workers.get(queue, 0) for _, workers in allocation]
            ax_alloc.step(
                times, [*values, values[-1]], where="post", label=queue, color=colors[queue]
            )
    ax_alloc.set_title("allocation")
    ax_alloc.set_ylabel("workers")
    ax_alloc.set_xlabel("seconds since the load started")
    for ax in (ax_load, ax_alloc):
        ax.set_xlim(start_s, stop_s)
    integer_ticks(ax_alloc)
    legend_outside(ax_alloc, title="queue")
    for queue in queue_names:
        ordered = np.sort(np.asarray(jct_s.get(queue, []), dtype=float))
        if len(ordered):
            cdf = np.arange(1, len(ordered) + 1) / len(ordered)
            ax_jct.plot(ordered, cdf, label=queue, color=colors[queue])
    ax_jct.set_xscale("log")
    ax_jct.set_title("job completion time")
    ax_jct.set_xlabel("job completion time, s")
    ax_jct.set_ylabel("CDF")
    legend_outside(ax_jct, title="queue")
    fig.tight_layout()
    return fig
