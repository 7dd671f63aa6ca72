"""The learned allocator and router: equivariance, any queue count, legal moves, consistent log-probs."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
import torch

from policies.features import N_QUEUE_FEATURES, queue_features
from policies.guardrails import Guardrails, invalid_reason
from policies.learned.allocator import (
    STOP,
    UNUSED,
    LearnedAllocator,
    gate_log_prob,
    moves_log_prob,
)
from policies.learned.networks import AllocatorNetConfig, BaseSpec, QueueSetNet, QueueSetNetNp
from policies.learned.policy import LearnedPolicy
from policies.registry import make_allocator
from policies.sim.scenario import make_router_for, parse_scenario, prepare
from policies.views import AllocationBounds, ClusterView, JobView, QueueView

# Two queues whose loads swap halfway, so a switch-aware heuristic has moves to make.
_SIM_SCENARIO: dict[str, Any] = {
    "name": "swap",
    "queues": [
        {"name": "a", "job_types": ["a"], "service": {"kind": "exponential", "mean_s": 0.5},
         "model_load_s": 2.0},
        {"name": "b", "job_types": ["b"], "service": {"kind": "exponential", "mean_s": 0.5},
         "model_load_s": 2.0},
    ],
    "allocation": {"policy": "proportional", "tick_s": 1.0, "budget": 6},
    "workload": {"generators": [
        {"kind": "mmpp", "mix": {"a": 1}, "states": [
            {"rate_per_s": 8.0, "mean_sojourn_s": 20.0}, {"rate_per_s": 1.0, "mean_sojourn_s": 20.0}]},
        {"kind": "poisson", "rate_per_s": 2.0, "mix": {"b": 1}},
    ]},
    "duration_s": 120.0,
}  # fmt: skip


def _view(n: int, seed: int = 0, budget: int | None = None) -> ClusterView:
    rng = np.random.default_rng(seed)
    queues = tuple(
        QueueView(
            name=f"q{i}",
            job_types=frozenset({f"t{i}", "shared"}),
            depth=int(rng.integers(0, 30)),
            backlog_s=float(rng.uniform(0, 20)),
            oldest_wait_s=float(rng.uniform(0, 10)),
            arrival_rate_per_s=float(rng.uniform(0, 5)),
            service_time_s=float(rng.uniform(0.1, 2)),
            workers_ready=int(rng.integers(0, 4)),
            workers_busy=0,
            workers_loading=int(rng.integers(0, 2)),
            model_load_s=float(rng.uniform(0, 30)),
            slo_s=None if i % 3 == 0 else float(rng.uniform(1, 10)),
        )
        for i in range(n)
    )
    used = sum(q.allocated for q in queues)
    return ClusterView(
        now_s=10.0, tick_s=1.0, budget=used + 3 if budget is None else budget, queues=queues
    )


def _permuted(view: ClusterView, order: np.ndarray) -> ClusterView:
    return ClusterView(view.now_s, view.tick_s, view.budget, tuple(view.queues[i] for i in order))


def _trained_like_policy(seed: int = 0) -> LearnedPolicy:
    """A policy whose outputs are far from the near-uniform initialisation, so tests see real moves."""
    policy = LearnedPolicy.create(seed=seed)
    with torch.no_grad():
        for p in policy.allocator_net.parameters():
            p.mul_(8.0)
        policy.allocator_net.global_head.bias[0] = -1.0  # rarely stop
    return policy


# --- equivariance -----------------------------------------------------------------------------------


def test_network_outputs_permute_with_the_queues() -> None:
    """Permuting the queues permutes the per-queue logits; the global outputs do not change."""
    net = QueueSetNet()
    features = torch.randn(2, 9, N_QUEUE_FEATURES)
    order = torch.randperm(9)
    out = net(features)
    out_p = net(features[:, order])
    torch.testing.assert_close(out_p.receiver_logits, out.receiver_logits[:, order])
    torch.testing.assert_close(out_p.donor_logits, out.donor_logits[:, order])
    torch.testing.assert_close(out_p.stop_logit, out.stop_logit)
    torch.testing.assert_close(out_p.pool_logit, out.pool_logit)


def test_numpy_forward_matches_torch() -> None:
    """The numpy decision path computes the torch network's logits (to float32 rounding)."""
    net = _trained_like_policy().allocator_net
    features = queue_features(_view(13, seed=4))
    with torch.no_grad():
        ref = net(torch.from_numpy(features)[None])
    fast = QueueSetNetNp(net)(features)
    np.testing.assert_allclose(fast.receiver_logits, ref.receiver_logits[0].detach(), atol=1e-4)
    np.testing.assert_allclose(fast.donor_logits, ref.donor_logits[0].detach(), atol=1e-4)
    assert fast.stop_logit == pytest.approx(float(ref.stop_logit[0]), abs=1e-4)
    assert fast.stop_slope == pytest.approx(float(ref.stop_slope[0]), abs=1e-4)


