"""The metric families of a snapshot: names, types and labels as docs/operations.md lists them,
and the Grafana dashboard in deploy/ uses only metrics that exist."""

from __future__ import annotations

import json
import re

from scheduler.service.decisions import DecisionTotals
from scheduler.service.health import RoleHealth
from scheduler.service.metrics import families
from scheduler.service.snapshot import QueueCounts, Snapshot
from scheduler.service.views import PublishedQueue, PublishedState
from scheduler.store import QueueStats, StoreStats
from scheduler.timings import QueueTimings, TenantUsage
from tests.conftest import REPO_ROOT


def _snapshot() -> Snapshot:
    stats = StoreStats(1, 2, {"q": QueueStats("q", 3, 1.5, 1, 0, 10, 6, 1)})
    published = PublishedState(
        t_s=100.0, policy="p", queues={"q": PublishedQueue(workers=2, ready=2, busy=1)}
    )
    role = RoleHealth(
        role="controller",
        name="c/controller",
        process="h:1",
        leading=True,
        published_s=100.0,
        last_progress_s=99.0,
        election_progress_s=99.5,
        stall_after_s=15.0,
        figures={"last_tick_s": 0.01},
    )
    router = RoleHealth(
        role="router",
        name="c/router",
        process="h:1",
        leading=True,
        published_s=100.0,
        last_progress_s=99.0,
        election_progress_s=99.5,
        stall_after_s=15.0,
        figures={"routed_total": 5.0, "lag_jobs": 0.0, "lag_s": 0.0},
    )
    return Snapshot(
        namespace="ns",
        taken_s=100.0,
        budget=4,
        stats=stats,
        counts={"q": QueueCounts(retried=1, dead_lettered=0, rejected=2)},
        timings={"q": QueueTimings(slo_judged=4, slo_met=3, slo_s=1.0)},
        published=published,
        leaders={"router": True, "controller": True},
        roles=[role, router],
        decisions=[],
        decision_totals=DecisionTotals(5, 2, 0, {"bounds": 1}),
        tenants={"acme": TenantUsage(3, 1.5)},
    )


def _samples() -> dict[str, tuple[str, set[str]]]:
    """Sample name -> (family type, label names)."""
    out = {}
    for family in families(_snapshot()):
        for s in family.samples:
            out[s.name] = (family.type, set(s.labels))
    return out


class TestFamilies:
    def test_every_family_has_the_namespace_label_and_the_documented_type(self) -> None:
        """A sample of each kind, with its labels; counters end in _total, histograms have
        buckets, and every family is labelled with its namespace."""
        samples = _samples()
        assert all("namespace" in labels for _, labels in samples.values())
        assert samples["bilevel_queue_depth"] == ("gauge", {"namespace", "queue"})
        assert samples["bilevel_jobs_arrived_total"][0] == "counter"
        assert samples["bilevel_jobs_rejected_total"] == ("counter", {"namespace", "queue"})
        assert samples["bilevel_jct_seconds_bucket"] == ("histogram", {"namespace", "queue", "le"})
        assert samples["bilevel_workers"] == ("gauge", {"namespace", "queue", "state"})
        assert samples["bilevel_role_state"] == ("gauge", {"namespace", "role", "host", "state"})
        assert samples["bilevel_tenant_jobs_completed_total"][1] == {"namespace", "tenant"}
        assert samples["bilevel_guardrail_interventions_total"][1] == {"namespace", "guardrail"}

    def test_values_come_from_the_snapshot(self) -> None:
        """SLO attainment is met / judged; workers by state come from the published state."""
        values = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for f in families(_snapshot())
            for s in f.samples
        }
        ns = ("namespace", "ns")
        assert values[("bilevel_slo_attainment_ratio", (ns, ("queue", "q")))] == 0.75
        assert values[("bilevel_workers", (ns, ("queue", "q"), ("state", "busy")))] == 1
        assert values[("bilevel_jobs_rejected_total", (ns, ("queue", "q")))] == 2
        assert values[("bilevel_router_routed_total", (("host", "c/router"), ns))] == 5

    def test_every_metric_is_documented(self) -> None:
        """docs/operations.md names every family the exporter serves."""
        doc = (REPO_ROOT / "docs" / "operations.md").read_text()
        names = {f.name for f in families(_snapshot())}
        undocumented = sorted(n for n in names if f"`{n}`" not in doc and f"`{n}_total`" not in doc)
        assert undocumented == []

    def test_the_grafana_dashboard_uses_only_served_metrics(self) -> None:
        """Every bilevel_* name in deploy/grafana's queries is a sample the exporter serves."""
        dash = json.loads((REPO_ROOT / "deploy" / "grafana" / "bilevel-dashboard.json").read_text())
        exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
        used = {m for e in exprs for m in re.findall(r"\bbilevel_\w+", e)}
        assert used
        assert sorted(used - set(_samples())) == []
