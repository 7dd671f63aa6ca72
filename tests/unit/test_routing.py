"""Level 1 routers: eligibility, rejections, load-aware choice with batch accounting, rng use."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import pytest

from policies.registry import ROUTERS, make_router
from policies.routing import (
    NO_WORKER_WAIT_S,
    EligibilityIndex,
    PowerOfTwoRouter,
    RandomRouter,
    RuleRouter,
    ShortestExpectedWaitRouter,
    eligible_indices,
    expected_wait_s,
    is_eligible,
)
from policies.views import JobView, QueueView, Rejection


def _queue(
    name: str, types: str = "llm", tags: frozenset[str] = frozenset(), **kw: Any
) -> QueueView:
    return QueueView(
        name=name,
        job_types=frozenset(types.split(",")),
        required_tags=tags,
        **kw,
    )


def _job(
    job_id: str = "j",
    job_type: str = "llm",
    tags: frozenset[str] = frozenset(),
    size_s: float = 0.0,
) -> JobView:
    return JobView(
        job_id=job_id, job_type=job_type, arrival_s=0.0, tags=tags, size_estimate_s=size_s
    )


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


# Jobs routed one at a time onto two equal queues: each goes to the first with probability 1/2, so
# the first's count is Binomial(1000, 1/2), standard deviation 15.8. Five of those either side
# fail a fair router with probability below 1e-6; the old first-queue tie-break got all 1000.
TIE_JOBS = 1000
TIE_SLACK = 79


def _split_of_single_jobs(router: Any, queues: list[QueueView], seed: int) -> Counter[str]:
    """Where TIE_JOBS jobs go when each is routed alone onto the same (idle) queues."""
    rng = _rng(seed)
    return Counter(router.route_batch([_job(f"j{i}")], queues, rng)[0] for i in range(TIE_JOBS))


class TestEligibility:
    def test_type_and_tags_decide(self) -> None:
        """A queue is eligible when it accepts the type and the job carries all required tags."""
        gpu = _queue("gpu", tags=frozenset({"gpu"}))
        assert is_eligible(_job(tags=frozenset({"gpu", "eu"})), gpu)
        assert not is_eligible(_job(tags=frozenset({"eu"})), gpu)
        assert not is_eligible(_job(job_type="asr", tags=frozenset({"gpu"})), gpu)
        assert is_eligible(_job(), _queue("any"))

    def test_indices_in_queue_order(self) -> None:
        """Eligible indices come in queue order and skip the others."""
        queues = [_queue("a", "asr"), _queue("b"), _queue("c", "llm,asr")]
        assert eligible_indices(_job(), queues) == [1, 2]

    def test_the_index_finds_what_the_scan_finds(self) -> None:
        """Over random queues and jobs (types, required tags, carried tags), the index gives the
        scan's indices in the scan's order."""
        rng = _rng(19)
        tags = ["a", "b", "c", "d"]

        def some_tags() -> frozenset[str]:
            return frozenset(t for t in tags if rng.random() < 0.3)

        for _ in range(50):
            queues = [
                _queue(f"q{i}", str(rng.choice(["llm", "asr", "llm,asr"])), some_tags())
                for i in range(int(rng.integers(1, 12)))
            ]
            index = EligibilityIndex(queues)
            for _ in range(20):
                job = _job(job_type=str(rng.choice(["llm", "asr", "ocr"])), tags=some_tags())
                assert index.eligible(job) == eligible_indices(job, queues)

    def test_rejection_names_type_tags_and_accepting_queues(self) -> None:
        """The rejection reason names the job's type and tags and says what each queue accepts."""
        queues = [_queue("asr-q", "asr"), _queue("gpu-q", "llm", frozenset({"gpu"}))]
        [decision] = RuleRouter().route_batch([_job("j7", tags=frozenset({"eu"}))], queues, _rng())
        assert isinstance(decision, Rejection)
        assert "'j7'" in decision.reason
        assert "'llm'" in decision.reason
        assert "eu" in decision.reason
        assert "gpu-q (types: llm; requires tags: gpu)" in decision.reason
        assert "asr-q (types: asr)" in decision.reason
        # The queue accepting the type is listed first: it is the likeliest fix.
        assert decision.reason.index("gpu-q") < decision.reason.index("asr-q")

    def test_rejection_without_queues(self) -> None:
        """With no queues at all the reason says so."""
        [decision] = RuleRouter().route_batch([_job()], [], _rng())
        assert isinstance(decision, Rejection)
        assert "there are no queues" in decision.reason

    def test_long_queue_lists_are_truncated(self) -> None:
        """A rejection lists a few queues and counts the rest instead of listing hundreds."""
        queues = [_queue(f"q{i}", "asr") for i in range(50)]
        [decision] = RuleRouter().route_batch([_job()], queues, _rng())
        assert isinstance(decision, Rejection)
        assert "and 42 more" in decision.reason
        assert "q49" not in decision.reason

    @pytest.mark.parametrize("name", sorted(ROUTERS))
    def test_every_router_rejects_identically(self, name: str) -> None:
        """All routers share eligibility, so they reject the same jobs with the same reason."""
        queues = [_queue("a", "asr"), _queue("b", "llm", frozenset({"gpu"}))]
        jobs = [_job("x"), _job("y", tags=frozenset({"gpu"})), _job("z", "ocr")]
        expected = RuleRouter().route_batch(jobs, queues, _rng())
        got = make_router(name).route_batch(jobs, queues, _rng())
        assert got == expected
        assert got[1] == "b"