def test_allocator_is_equivariant() -> None:
    """The deterministic allocation of a permuted view is the same {queue: workers} mapping.

    Random features make exact ties (where argmax order would matter) vanishingly unlikely.
    """
    policy = _trained_like_policy(seed=1)
    view = _view(7, seed=2)
    order = np.random.default_rng(0).permutation(7)
    a = policy.allocator().allocate(view)
    b = policy.allocator().allocate(_permuted(view, order))
    assert a == b
    assert a != view.allocation()  # the test is only meaningful if something moved


# --- any number of queues ---------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 7, 200])
def test_any_queue_count_gives_a_valid_allocation(n: int) -> None:
    """One set of weights serves 1, 7 and 200 queues; allocations are valid and conserve workers."""
    policy = _trained_like_policy()
    view = _view(n, seed=n)
    for rng in (None, np.random.default_rng(n)):
        allocation = policy.allocator(rng=rng).allocate(view)
        assert invalid_reason(allocation, view) is None
        moved_in = sum(max(allocation[q.name] - q.allocated, 0) for q in view.queues)
        assert moved_in <= policy.max_moves
        assert sum(allocation.values()) <= view.budget


def test_moves_respect_bounds_and_never_both_give_and_take() -> None:
    """Masks: no queue below its min or above its max; no queue gains and loses in one tick."""
    policy = _trained_like_policy(seed=3)
    view = _view(10, seed=5)
    bounds = AllocationBounds(default_min=1, default_max=4)
    for seed in range(20):
        allocator = policy.allocator(bounds=bounds, rng=np.random.default_rng(seed), record=True)
        allocator.allocate(view)
        decision = allocator.decisions[-1]
        moves = decision.moves
        taken = moves[moves[:, 0] >= 0]
        receivers = set(taken[:, 0].tolist())
        donors = set(taken[:, 1].tolist())
        assert not receivers & donors
        counts = decision.counts.copy()
        for r, d in taken.tolist():
            counts[r] += 1
            if d < len(counts):
                counts[d] -= 1
                assert counts[d] >= min(1, decision.counts[d])
            assert counts[r] <= 4
        # After a stop (or the last step) nothing else was recorded.
        codes = moves[:, 0].tolist()
        if STOP in codes:
            assert all(c == UNUSED for c in codes[codes.index(STOP) + 1 :])


def test_guardrails_wrap_the_learned_allocator() -> None:
    """Under guardrails a broken network falls back to the heuristic instead of failing."""
    policy = LearnedPolicy.create(seed=0)
    with torch.no_grad():
        for p in policy.allocator_net.parameters():
            p.fill_(float("nan"))
    guarded = Guardrails(policy.allocator())
    view = _view(4)
    allocation = guarded.allocate(view)
    assert invalid_reason(allocation, view) is None
    assert guarded.last_fallback_reason is not None
    assert "non-finite" in guarded.last_fallback_reason


def _rescore(policy: LearnedPolicy, ds: list[Any]) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """The network's outputs on recorded ticks, and the moves' log-probabilities and entropies as
    the training update recomputes them."""
    out = policy.allocator_net(torch.from_numpy(np.stack([d.features for d in ds])))
    log_prob, entropy = moves_log_prob(
        out,
        torch.from_numpy(np.stack([d.counts for d in ds])),
        torch.tensor([d.free for d in ds]),
        torch.from_numpy(np.stack([d.low for d in ds])),
        torch.from_numpy(np.stack([d.high for d in ds])),
        torch.from_numpy(np.stack([d.moves for d in ds])),
    )
    return out, log_prob, entropy


def test_recorded_log_probs_match_the_batched_recomputation() -> None:
    """The training update re-scores recorded ticks to the log-probability they were sampled with."""
    policy = _trained_like_policy(seed=6)
    allocator = policy.allocator(rng=np.random.default_rng(1), record=True)
    for seed in range(12):
        allocator.allocate(_view(6, seed=seed, budget=40))
    ds = allocator.decisions
    _, log_prob, entropy = _rescore(policy, ds)
    np.testing.assert_allclose(
        log_prob.detach().numpy(), [d.log_prob for d in ds], rtol=1e-4, atol=1e-4
    )
    assert torch.isfinite(entropy).all()
    assert any((d.moves[:, 0] >= 0).any() for d in ds)


