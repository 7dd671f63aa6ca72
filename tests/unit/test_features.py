"""Featurisation shared by learned policies: schema, shapes, values, determinism, robustness."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from policies import allocation, features, guardrails, legacy_layout, registry, routing, schema
from policies.features import (
    FEATURE_SCHEMA_VERSION,
    JOB_QUEUE_FEATURE_NAMES,
    N_JOB_QUEUE_FEATURES,
    N_QUEUE_FEATURES,
    QUEUE_FEATURE_NAMES,
    job_queue_features,
    queue_features,
)
from policies.views import ClusterView, JobView, QueueView


def _queue(name: str, **kw: Any) -> QueueView:
    return QueueView(name=name, job_types=frozenset({"llm"}), **kw)


def _view(*queues: QueueView, budget: int = 10, tick_s: float = 2.0) -> ClusterView:
    return ClusterView(now_s=100.0, tick_s=tick_s, budget=budget, queues=tuple(queues))


def _sample_view() -> ClusterView:
    return _view(
        _queue(
            "a",
            depth=7,
            backlog_s=14.0,
            oldest_wait_s=3.0,
            arrival_rate_per_s=2.0,
            service_time_s=2.0,
            workers_ready=3,
            workers_busy=3,
            workers_loading=1,
            model_load_s=6.0,
            slo_s=10.0,
        ),
        _queue("b", arrival_rate_per_s=1.0, service_time_s=4.0, workers_ready=2),
        _queue("c"),
    )


def _col(name: str) -> int:
    return QUEUE_FEATURE_NAMES.index(name)


class TestSchema:
    def test_version_constant(self) -> None:
        """The schema version is an int constant, 1 for this feature set."""
        assert FEATURE_SCHEMA_VERSION == 1
        assert isinstance(FEATURE_SCHEMA_VERSION, int)

    def test_names_unique_and_counted(self) -> None:
        """Feature names are unique and their counts match the array widths."""
        assert len(set(QUEUE_FEATURE_NAMES)) == N_QUEUE_FEATURES == len(QUEUE_FEATURE_NAMES)
        assert len(set(JOB_QUEUE_FEATURE_NAMES)) == N_JOB_QUEUE_FEATURES

    @pytest.mark.parametrize(
        "module", [features, routing, allocation, guardrails, registry, schema, legacy_layout]
    )
    def test_decision_layer_has_no_io_imports(self, module: ModuleType) -> None:
        """The pure decision modules import no Redis, Ray or torch."""
        source = Path(str(module.__file__)).read_text(encoding="utf-8")
        for banned in ("import redis", "import ray", "import torch", "from redis", "from ray"):
            assert banned not in source


class TestQueueFeatures:
    def test_shape_and_dtype(self) -> None:
        """One float32 row per queue, one column per named feature."""
        array = queue_features(_sample_view())
        assert array.shape == (3, N_QUEUE_FEATURES)
        assert array.dtype == np.float32

    def test_values(self) -> None:
        """Hand-checked values of the first queue."""
        row = queue_features(_sample_view())[0]
        assert row[_col("log_depth")] == pytest.approx(np.log1p(7))
        assert row[_col("log_in_system")] == pytest.approx(np.log1p(10))
        assert row[_col("log_offered_load")] == pytest.approx(np.log1p(4.0))
        # Offered loads 4 and 4 Erlangs: an even share.
        assert row[_col("offered_load_share")] == pytest.approx(0.5)
        assert row[_col("allocated_frac")] == pytest.approx(0.4)
        assert row[_col("log_load_cost_ticks")] == pytest.approx(np.log1p(3.0))
        assert row[_col("log_drain_ticks")] == pytest.approx(np.log1p(14.0 / 3 / 2.0))
        assert row[_col("has_slo")] == 1.0
        assert row[_col("slo_pressure")] == pytest.approx(0.5)

    def test_no_slo_means_no_pressure(self) -> None:
        """Queues without an SLO read 0 for both SLO features."""
        row = queue_features(_sample_view())[1]
        assert row[_col("has_slo")] == 0.0
        assert row[_col("slo_pressure")] == 0.0

    def test_deterministic(self) -> None:
        """The same view gives the same array, bit for bit."""
        assert np.array_equal(queue_features(_sample_view()), queue_features(_sample_view()))

    def test_permutation_equivariant(self) -> None:
        """Reordering queues reorders rows and changes nothing else."""
        view = _sample_view()
        reordered = _view(*reversed(view.queues))
        assert np.array_equal(queue_features(reordered), queue_features(view)[::-1])

    def test_empty_and_extreme_views_are_finite(self) -> None:
        """No queues gives an empty array; zero budget, zero tick and huge values stay finite."""
        assert queue_features(_view()).shape == (0, N_QUEUE_FEATURES)
        extreme = _view(
            _queue("x", depth=10**9, backlog_s=1e12, slo_s=0.0, service_time_s=0.0),
            _queue("y", backlog_s=-3.0),
            budget=0,
            tick_s=0.0,
        )
        assert np.isfinite(queue_features(extreme)).all()


class TestJobQueueFeatures:
    def test_shape_and_eligibility(self) -> None:
        """One row per queue; the eligible column follows the rule-routing check."""
        queues = [_queue("a"), QueueView(name="b", job_types=frozenset({"asr"}))]
        job = JobView(job_id="j", job_type="llm", arrival_s=0.0)
        array = job_queue_features(job, queues)
        assert array.shape == (2, N_JOB_QUEUE_FEATURES)
        assert array.dtype == np.float32
        assert array[:, JOB_QUEUE_FEATURE_NAMES.index("eligible")].tolist() == [1.0, 0.0]

    def test_deadline_slack(self) -> None:
        """Slack is (deadline - arrival - wait - size) relative to wait + size."""
        queue = _queue("a", backlog_s=4.0, workers_ready=1)
        job = JobView(
            job_id="j", job_type="llm", arrival_s=10.0, deadline_s=22.0, size_estimate_s=2.0
        )
        row = job_queue_features(job, [queue])[0]
        assert row[JOB_QUEUE_FEATURE_NAMES.index("has_deadline")] == 1.0
        assert row[JOB_QUEUE_FEATURE_NAMES.index("deadline_slack")] == pytest.approx(
            (12.0 - 6.0) / 6.0
        )

    def test_unstaffed_queue_flagged_and_finite(self) -> None:
        """A queue with no worker is flagged and its wait saturates instead of reading 1e9."""
        row = job_queue_features(JobView(job_id="j", job_type="llm", arrival_s=0.0), [_queue("a")])[
            0
        ]
        assert row[JOB_QUEUE_FEATURE_NAMES.index("no_worker")] == 1.0
        assert np.isfinite(row).all()
        assert row[JOB_QUEUE_FEATURE_NAMES.index("log_expected_wait_s")] < 15.0

    def test_deterministic(self) -> None:
        """The same job and queues give the same array."""
        job = JobView(job_id="j", job_type="llm", arrival_s=0.0, deadline_s=5.0, priority=2)
        queues = list(_sample_view().queues)
        assert np.array_equal(job_queue_features(job, queues), job_queue_features(job, queues))