class TestRuleRouter:
    def test_single_eligible_queue(self) -> None:
        """One eligible queue takes the job."""
        queues = [_queue("a", "asr"), _queue("b")]
        assert RuleRouter().route_batch([_job()], queues, _rng()) == ["b"]

    def test_first_eligible_by_default(self) -> None:
        """Several eligible queues: the first in queue order, every time."""
        queues = [_queue("a", "asr"), _queue("b"), _queue("c")]
        assert RuleRouter().route_batch([_job()] * 3, queues, _rng()) == ["b", "b", "b"]

    def test_round_robin_rotates_per_type(self) -> None:
        """round_robin cycles over the eligible queues of each job type, across batches."""
        queues = [_queue("a", "llm,asr"), _queue("b", "llm,asr")]
        router = RuleRouter(tie_break="round_robin")
        first = router.route_batch([_job(), _job(), _job(job_type="asr")], queues, _rng())
        second = router.route_batch([_job()], queues, _rng())
        assert first == ["a", "b", "a"]
        assert second == ["a"]

    def test_random_tie_break_uses_rng(self) -> None:
        """random draws with the given rng: same seed, same picks; both queues get used."""
        queues = [_queue("a"), _queue("b")]
        router = RuleRouter(tie_break="random")
        one = router.route_batch([_job()] * 40, queues, _rng(3))
        two = router.route_batch([_job()] * 40, queues, _rng(3))
        assert one == two
        assert set(one) == {"a", "b"}

    def test_unknown_tie_break(self) -> None:
        """An unknown tie_break is refused with the accepted values."""
        with pytest.raises(ValueError, match="round_robin"):
            RuleRouter(tie_break="best")  # type: ignore[arg-type]


class TestExpectedWait:
    def test_ready_workers_share_the_work(self) -> None:
        """Backlog plus half a service per busy worker, shared by the ready workers."""
        queue = _queue("a", backlog_s=10.0, workers_ready=4, workers_busy=2, service_time_s=2.0)
        assert expected_wait_s(queue) == pytest.approx((10.0 + 2.0) / 4)
        assert expected_wait_s(queue, extra_backlog_s=4.0) == pytest.approx((14.0 + 2.0) / 4)

    def test_loading_only_pays_the_model_load(self) -> None:
        """No ready worker but some loading: the model load comes first."""
        queue = _queue("a", backlog_s=6.0, workers_loading=2, model_load_s=30.0)
        assert expected_wait_s(queue) == pytest.approx(30.0 + 3.0)

    def test_no_worker_is_effectively_infinite(self) -> None:
        """No worker at all: larger than any staffed wait, still ordered by backlog."""
        empty = _queue("a", backlog_s=1.0)
        emptier = _queue("b", backlog_s=0.0)
        assert expected_wait_s(empty) >= NO_WORKER_WAIT_S
        assert expected_wait_s(emptier) < expected_wait_s(empty)