# --- router ---------------------------------------------------------------------------------------------


def test_router_picks_eligible_queues_and_skips_single_choices() -> None:
    """Jobs go only to eligible queues; a type with one eligible queue is not scored (not recorded)."""
    policy = LearnedPolicy.create(seed=0)
    view = _view(5)
    router = policy.router(rng=np.random.default_rng(0), record=True)
    jobs = [JobView(job_id=str(i), job_type="shared", arrival_s=0.0) for i in range(6)]
    jobs.append(JobView(job_id="solo", job_type="t2", arrival_s=0.0))
    decisions = router.route_batch(jobs, view.queues, np.random.default_rng(1))
    names = {q.name for q in view.queues}
    assert all(d in names for d in decisions[:6])
    assert decisions[6] == "q2"
    assert len(router.choices) == 6


def test_router_scores_are_permutation_invariant() -> None:
    """The greedy router picks the same queue whatever the order the queues are listed in."""
    policy = LearnedPolicy.create(seed=2)
    with torch.no_grad():
        for p in policy.router_net.parameters():
            p.mul_(8.0)
    view = _view(6, seed=9)
    job = JobView(job_id="j", job_type="shared", arrival_s=0.0, size_estimate_s=1.0)
    first = policy.router().route_batch([job], view.queues, np.random.default_rng(0))
    reordered = _permuted(view, np.arange(6)[::-1])
    second = policy.router().route_batch([job], reordered.queues, np.random.default_rng(0))
    assert first == second


def test_greedy_router_breaks_ties_at_random() -> None:
    """Two idle identical queues score the same; jobs routed one at a time split between them
    (Binomial(1000, 1/2): within five standard deviations), not all onto the first."""
    router = LearnedPolicy.create(seed=0).router()
    queues = tuple(
        QueueView(
            name=name,
            job_types=frozenset({"llm"}),
            depth=0,
            backlog_s=0.0,
            oldest_wait_s=0.0,
            arrival_rate_per_s=3.0,
            service_time_s=1.0,
            workers_ready=4,
            workers_busy=0,
            workers_loading=0,
            model_load_s=30.0,
            slo_s=10.0,
        )
        for name in ("a", "b")
    )
    rng = np.random.default_rng(0)
    picks = [
        router.route_batch([JobView(job_id=str(i), job_type="llm", arrival_s=0.0)], queues, rng)[0]
        for i in range(1000)
    ]
    assert abs(picks.count("a") - 500) <= 79


# --- residual over base heuristics ----------------------------------------------------------------

_BASES: list[BaseSpec] = [
    ("switch_aware", {"horizon_s": 20.0}),
    ("proportional", {"beta": 1.0}),
]


def _residual_policy(seed: int = 0) -> LearnedPolicy:
    return LearnedPolicy.create(AllocatorNetConfig.residual(_BASES), max_moves=2, seed=seed)


def test_untrained_residual_allocator_is_its_first_base_heuristic() -> None:
    """Deterministic and untrained, the residual allocator returns exactly the first base's
    allocation, tick after tick of a simulated run."""
    scenario = parse_scenario(_SIM_SCENARIO)
    policy = _residual_policy()
    run = prepare(scenario, 3).start(make_router_for(scenario))
    learned = policy.allocator()
    heuristic = make_allocator(_BASES[0][0], **_BASES[0][1])
    moved = 0
    while (view := run.advance_to_next_tick()) is not None:
        expected = heuristic.allocate(view)
        assert learned.allocate(view) == expected
        moved += run.apply(expected)
    assert moved > 0  # the heuristic did act, so the equality is not only "hold"


def test_residual_network_outputs_permute_with_the_queues() -> None:
    """With base features and gate logits, the network is still permutation-equivariant."""
    net = _residual_policy().allocator_net
    features = torch.randn(2, 9, net.config.n_features)
    order = torch.randperm(9)
    out, out_p = net(features), net(features[:, order])
    torch.testing.assert_close(out_p.receiver_logits, out.receiver_logits[:, order])
    torch.testing.assert_close(out_p.donor_logits, out.donor_logits[:, order])
    torch.testing.assert_close(out_p.gate_logits, out.gate_logits)
    torch.testing.assert_close(out_p.stop_logit, out.stop_logit)


