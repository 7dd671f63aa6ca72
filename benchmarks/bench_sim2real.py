"""Simulator against live service on the shipped synthetic scenarios, shrunk to this machine.

Prints one JSON object. Run: `python -m benchmarks.bench_sim2real [--quick] [--speed K]
[--seed N]` (or `make bench`). Starts a local Ray (once) and, per run, an embedded Redis and the
service with synthetic sleeping handlers (scheduler/service/live_replay.py), and stops them.

First the overhead probe measures this machine's live overheads now (scheduler/service/
overheads.py). Then every scenario, shrunk to BUDGET workers at LOAD_SCALE of its utilisation and
cut to its first DURATION_S scenario seconds, is replayed live at K times speed with each policy,
and the simulator predicts the same jobs twice: ideal (no overheads, its own estimators) and
calibrated (the measured defaults of policies/sim/calibration.py and the live service's
estimators). Per run: live vs simulated mean/p50/p99 JCT, SLO attainment, utilisation and
reconfigurations, the relative errors, and whether mean within 10% and p99 within 20%; per
scenario, whether live and calibrated simulation rank the policies alike.

Bounded: the full run replays the 6 synthetic scenarios x 3 policies of 30 s of arrivals each
(with the service's start and stop, about a minute each: 18 to 22 minutes on 2 cores); --quick
replays 2 scenarios x 3 policies of 20 s (about 8 minutes); --only picks scenarios.
--live-models serves every queue with a torch demo model instead (workers/synthetic.py: real
loads, timed first and given to the simulator, and real compute for each job's service time).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import sys
import time
from typing import Any

from benchmarks.common import REPO_ROOT, commit
from policies.sim.calibration import MEASURED, Calibration
from policies.sim.scenario import LIVE_MODELS, Scenario, parse_scenario, prepare
from policies.sim.timescale import shrink
from policies.sim2real import (
    ReplayPlan,
    plan_replay,
    rank,
    rankings_agree,
    real_model_loads,
    relative_errors,
    rescaled,
    within,
)
from scheduler.errors import BilevelError
from scheduler.logs import configure_logging

SCENARIOS = REPO_ROOT / "policies" / "scenarios"

# Workers of the shrunk scenarios, and the share of their utilisation kept: on 4 workers a queue
# has whole workers only, and at the full load steady's chat queue would need exactly one.
BUDGET = 4
# many_queues keeps its sixty queues: on 4 workers nearly all would go unserved, on 8 the policy
# still chooses which few of the long tail get a worker, as on its 128.
BUDGETS = {"many_queues": 8}
LOAD_SCALE = 0.6
FULL = ("steady", "bursty_switch", "heavy_tailed", "diurnal", "replicas", "many_queues")
QUICK = ("steady", "bursty_switch")
POLICIES = ("switch_aware", "proportional", "learned")
# Scenario seconds replayed per run (real time: this / speed).
DURATION_S = {"full": 120.0, "quick": 80.0}
BOUNDS = {"mean_jct_s": 0.10, "p99_jct_s": 0.20}
# Mean JCTs within this (relative) of each other are a tie when rankings are compared: live runs
# of policies that decide alike differ by this much from noise alone.
RANK_TIE = 0.05
# Metrics kept per side in the report.
KEPT = ("jobs", "mean_jct_s", "p50_jct_s", "p99_jct_s", "slo_attainment", "utilization",
        "reconfigurations")  # fmt: skip


def shrunk(name: str, duration_s: float) -> Scenario:
    scenario = parse_scenario((SCENARIOS / f"{name}.yaml").read_text(encoding="utf-8"))
    return shrink(scenario, BUDGETS.get(name, BUDGET), duration_s=duration_s, load_scale=LOAD_SCALE)


def with_live_models(scenario: Scenario) -> Scenario:
    """The scenario with every queue on a torch demo model (the three in turn): the replay's
    workers load real models and compute for each job's service time instead of sleeping."""
    queues = [
        q.model_copy(update={"live_model": LIVE_MODELS[i % len(LIVE_MODELS)]})
        for i, q in enumerate(scenario.queues)
    ]
    return scenario.model_copy(update={"queues": queues})


def _kept(summary: dict[str, Any]) -> dict[str, Any]:
    return {k: summary.get(k) for k in KEPT}