class TestShortestExpectedWait:
    def test_picks_least_wait(self) -> None:
        """The job goes to the eligible queue with the least expected wait."""
        queues = [
            _queue("busy", backlog_s=100.0, workers_ready=1),
            _queue("idle", backlog_s=1.0, workers_ready=1),
            _queue("other", "asr"),
        ]
        assert ShortestExpectedWaitRouter().route_batch([_job()], queues, _rng()) == ["idle"]

    def test_batch_accounting_spreads_a_burst(self) -> None:
        """Jobs routed earlier in the batch count as backlog, so equal queues take turns: each
        two jobs go one to each (which one first is a tie, broken at random)."""
        queues = [_queue("a", workers_ready=1), _queue("b", workers_ready=1)]
        decisions = ShortestExpectedWaitRouter().route_batch(
            [_job(f"j{i}", size_s=5.0) for i in range(6)], queues, _rng()
        )
        assert [set(decisions[i : i + 2]) for i in range(0, 6, 2)] == [{"a", "b"}] * 3

    def test_batch_accounting_weights_by_workers(self) -> None:
        """A queue with three times the workers takes about three times the burst."""
        queues = [_queue("small", workers_ready=1), _queue("big", workers_ready=3)]
        decisions = ShortestExpectedWaitRouter().route_batch([_job()] * 40, queues, _rng())
        counts = Counter(decisions)
        assert counts["big"] == 30
        assert counts["small"] == 10

    def test_forced_jobs_count_toward_backlog(self) -> None:
        """A job with one eligible queue still loads it for the later jobs of the batch."""
        queues = [_queue("shared", "llm,asr", workers_ready=1), _queue("llm-only", workers_ready=1)]
        jobs = [_job("a1", "asr", size_s=50.0), _job("l1", size_s=1.0)]
        assert ShortestExpectedWaitRouter().route_batch(jobs, queues, _rng()) == [
            "shared",
            "llm-only",
        ]

    def test_staffed_queue_beats_unstaffed(self) -> None:
        """A queue with no workers is chosen only when nothing else is eligible."""
        queues = [_queue("none", backlog_s=0.0), _queue("slow", backlog_s=500.0, workers_ready=1)]
        assert ShortestExpectedWaitRouter().route_batch([_job()], queues, _rng()) == ["slow"]

    def test_ties_are_broken_at_random_with_the_rng(self) -> None:
        """Two idle equal queues share jobs routed one at a time (a binomial split, not all on
        the first); three tied queues all get their share; the same seed, the same picks."""
        pair = [_queue("a", workers_ready=2), _queue("b", workers_ready=2)]
        split = _split_of_single_jobs(ShortestExpectedWaitRouter(), pair, seed=0)
        assert abs(split["a"] - TIE_JOBS / 2) <= TIE_SLACK, split
        assert split == _split_of_single_jobs(ShortestExpectedWaitRouter(), pair, seed=0)
        trio = [*pair, _queue("c", workers_ready=2), _queue("slow", backlog_s=9.0)]
        split = _split_of_single_jobs(ShortestExpectedWaitRouter(), trio, seed=1)
        assert set(split) == {"a", "b", "c"}
        assert all(abs(n - TIE_JOBS / 3) <= 75 for n in split.values()), split

    def test_a_tie_never_beats_a_shorter_wait(self) -> None:
        """The random key only orders equal waits: a queue with less wait always wins."""
        queues = [_queue("a", workers_ready=2, backlog_s=0.5), _queue("b", workers_ready=2)]
        assert _split_of_single_jobs(ShortestExpectedWaitRouter(), queues, seed=2) == {
            "b": TIE_JOBS
        }


