"""The per-view column reads and the row-blocked products the learned allocator's tick runs on."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from policies.learned.networks import matmul_rows
from policies.views import QueueView, queue_column, with_arrival_rates


def _queues(seed: int, n: int) -> tuple[QueueView, ...]:
    rng = np.random.default_rng(seed)
    return tuple(
        QueueView(
            name=f"q{i}",
            job_types=frozenset({"t"}),
            depth=int(rng.integers(0, 9)),
            backlog_s=float(rng.random()),
            oldest_wait_s=float(rng.random()),
            arrival_rate_per_s=float(rng.random()),
            service_time_s=float(rng.random()) + 0.1,
            workers_ready=int(rng.integers(0, 4)),
            workers_busy=int(rng.integers(0, 2)),
            workers_loading=int(rng.integers(0, 2)),
            model_load_s=float(rng.random()),
        )
        for i in range(n)
    )


FIELDS = (
    "depth",
    "backlog_s",
    "oldest_wait_s",
    "arrival_rate_per_s",
    "service_time_s",
    "workers_ready",
    "workers_busy",
    "workers_loading",
    "model_load_s",
    "allocated",
    "in_system",
)


@pytest.mark.parametrize("field", FIELDS)
def test_column_matches_the_attribute_of_every_queue(field: str) -> None:
    """Each column is the field read queue by queue, for a tuple and for a list."""
    queues = _queues(0, 17)
    expected = np.array([float(getattr(q, field)) for q in queues])
    np.testing.assert_array_equal(queue_column(queues, field), expected)
    np.testing.assert_array_equal(queue_column(list(queues), field), expected)


def test_a_new_tuple_of_queues_is_read_afresh() -> None:
    """The kept table belongs to one tuple: another tuple (equal length, other values) is read anew."""
    first, second = _queues(1, 8), _queues(2, 8)
    a = queue_column(first, "depth").copy()
    b = queue_column(second, "depth")
    np.testing.assert_array_equal(b, [q.depth for q in second])
    np.testing.assert_array_equal(queue_column(first, "depth"), a)


@pytest.mark.parametrize("field", FIELDS)
def test_queues_with_new_rates_read_as_if_rebuilt(field: str) -> None:
    """with_arrival_rates equals dataclasses.replace per queue, its columns (derived from the old
    tuple's table) equal a fresh read of the rebuilt queues, and the old tuple reads as before,
    also after the two were read in turn."""
    queues = _queues(4, 9)
    before = queue_column(queues, field).copy()
    rates = [float(i) / 3 for i in range(9)]
    new = with_arrival_rates(queues, rates)
    rebuilt = tuple(
        dataclasses.replace(q, arrival_rate_per_s=r) for q, r in zip(queues, rates, strict=True)
    )
    assert new == rebuilt
    expected = np.array([float(getattr(q, field)) for q in rebuilt])
    for _ in range(2):
        np.testing.assert_array_equal(queue_column(new, field), expected)
        np.testing.assert_array_equal(queue_column(queues, field), before)


def test_columns_are_read_only() -> None:
    """A consumer cannot change what the next consumer of the same view reads."""
    column = queue_column(_queues(3, 4), "depth")
    with pytest.raises(ValueError, match="read-only"):
        column[0] = 99.0


@pytest.mark.parametrize("rows", [1, 63, 64, 65, 257, 1000])
def test_row_blocked_product_equals_the_plain_one(rows: int) -> None:
    """matmul_rows gives a @ w, whatever the number of rows (up to float rounding)."""
    rng = np.random.default_rng(rows)
    a = rng.standard_normal((rows, 64)).astype(np.float32)
    w = rng.standard_normal((64, 64)).astype(np.float32)
    np.testing.assert_allclose(matmul_rows(a, w), a @ w, rtol=1e-5, atol=1e-5)
