"""The one featurisation every learned policy uses: per-queue features for level 2, per-(job, queue)
features for a learned level 1 router.

Features are scale-free where it matters, so one network works across clusters and queue counts:
counts and seconds go through log1p, loads are in Erlangs (arrival rate * service time), worker
counts are fractions of the budget, times are in ticks or relative to the SLO. Changing a feature's
meaning, order or normalisation must bump `FEATURE_SCHEMA_VERSION`: checkpoints store it, and a
policy trained on another version must be refused rather than fed shifted inputs.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from policies.routing import NO_WORKER_WAIT_S, expected_wait_s, is_eligible
from policies.views import ClusterView, JobView, QueueView, queue_column

FEATURE_SCHEMA_VERSION: int = 1

# Per-queue features, column order of `queue_features`.
QUEUE_FEATURE_NAMES: tuple[str, ...] = (
    "log_depth",  # log1p(jobs waiting)
    "log_in_system",  # log1p(jobs waiting or in service)
    "log_backlog_s",  # log1p(seconds of waiting work for one worker)
    "log_oldest_wait_s",  # log1p(seconds the oldest waiting job has waited)
    "log_offered_load",  # log1p(arrival rate * service time), in Erlangs
    "offered_load_share",  # this queue's share of the cluster's offered load (0 when none)
    "log_utilisation",  # log1p(offered load / max(allocated, 1)): >log(2) means overloaded
    "allocated_frac",  # allocated workers / budget
    "ready_frac",  # ready workers / budget
    "loading_frac",  # loading workers / max(allocated, 1)
    "busy_frac",  # busy workers / max(ready, 1)
    "log_service_ticks",  # log1p(service time / tick)
    "log_load_cost_ticks",  # log1p(model load seconds / tick): what moving a worker here costs
    "log_drain_ticks",  # log1p(backlog / max(ready, 1) / tick): ticks to drain with current staff
    "has_slo",  # 1 when the queue has an SLO
    "slo_pressure",  # (oldest wait + service time) / SLO, clipped to [0, 4]; 0 without an SLO
)
N_QUEUE_FEATURES: int = len(QUEUE_FEATURE_NAMES)

# Extra per-queue features of a residual allocator (one that corrects a base heuristic's proposal),
# column order of `base_features`; they follow the `queue_features` columns.
BASE_FEATURE_NAMES: tuple[str, ...] = (
    "base_allocated_frac",  # workers the base heuristic proposes / budget
    "base_delta",  # sign(proposed - allocated) * log1p(|proposed - allocated|)
    "base_moves_in",  # 1 when the base proposes to add a worker here (a model load to pay)
)
N_BASE_FEATURES: int = len(BASE_FEATURE_NAMES)

# Per-(job, queue) features, column order of `job_queue_features`.
JOB_QUEUE_FEATURE_NAMES: tuple[str, ...] = (
    "eligible",  # 1 when rule routing allows this queue for the job
    "log_job_size_s",  # log1p(job size estimate, else the queue's mean service time)
    "size_over_service",  # job size / queue mean service time, clipped to [0, 16]
    "log_expected_wait_s",  # log1p(expected wait); a queue with no worker saturates below
    "no_worker",  # 1 when the queue has no worker at all
    "has_deadline",  # 1 when the job has a deadline
    "deadline_slack",  # (deadline - arrival - wait - size) / (wait + size), clipped to [-4, 4]
    "priority",  # the job's priority, as given
    "log_depth",  # log1p(jobs waiting in the queue)
    "log_ready",  # log1p(ready workers)
    "log_loading",  # log1p(loading workers)
    "log_load_s",  # log1p(model load seconds)
)
N_JOB_QUEUE_FEATURES: int = len(JOB_QUEUE_FEATURE_NAMES)

_SLO_PRESSURE_CAP = 4.0
_SIZE_RATIO_CAP = 16.0
_SLACK_CAP = 4.0
# Caps the "no worker" wait before log1p so it reads as large, not as 1e9.
_WAIT_CAP_S = 1.0e6


def _column(queues: Sequence[QueueView], attr: str) -> np.ndarray:
    """One non-negative numeric field of every queue; a negative reading (a stats glitch) is 0, so
    log1p never sees it and a policy never gets -inf or NaN."""
    values: np.ndarray = np.maximum(queue_column(queues, attr), 0.0)
    return values


def queue_features(view: ClusterView) -> np.ndarray:
    """Per-queue features of `view`, shape (n_queues, N_QUEUE_FEATURES), float32, in queue order.

    Pure and deterministic: the same view gives the same array bit for bit.
    """
    queues = view.queues
    n = len(queues)
    if n == 0:
        return np.zeros((0, N_QUEUE_FEATURES), dtype=np.float32)
    depth = _column(queues, "depth")
    busy = _column(queues, "workers_busy")
    ready = _column(queues, "workers_ready")
    loading = _column(queues, "workers_loading")
    backlog_s = _column(queues, "backlog_s")
    oldest_s = _column(queues, "oldest_wait_s")
    rate = _column(queues, "arrival_rate_per_s")
    service_s = _column(queues, "service_time_s")
    load_s = _column(queues, "model_load_s")
    slo_s = np.fromiter(
        (q.slo_s if q.slo_s is not None else np.nan for q in queues), dtype=np.float64, count=n
    )

    tick_s = max(view.tick_s, 1e-9)
    budget = max(view.budget, 1)
    allocated = ready + loading
    offered = rate * service_s
    total_offered = offered.sum()
    has_slo = ~np.isnan(slo_s)
    pressure = np.zeros(n)
    np.divide(oldest_s + service_s, slo_s, out=pressure, where=has_slo & (slo_s > 0))
    pressure[has_slo & (slo_s <= 0)] = _SLO_PRESSURE_CAP

    out = np.empty((n, N_QUEUE_FEATURES), dtype=np.float64)
    out[:, 0] = np.log1p(depth)
    out[:, 1] = np.log1p(depth + busy)
    out[:, 2] = np.log1p(backlog_s)
    out[:, 3] = np.log1p(oldest_s)
    out[:, 4] = np.log1p(offered)
    out[:, 5] = offered / total_offered if total_offered > 0 else 0.0
    out[:, 6] = np.log1p(offered / np.maximum(allocated, 1.0))
    out[:, 7] = allocated / budget
    out[:, 8] = ready / budget
    out[:, 9] = loading / np.maximum(allocated, 1.0)
    out[:, 10] = busy / np.maximum(ready, 1.0)
    out[:, 11] = np.log1p(service_s / tick_s)
    out[:, 12] = np.log1p(load_s / tick_s)
    out[:, 13] = np.log1p(backlog_s / np.maximum(ready, 1.0) / tick_s)
    out[:, 14] = has_slo
    out[:, 15] = np.clip(pressure, 0.0, _SLO_PRESSURE_CAP)
    return out.astype(np.float32)


def base_features(view: ClusterView, proposal: np.ndarray) -> np.ndarray:
    """Features of a base heuristic's `proposal` (workers per queue, in queue order) against the
    current allocation, shape (n_queues, N_BASE_FEATURES), float32."""
    n = len(view.queues)
    allocated = queue_column(view.queues, "allocated")
    proposed = proposal.astype(np.float64)
    delta = proposed - allocated
    out = np.empty((n, N_BASE_FEATURES), dtype=np.float64)
    out[:, 0] = proposed / max(view.budget, 1)
    out[:, 1] = np.sign(delta) * np.log1p(np.abs(delta))
    out[:, 2] = delta > 0
    return out.astype(np.float32)


def job_queue_features(job: JobView, queues: Sequence[QueueView]) -> np.ndarray:
    """Features of routing `job` to each queue, shape (n_queues, N_JOB_QUEUE_FEATURES), float32.

    A learned router scores each row and picks among the eligible ones; ineligible rows are included
    (marked by the `eligible` column) so the array always lines up with `queues`.
    """
    n = len(queues)
    if n == 0:
        return np.zeros((0, N_JOB_QUEUE_FEATURES), dtype=np.float32)
    eligible = np.fromiter((is_eligible(job, q) for q in queues), dtype=np.float64, count=n)
    wait_s = np.fromiter((expected_wait_s(q) for q in queues), dtype=np.float64, count=n)
    service_s = _column(queues, "service_time_s")
    size_s = np.full(n, job.size_estimate_s) if job.size_estimate_s > 0 else service_s.copy()
    no_worker = wait_s >= NO_WORKER_WAIT_S
    wait_s = np.minimum(wait_s, _WAIT_CAP_S)

    out = np.empty((n, N_JOB_QUEUE_FEATURES), dtype=np.float64)
    out[:, 0] = eligible
    out[:, 1] = np.log1p(size_s)
    out[:, 2] = np.clip(size_s / np.maximum(service_s, 1e-9), 0.0, _SIZE_RATIO_CAP)
    out[:, 3] = np.log1p(wait_s)
    out[:, 4] = no_worker
    if job.deadline_s is None:
        out[:, 5] = 0.0
        out[:, 6] = 0.0
    else:
        finish_s = wait_s + size_s
        slack = (job.deadline_s - job.arrival_s - finish_s) / np.maximum(finish_s, 1e-9)
        out[:, 5] = 1.0
        out[:, 6] = np.clip(slack, -_SLACK_CAP, _SLACK_CAP)
    out[:, 7] = float(job.priority)
    out[:, 8] = np.log1p(_column(queues, "depth"))
    out[:, 9] = np.log1p(_column(queues, "workers_ready"))
    out[:, 10] = np.log1p(_column(queues, "workers_loading"))
    out[:, 11] = np.log1p(_column(queues, "model_load_s"))
    return out.astype(np.float32)