class TestPowerOfTwo:
    def _queues(self) -> list[QueueView]:
        return [_queue(f"q{i}", workers_ready=1, backlog_s=float(i)) for i in range(8)]

    def test_seeded_determinism(self) -> None:
        """The same seed gives the same decisions; another seed gives other ones."""
        jobs = [_job(f"j{i}") for i in range(50)]
        one = PowerOfTwoRouter().route_batch(jobs, self._queues(), _rng(7))
        two = PowerOfTwoRouter().route_batch(jobs, self._queues(), _rng(7))
        other = PowerOfTwoRouter().route_batch(jobs, self._queues(), _rng(8))
        assert one == two
        assert one != other

    def test_picks_better_of_the_two(self) -> None:
        """With exactly two eligible queues both are sampled, so the less loaded one wins."""
        queues = [
            _queue("loaded", workers_ready=1, backlog_s=100.0),
            _queue("free", workers_ready=1),
        ]
        for seed in range(10):
            assert PowerOfTwoRouter().route_batch([_job()], queues, _rng(seed)) == ["free"]

    def test_never_picks_the_worst(self) -> None:
        """The most loaded queue loses every comparison, so it is never chosen for a single job."""
        picks = {
            PowerOfTwoRouter().route_batch([_job()], self._queues(), _rng(seed))[0]
            for seed in range(200)
        }
        assert "q7" not in picks
        assert len(picks) > 3

    def test_batch_accounting(self) -> None:
        """A burst onto two equal queues alternates, because each pick adds to its backlog."""
        queues = [_queue("a", workers_ready=1), _queue("b", workers_ready=1)]
        decisions = PowerOfTwoRouter().route_batch([_job()] * 10, queues, _rng(1))
        assert Counter(decisions) == {"a": 5, "b": 5}

    def test_ties_go_either_way(self) -> None:
        """The sampled pair keeps its random order, so two idle equal queues share jobs routed
        one at a time (a binomial split); with a shorter wait, that queue always wins."""
        pair = [_queue("a", workers_ready=2), _queue("b", workers_ready=2)]
        split = _split_of_single_jobs(PowerOfTwoRouter(), pair, seed=0)
        assert abs(split["a"] - TIE_JOBS / 2) <= TIE_SLACK, split
        pair[0] = _queue("a", workers_ready=2, backlog_s=0.5)
        assert _split_of_single_jobs(PowerOfTwoRouter(), pair, seed=0) == {"b": TIE_JOBS}


class TestRandomRouter:
    def test_uniform_among_eligible_only(self) -> None:
        """Only eligible queues are picked, all of them, in roughly equal numbers."""
        queues = [_queue("a"), _queue("b", "asr"), _queue("c"), _queue("d")]
        counts = Counter(RandomRouter().route_batch([_job()] * 3000, queues, _rng(5)))
        assert set(counts) == {"a", "c", "d"}
        assert all(900 < n < 1100 for n in counts.values())


class TestRouterRegistry:
    def test_names(self) -> None:
        """The registry knows exactly the documented router names."""
        assert set(ROUTERS) == {"rule", "shortest_wait", "power_of_two", "random"}
        for name in ROUTERS:
            assert make_router(name).name == name

    def test_params_are_passed(self) -> None:
        """Keyword parameters reach the router."""
        router = make_router("rule", tie_break="round_robin")
        assert isinstance(router, RuleRouter)
        assert router.tie_break == "round_robin"

    def test_unknown_name_lists_known(self) -> None:
        """An unknown name fails with the list of known routers."""
        with pytest.raises(ValueError, match="power_of_two, random, rule, shortest_wait"):
            make_router("fastest")

    def test_bad_params(self) -> None:
        """A misspelt parameter names the router."""
        with pytest.raises(ValueError, match="router 'rule'"):
            make_router("rule", tiebreak="first")
