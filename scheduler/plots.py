"""PNG plots of simulation runs (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np

from policies.sim.metrics import RunRecord

# Beyond this many queues the time-series panels show only the busiest, to stay readable.
_MAX_QUEUE_LINES = 8


def _busiest(record: RunRecord) -> list[int]:
    ts = record.timeseries
    if ts.depth.size == 0:
        return list(range(min(len(record.queue_names), _MAX_QUEUE_LINES)))
    load = ts.depth.mean(axis=0) + ts.allocation.mean(axis=0)
    order = np.argsort(-load, kind="stable")
    return [int(q) for q in order[:_MAX_QUEUE_LINES]]


def plot_runs(records: Mapping[str, RunRecord], out_path: Path, *, title: str = "") -> None:
    """Writes a PNG: JCT CDF per policy; queue depth and allocation over time for the first one.

    `records` maps policy names to runs; the first entry (e.g. the best of a comparison) is the one
    whose time series are drawn.
    """
    if not records:
        raise ValueError("nothing to plot")
    fig, (ax_cdf, ax_depth, ax_alloc) = plt.subplots(3, 1, figsize=(9, 11))
    for name, record in records.items():
        jct = np.sort((record.completion_s - record.arrival_s)[record.completed_mask])
        if len(jct) == 0:
            continue
        frac = np.arange(1, len(jct) + 1) / len(jct)
        ax_cdf.plot(np.maximum(jct, 1e-6), frac, label=name)
    ax_cdf.set_xscale("log")
    ax_cdf.set_xlabel("job completion time (s)")
    ax_cdf.set_ylabel("fraction of jobs")
    ax_cdf.set_title("JCT CDF")
    ax_cdf.grid(True, which="both", alpha=0.3)
    ax_cdf.legend(loc="lower right")

    first_name, first = next(iter(records.items()))
    ts = first.timeseries
    for q in _busiest(first):
        label = first.queue_names[q]
        ax_depth.plot(ts.t_s, ts.depth[:, q], label=label, linewidth=0.8)
        ax_alloc.step(ts.t_s, ts.allocation[:, q], where="post", label=label, linewidth=0.8)
    shown = "" if len(first.queue_names) <= _MAX_QUEUE_LINES else " (busiest queues)"
    ax_depth.set_title(f"queue depth, {first_name}{shown}")
    ax_depth.set_xlabel("simulated time (s)")
    ax_depth.set_ylabel("jobs waiting")
    ax_depth.legend(loc="upper right", fontsize="small")
    ax_alloc.set_title(f"allocation, {first_name}{shown}")
    ax_alloc.set_xlabel("simulated time (s)")
    ax_alloc.set_ylabel("workers")
    ax_alloc.legend(loc="upper right", fontsize="small")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