def run_one(plan: ReplayPlan, ideal: ReplayPlan, policy: str, speed: float) -> dict[str, Any]:
    """One live replay and both predictions of it."""
    from scheduler.service.live_replay import replay_service, simulate_plan, submit_and_collect

    started = time.monotonic()
    with replay_service(plan, policy=policy) as service:
        plan = plan.starting_from(service.settled)
        ideal = ideal.starting_from(service.settled)
        outcome = asyncio.run(submit_and_collect(plan, service.settings))
    live_s = time.monotonic() - started
    live = rescaled(outcome.summary, speed)
    sim = rescaled(simulate_plan(plan, policy, None)[1], speed)
    sim_ideal = rescaled(simulate_plan(ideal, policy, None)[1], speed)
    error = relative_errors(sim, live)
    error_ideal = relative_errors(sim_ideal, live)
    return {
        "policy": policy,
        "jobs": plan.arrivals,
        "live": _kept(live) | {"observed_overheads": live["observed_overheads"]},
        "sim": _kept(sim),
        "sim_ideal": _kept(sim_ideal),
        "error": error,
        "error_ideal": error_ideal,
        "within_bounds": within(error, BOUNDS),
        "within_bounds_ideal": within(error_ideal, BOUNDS),
        "wall_s": round(live_s, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 scenarios, shorter runs")
    parser.add_argument("--speed", type=float, default=4.0, help="replay speed K")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--no-probe", action="store_true", help="skip measuring the overheads first"
    )
    parser.add_argument(
        "--only", default=None, help="comma-separated scenarios to run (default: all of the mode)"
    )
    parser.add_argument(
        "--live-models",
        action="store_true",
        help="serve every queue with a real torch demo model (loads and compute) instead of sleeps",
    )
    args = parser.parse_args()
    configure_logging(level="warning")
    from scheduler.service.live_replay import live_estimators
    from scheduler.service.runner import ensure_ray

    mode = "quick" if args.quick else "full"
    names = QUICK if args.quick else FULL
    if args.only:
        names = tuple(n.strip() for n in args.only.split(",") if n.strip())
        unknown = sorted(set(names) - set(FULL))
        if unknown:
            parser.error(f"--only: unknown scenarios {unknown}; known: {', '.join(FULL)}")
    started_ray = ensure_ray(log_to_driver=False)
    report: dict[str, Any] = {
        "benchmark": "sim2real",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": commit(),
        "mode": mode,
        "speed": args.speed,
        "seed": args.seed,
        "budget": BUDGET,
        "budgets": {n: BUDGETS.get(n, BUDGET) for n in names},
        "load_scale": LOAD_SCALE,
        "duration_s": DURATION_S[mode],
        "cpus": os.cpu_count(),
        "loadavg_before": os.getloadavg()[0],
        "calibration": MEASURED.model_dump(),
        "bounds": BOUNDS,
        "rank_tie": RANK_TIE,
        "live_models": args.live_models,
    }
    try:
        if not args.no_probe:
            from scheduler.service.overheads import measure_overheads

            report["overheads_now"] = measure_overheads().to_dict()
        loads_by_model: dict[str, float] = {}
        if args.live_models:
            from workers.synthetic import time_model_loads

            loads_by_model = time_model_loads(LIVE_MODELS)
            report["model_loads_s"] = {m: round(v, 3) for m, v in loads_by_model.items()}
        runs: dict[str, list[dict[str, Any]]] = {}
        rankings: dict[str, Any] = {}
        for name in names:
            scenario = shrunk(name, DURATION_S[mode])
            if args.live_models:
                scenario = with_live_models(scenario)
            prepared = prepare(scenario, args.seed)
            loads = real_model_loads(prepared, loads_by_model)
            plan = plan_replay(
                prepared,
                speed=args.speed,
                calibration=MEASURED,
                estimators=live_estimators(),
                model_loads_s=loads,
            )
            ideal = plan_replay(
                prepared, speed=args.speed, calibration=Calibration(), model_loads_s=loads
            )
            runs[name] = []
            for policy in POLICIES:
                try:
                    runs[name].append(run_one(plan, ideal, policy, args.speed))
                except BilevelError as exc:
                    # A service that did not come up (a busy machine) costs this run, not all.
                    runs[name].append({"policy": policy, "failed": str(exc)})
                print(f"{name} {policy}: done", file=sys.stderr, flush=True)
            ok = [r for r in runs[name] if "failed" not in r]
            live = {r["policy"]: r["live"] for r in ok}
            sim = {r["policy"]: r["sim"] for r in ok}
            sim_ideal = {r["policy"]: r["sim_ideal"] for r in ok}
            rankings[name] = {
                "live": rank(live),
                "sim": rank(sim),
                "sim_ideal": rank(sim_ideal),
                "agree": rankings_agree(sim, live),
                "agree_ideal": rankings_agree(sim_ideal, live),
                "agree_within_tie": rankings_agree(sim, live, tie=RANK_TIE),
                "agree_ideal_within_tie": rankings_agree(sim_ideal, live, tie=RANK_TIE),
            }
        report["runs"] = runs
        report["rankings"] = rankings
        every = [r for rs in runs.values() for r in rs]
        report["failed_runs"] = sum(1 for r in every if "failed" in r)
        report["all_within_bounds"] = all(
            "failed" not in r and all(r["within_bounds"].values()) for r in every
        )
        report["all_rankings_agree"] = all(r["agree"] for r in rankings.values())
    finally:
        report["loadavg_after"] = os.getloadavg()[0]
        if started_ray:
            import ray

            ray.shutdown()
    print(json.dumps(report, allow_nan=False))


if __name__ == "__main__":
    main()