def test_residual_stop_chance_does_not_depend_on_the_queue_count() -> None:
    """The log(n) stop offset keeps a fresh residual allocator's chance of leaving the proposal
    alone the same at 3 and at 200 queues."""
    net = _residual_policy().allocator_net
    with torch.no_grad():
        chances = []
        for n in (3, 200):
            out = net(torch.zeros(1, n, net.config.n_features))
            step = torch.cat([out.receiver_logits[0], out.stop_logit])
            chances.append(float(torch.softmax(step, 0)[-1]))
    assert chances[0] == pytest.approx(chances[1], abs=0.02)
    assert chances[0] > 0.8


def test_residual_log_probs_include_the_gate() -> None:
    """Recorded log-probabilities (gate pick plus moves) match the batched recomputation, and the
    gate does pick other bases when sampling."""
    policy = _residual_policy(seed=2)
    with torch.no_grad():
        for p in policy.allocator_net.parameters():
            p.mul_(8.0)
        policy.allocator_net.global_head.bias[0] = -1.0  # rarely stop
        policy.allocator_net.global_head.bias[3:] = 0.0  # no base favoured
    allocator = policy.allocator(rng=np.random.default_rng(1), record=True)
    for seed in range(16):
        allocation = allocator.allocate(_view(6, seed=seed, budget=40))
        assert invalid_reason(allocation, _view(6, seed=seed, budget=40)) is None
    ds = allocator.decisions
    out, moves_lp, _ = _rescore(policy, ds)
    gate_lp, gate_entropy = gate_log_prob(out.gate_logits, torch.tensor([d.base for d in ds]))
    np.testing.assert_allclose(
        (gate_lp + moves_lp).detach().numpy(), [d.log_prob for d in ds], rtol=1e-4, atol=1e-4
    )
    assert (gate_entropy > 0).all()
    assert len({d.base for d in ds}) > 1
    torch.autograd.backward(gate_lp.sum())  # the update reaches the gate's weights
    gate_grad = policy.allocator_net.global_head.bias.grad
    assert gate_grad is not None
    assert bool((gate_grad[3:] != 0).all())


def test_residual_config_round_trips_through_json_and_checks_its_input_width() -> None:
    """Bases survive hyper-parameters -> JSON -> a rebuilt network; a wrong width is refused."""
    policy = _residual_policy()
    params = json.loads(json.dumps(policy.hyperparameters()))
    rebuilt = LearnedPolicy.from_hyperparameters(params)
    assert rebuilt.allocator_net.config == policy.allocator_net.config
    with pytest.raises(ValueError, match="n_features"):
        AllocatorNetConfig(bases=tuple(_BASES))
    with pytest.raises(ValueError, match="base heuristics"):
        LearnedAllocator(policy.allocator_net)


class _CountingStatic:
    """Equal shares, counting how often it is asked."""

    name = "counting"

    def __init__(self) -> None:
        self.calls = 0
        self.inner = make_allocator("static")

    def allocate(self, view: ClusterView) -> dict[str, int]:
        self.calls += 1
        return self.inner.allocate(view)


def test_only_the_picked_base_runs_each_tick() -> None:
    """The gate reads the queue features alone, so one base heuristic runs per tick, not all."""
    policy = _residual_policy()
    bases = [_CountingStatic(), _CountingStatic()]
    allocator = LearnedAllocator(policy.allocator_net, bases=bases, rng=np.random.default_rng(0))
    for seed in range(20):
        allocator.allocate(_view(5, seed=seed))
    assert bases[0].calls + bases[1].calls == 20
    assert bases[1].calls > 0  # sampling did pick the second base too


def test_residual_numpy_forward_matches_torch() -> None:
    """With the base columns, the two-stage numpy path gives the torch network's outputs."""
    net = _residual_policy(seed=3).allocator_net
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(8.0)
    features = np.random.default_rng(0).normal(size=(7, net.config.n_features)).astype(np.float32)
    with torch.no_grad():
        ref = net(torch.from_numpy(features)[None])
    fast = QueueSetNetNp(net)(features)
    np.testing.assert_allclose(fast.receiver_logits, ref.receiver_logits[0], atol=1e-4)
    np.testing.assert_allclose(fast.gate_logits, ref.gate_logits[0], atol=1e-4)
    assert fast.stop_logit == pytest.approx(float(ref.stop_logit[0]), abs=1e-4)
