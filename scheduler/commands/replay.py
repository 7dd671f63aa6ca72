"""`bilevel replay --scenario FILE`: drive the live service with a scenario's exact jobs and report
the simulator's error against it.

The scenario's jobs are drawn as `bilevel simulate` draws them (same generator, same seed), cut
to --duration-s scenario seconds, and run --speed times faster: the live service (started here,
embedded Redis and local Ray, unless --redis-url names a Redis to start it on) serves them with
synthetic handlers that sleep each job's drawn service time (or, on a queue whose scenario names
a `live_model`, compute with that torch demo model for it, after a real model load that this
command times first and gives the simulator), and the simulator runs the same jobs with the same
policy and the overheads of the live service it models (the scenario's `calibration:` section,
else the values measured on the development machine; --ideal leaves them out). Both are reported in scenario seconds, with the simulator's relative error per metric.
"""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from policies.sim.calibration import MEASURED, Calibration
from policies.sim.scenario import Scenario, ScenarioError
from policies.sim.timescale import shrink
from policies.sim2real import (
    COMPARED_METRICS,
    plan_replay,
    real_model_loads,
    relative_errors,
    rescaled,
)
from scheduler.commands._common import fail, progress_bar, read_scenario
from scheduler.commands._tables import Column, print_table
from scheduler.commands.simulate import check_policy, check_router, prepare_run
from scheduler.config import ConfigError
from scheduler.errors import BilevelError
from scheduler.logs import configure_logging


