"""What the demo prints about level 2: one line per allocation change with its reason, and per
load phase whether the burst's queue got workers and how its jobs fared."""

from __future__ import annotations

import math
from typing import Any

from scheduler.commands.demo import PHASES, Outcomes, Sent, change_lines, demo_config, phase_reports

T0_S = 1000.0


def _entry(t_s: float, workers: dict[str, int], **why: Any) -> dict[str, Any]:
    return {"t_s": T0_S + t_s, "workers": workers, **why}


HISTORY = [
    _entry(0.5, {"embeddings": 2, "classifier": 1, "generator": 1}, policy="switch_aware"),
    _entry(
        12.0,
        {"embeddings": 1, "classifier": 1, "generator": 2},
        policy="switch_aware",
        proposal={"embeddings": 0, "classifier": 1, "generator": 3},
        constraints=["bounds", "move_cap"],
        inputs={
            "generator": {"depth": 9, "rate_per_s": 4.0, "oldest_wait_s": 2.5, "service_s": 0.1}
        },
    ),
    _entry(13.0, {"embeddings": 1, "classifier": 1, "generator": 2}, policy="switch_aware"),
    _entry(
        23.0,
        {"embeddings": 1, "classifier": 2, "generator": 1},
        policy="learned",
        fallback="learned: raised ValueError: boom",
    ),
]


def test_each_change_is_one_line_with_who_gained_who_lost_and_why() -> None:
    """Queues that changed, with counts and signs; what the gaining queue showed; the guardrails
    that trimmed the proposal; the fallback when there was one. Unchanged entries print nothing."""
    lines = change_lines(HISTORY, T0_S)
    assert len(lines) == 3
    assert lines[0].startswith("   0.5 s  embeddings 0->2 (+2), classifier 0->1 (+1)")
    assert lines[1] == (
        "  12.0 s  embeddings 2->1 (-1), generator 1->2 (+1)  [switch_aware] generator: 9 "
        "waiting, 4.0/s arriving, oldest 2.5 s; proposed embeddings=0 generator=3, trimmed by "
        "bounds, move_cap"
    )
    assert "classifier 1->2 (+1), generator 2->1 (-1)  [learned]" in lines[2]
    assert lines[2].endswith("fallback: learned: raised ValueError: boom")


def _sent(job_type: str, sent_s: float) -> Sent:
    return Sent(job_type, handle=None, sent_s=sent_s)  # type: ignore[arg-type]


def test_each_phase_reports_when_its_queue_got_more_workers_and_its_p99() -> None:
    """The generation burst's queue got a second worker 2 s in; the classification burst's 3 s
    in; the embeddings burst started with two and never got more."""
    sent = [_sent("embed", 1.0), _sent("generate", 11.0), _sent("generate", 12.0)]
    sent += [_sent("classify", 21.0), _sent("classify", 25.0)]
    out = Outcomes(sent_order=sent, jct_by_sent=[0.2, 3.0, 1.0, 0.5, math.nan])
    slo = {q.name: q.slo_s for q in demo_config().queues}
    reports = phase_reports(HISTORY, T0_S, 10.0, sent, out, slo)
    assert [r.name for r in reports] == [name for name, _ in PHASES]
    embed, generate, classify = reports
    assert (embed.queue, embed.workers_at_start, embed.workers_max) == ("embeddings", 0, 2)
    assert embed.more_workers_after_s == 0.5
    assert (generate.queue, generate.workers_at_start, generate.workers_max) == ("generator", 1, 2)
    assert generate.more_workers_after_s == 2.0
    assert generate.jobs == 2
    assert generate.p99_jct_s == np_percentile([3.0, 1.0], 99)
    assert (classify.workers_at_start, classify.more_workers_after_s) == (1, 3.0)
    assert classify.jobs == 2
    assert classify.p99_jct_s == 0.5
    assert classify.slo_s == 1.0


def np_percentile(values: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(values, q))


def test_the_demo_runs_a_shadow_beside_its_acting_policy() -> None:
    """Either way round, the demo's config has the other allocator in shadow."""
    assert demo_config().allocation.policy == "learned"
    assert demo_config("switch_aware").allocation.shadow == "learned"
    assert demo_config("learned").allocation.shadow == "switch_aware"
