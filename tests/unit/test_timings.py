"""Timing histograms as Redis keeps them: the bucket bounds the Lua and Python share, buckets and
quantiles as Prometheus reads them, and counters that are never trusted."""

from __future__ import annotations

import math
import re

import pytest

from scheduler.keys import TIMING_BUCKETS_MS
from scheduler.timings import (
    BUCKET_BOUNDS_S,
    Histogram,
    QueueTimings,
    bucket_of,
    parse_tenants,
)
from tests.conftest import REPO_ROOT


class TestBuckets:
    def test_the_lua_bounds_mirror_the_python_ones(self) -> None:
        """_common.lua's TIMING_BUCKETS_MS lists the same bounds as scheduler.keys."""
        text = (REPO_ROOT / "scheduler" / "lua" / "_common.lua").read_text()
        found = re.search(r"local TIMING_BUCKETS_MS = \{([^}]*)\}", text)
        assert found is not None
        assert tuple(int(v) for v in found.group(1).replace("\n", " ").split(",")) == (
            TIMING_BUCKETS_MS
        )

    def test_a_bound_belongs_to_its_own_bucket_and_past_the_last_is_inf(self) -> None:
        """le semantics: 5 ms is in the 5 ms bucket, 6 ms in the next; beyond the last, +Inf."""
        assert bucket_of(0) == 1
        assert bucket_of(5) == 1
        assert bucket_of(6) == 2
        assert bucket_of(TIMING_BUCKETS_MS[-1] + 1) == len(BUCKET_BOUNDS_S)
        assert math.isinf(BUCKET_BOUNDS_S[-1])


class TestHistogram:
    def test_cumulative_counts_end_with_the_total(self) -> None:
        """Per-bucket counts accumulate; the +Inf bucket holds every observation."""
        counts = [0] * len(BUCKET_BOUNDS_S)
        counts[0], counts[3], counts[-1] = 2, 1, 1
        cumulative = Histogram(tuple(counts), 1.0).cumulative()
        assert cumulative[0] == (0.005, 2)
        assert cumulative[3] == (0.05, 3)
        assert cumulative[-1] == (math.inf, 4)

    def test_quantiles_interpolate_within_the_bucket(self) -> None:
        """Ten observations in (25, 50] ms: the median is halfway, 37.5 ms, as
        histogram_quantile would say; an empty histogram has none."""
        counts = [0] * len(BUCKET_BOUNDS_S)
        counts[3] = 10
        h = Histogram(tuple(counts), 0.4)
        assert h.quantile(0.5) == pytest.approx(0.0375)
        assert h.quantile(1.0) == pytest.approx(0.05)
        assert h.mean_s == pytest.approx(0.04)
        assert Histogram().quantile(0.5) is None

    def test_a_quantile_in_the_inf_bucket_is_the_last_bound(self) -> None:
        """Beyond the last finite bound nothing is known but that bound."""
        counts = [0] * len(BUCKET_BOUNDS_S)
        counts[-1] = 3
        assert Histogram(tuple(counts)).quantile(0.5) == BUCKET_BOUNDS_S[-2]


class TestParsing:
    def test_garbage_counters_read_as_zero(self) -> None:
        """A field that is not a whole number counts nothing; an SLO that is not one is none."""
        t = QueueTimings.parse(
            {"j1": "3", "j2": "x", "js": "-5", "sn": "2", "sm": "1e3", "slo_ms": "?"}
        )
        assert t.jct.counts[:2] == (3, 0)
        assert t.jct.sum_s == 0
        assert (t.slo_judged, t.slo_met, t.slo_s) == (2, 0, None)

    def test_tenant_fields_pair_up(self) -> None:
        """'c:' and 's:' fields of one tenant make its usage; a tenant name may hold ':'."""
        usage = parse_tenants({"c:a": "2", "s:a": "1500", "c:b:x": "1", "junk": "9"})
        assert usage["a"].completed == 2
        assert usage["a"].leased_s == 1.5
        assert usage["b:x"].completed == 1
        assert set(usage) == {"a", "b:x"}


def test_the_lua_field_names_cover_every_bucket() -> None:
    """_common.lua's constant field-name tables name exactly one field per bucket, +Inf included."""
    text = (REPO_ROOT / "scheduler" / "lua" / "_common.lua").read_text()
    for prefix, table in (("j", "JCT_FIELD"), ("w", "WAIT_FIELD")):
        found = re.search(rf"local {table} = \{{([^}}]*)\}}", text)
        assert found is not None
        names = [v.strip().strip("'") for v in found.group(1).replace("\n", " ").split(",")]
        assert names == [f"{prefix}{i}" for i in range(1, len(BUCKET_BOUNDS_S) + 1)]