def _fmt(x: Any, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


# Rows of the text report: metric, its format.
_ROWS: tuple[tuple[str, str], ...] = (
    ("jobs", "d"),
    ("mean_jct_s", ".3f"),
    ("p50_jct_s", ".3f"),
    ("p99_jct_s", ".3f"),
    ("slo_attainment", ".1%"),
    ("utilization", ".1%"),
    ("reconfigurations", "d"),
)


def timed_live_model_loads(scenario: Scenario, console: Console, quiet: bool) -> dict[str, float]:
    """One load of each torch demo model the scenario's queues name as `live_model`, timed on
    this machine: real loads take their own time at any speed, and the simulator is told it."""
    names = {q.live_model for q in scenario.queues if q.live_model is not None}
    if not names:
        return {}
    from workers.synthetic import time_model_loads

    if not quiet:
        console.print(f"timing the loads of {', '.join(sorted(names))}", highlight=False)
    return time_model_loads(names)


def replay(
    scenario: Annotated[
        Path,
        typer.Option("--scenario", metavar="FILE", help="Scenario YAML file.", show_default=False),
    ],
    trace: Annotated[
        Path | None,
        typer.Option(
            "--trace",
            help="Trace file (servegen: a directory or one arrivals file) for trace-replay scenarios.",
        ),
    ] = None,
    speed: Annotated[
        float,
        typer.Option("--speed", help="Run K times faster than the scenario (sleeps and gaps / K)."),
    ] = 10.0,
    policy: Annotated[
        str | None,
        typer.Option(
            "--policy",
            help="Allocator name (default: the scenario's), 'learned' or a checkpoint path.",
        ),
    ] = None,
    router: Annotated[
        str | None,
        typer.Option("--router", help="Router name (default: the scenario's), or 'learned'."),
    ] = None,
    seed: Annotated[
        int, typer.Option("--seed", help="Seed of arrivals, service times, router.")
    ] = 0,
    duration_s: Annotated[
        float | None,
        typer.Option(
            "--duration-s",
            help="Replay the arrivals of this many scenario seconds (default: all); real time "
            "is this / speed.",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    redis_url: Annotated[
        str | None,
        typer.Option(
            "--redis-url", help="Run the service on this Redis (default: an embedded one)."
        ),
    ] = None,
    ideal: Annotated[
        bool,
        typer.Option("--ideal", help="Simulate without the live overheads (no calibration)."),
    ] = False,
    workers: Annotated[
        int | None,
        typer.Option(
            "--workers",
            help="Shrink the scenario to this many workers at the same utilisation (default: "
            "its allocation.budget).",
        ),
    ] = None,
    load_scale: Annotated[
        float,
        typer.Option(
            "--load-scale", help="Multiply the arrival rates by this (with --workers or alone)."
        ),
    ] = 1.0,
) -> None:
    """Replay a scenario live and in the simulator; report both and the simulator's error."""
    if not (speed > 0 and math.isfinite(speed)):
        raise fail(f"--speed must be a number > 0, got {speed}")
    if duration_s is not None and not (duration_s > 0 and math.isfinite(duration_s)):
        raise fail(f"--duration-s must be a number > 0, got {duration_s}")
    if workers is not None and workers < 1:
        raise fail(f"--workers must be >= 1, got {workers}")
    if not (load_scale > 0 and math.isfinite(load_scale)):
        raise fail(f"--load-scale must be a number > 0, got {load_scale}")
    check_policy(policy)
    check_router(router)
    from scheduler.service.live_replay import live_estimators

    parsed = read_scenario(scenario)
    if workers is not None or load_scale != 1.0:
        try:
            # A few sleeping workers stand for the scenario's many: the same utilisation per
            # worker, the arrival rates scaled with the budget (policies/sim/timescale.py).
            parsed = shrink(
                parsed,
                workers or parsed.allocation.budget,
                duration_s=duration_s,
                load_scale=load_scale,
            )
        except ValueError as exc:
            raise fail(str(exc)) from None
    calibration = Calibration() if ideal else (parsed.calibration or MEASURED)
    # Before anything logs: the service's start-up lines go to stderr, warnings only.
    configure_logging(level="warning")
    console = Console(stderr=True)
    try:
        prepared = prepare_run(
            parsed.model_copy(update={"calibration": None}), scenario, seed, trace
        )
        model_loads = real_model_loads(prepared, timed_live_model_loads(parsed, console, as_json))
        plan = plan_replay(
            prepared,
            speed=speed,
            calibration=calibration,
            duration_s=duration_s,
            estimators=None if ideal else live_estimators(),
            model_loads_s=model_loads,
        )
        plan.handlers()
    except (ScenarioError, ValueError) as exc:
        raise fail(str(exc)) from None
    if plan.arrivals == 0:
        raise fail(f"{parsed.name}: no arrivals to replay in the first {duration_s} s")
    from scheduler.service.live_replay import (
        ReplayError,
        replay_service,
        simulate_plan,
        submit_and_collect,
    )

    policy_name = policy or parsed.allocation.policy
    router_name = router or parsed.routing.policy
    real_s = plan.live.spec.horizon_s
    if not as_json:
        console.print(
            f"replaying {plan.arrivals} jobs of {parsed.name} at {speed:g}x "
            f"({real_s:.0f} s of arrivals), policy {policy_name}, router {router_name}",
            highlight=False,
        )
    try:
        with (
            replay_service(plan, policy=policy, router=router, redis_url=redis_url) as service,
            progress_bar(console) as bar,
        ):
            task = bar.add_task("submitting", total=plan.arrivals)

            def progress(done: int, total: int) -> None:
                bar.update(task, completed=done)

            plan = plan.starting_from(service.settled)
            outcome = asyncio.run(submit_and_collect(plan, service.settings, progress=progress))
    except KeyboardInterrupt:
        console.print("interrupted: the service was stopped", highlight=False)
        raise typer.Exit(code=130) from None
    except ConfigError as exc:
        raise fail(str(exc)) from None
    except (ReplayError, BilevelError, OSError) as exc:
        raise fail(str(exc), code=1) from None
    _, sim_raw = simulate_plan(plan, policy, router)
    live = rescaled(outcome.summary, speed)
    sim = rescaled(sim_raw, speed)
    error = relative_errors(sim, live)
    out = dict(live)
    out |= {
        "policy": policy_name,
        "router": router_name,
        "seed": seed,
        "speed": speed,
        "calibration": calibration.model_dump(),
        # Real seconds a worker of each live_model queue took to load its models, timed here.
        "model_loads_s": {q: round(v, 3) for q, v in model_loads.items()},
        "live": live,
        "sim": sim,
        "error": error,
    }
    if as_json:
        typer.echo(json.dumps(out, allow_nan=False))
        return
    title = f"{parsed.name}: live vs simulated at {speed:g}x, policy {policy_name}, seed {seed}"
    rows = []
    for metric, spec in _ROWS:
        e = error.get(metric) if metric in COMPARED_METRICS else None
        rows.append([metric, _fmt(sim.get(metric), spec), _fmt(live.get(metric), spec),
                     _fmt(e, "+.1%")])  # fmt: skip
    print_table(
        Console(),
        title,
        [Column("metric", "name"), Column("sim"), Column("live"), Column("error")],
        rows,
    )


def register(app: typer.Typer) -> None:
    """Adds the `replay` command to the CLI."""
    app.command("replay")(replay)
