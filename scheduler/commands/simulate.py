"""`bilevel simulate`: run a scenario file through the simulator with one policy (a heuristic or a
learned checkpoint) or every heuristic side by side."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from policies.episodes import ProgressReport, run_episode
from policies.registry import ALLOCATORS, HEURISTIC_ALLOCATORS, ROUTERS
from policies.sim.metrics import RunRecord, summarize
from policies.sim.scenario import (
    PreparedRun,
    Scenario,
    ScenarioError,
    make_router_for,
    prepare,
    scenario_allocator,
)
from policies.sim.traces import TraceError
from policies.views import Allocator, Router
from scheduler.checkpoints import resolve_allocator, resolve_router
from scheduler.commands._common import fail, read_scenario, trace_files
from scheduler.commands._outputs import check_plot, write_failed
from scheduler.commands._tables import Column, policy_label, print_table

# A run shorter than this shows no progress bar: it would only flicker.
_PROGRESS_AFTER_S = 1.0


def check_policy(policy: str | None) -> None:
    """Fails early (before any run) on an unknown name or a checkpoint that does not load."""
    if policy is None or policy in ALLOCATORS:
        return
    try:
        resolve_allocator(policy)
    except ValueError as exc:  # CheckpointError included: it names the file and the problem
        raise fail(str(exc)) from None


def check_router(router: str | None) -> None:
    if router is None or router in ROUTERS:
        return
    try:
        resolve_router(router)
    except ValueError as exc:
        raise fail(str(exc)) from None


def _allocator_for(scenario: Scenario, policy: str | None) -> Allocator:
    """A heuristic via the scenario (its params), or a learned policy ("learned" or a checkpoint
    path), its move masks told the scenario's bounds; unguarded (the episode adds the guardrails)."""
    if policy is None or policy in ALLOCATORS:
        return scenario_allocator(scenario, policy)
    return resolve_allocator(policy, bounds=scenario.bounds())


def _router_for(scenario: Scenario, router: str | None) -> Router:
    if router is None or router in ROUTERS:
        return make_router_for(scenario, router)
    return resolve_router(router)


def prepare_run(
    scenario: Scenario, scenario_path: Path, seed: int, trace: Path | None
) -> PreparedRun:
    """Draws or replays the jobs, opening the trace files the scenario needs."""
    files = trace_files(scenario, scenario_path, trace)
    if files is None:
        return prepare(scenario, seed)
    trace_path, run_path = files.trace, files.run
    with ExitStack() as stack:
        try:
            lines = stack.enter_context(trace_path.open(encoding="utf-8"))
            run_lines = (
                stack.enter_context(run_path.open(encoding="utf-8"))
                if run_path is not None
                else None
            )
            extra = {
                str(path): stack.enter_context(path.open(encoding="utf-8")) for path in files.extra
            }
        except OSError as exc:
            raise fail(f"cannot read trace: {exc}") from None
        try:
            return prepare(
                scenario,
                seed,
                trace_lines=lines,
                trace_source=str(trace_path),
                run_lines=run_lines,
                extra_files=extra or None,
            )
        except (TraceError, ValueError) as exc:
            raise fail(str(exc)) from None


@contextmanager
def _progress(label: str, horizon_s: float) -> Iterator[Callable[[float], None]]:
    """A callback taking sim time; a progress bar appears on stderr once a run passes a second."""
    started = time.perf_counter()
    bar: Progress | None = None
    task = None

    def update(now_s: float) -> None:
        nonlocal bar, task
        if bar is None:
            if time.perf_counter() - started < _PROGRESS_AFTER_S:
                return
            bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                TextColumn("{task.percentage:>3.0f}% of sim time"),
                TimeElapsedColumn(),
                console=Console(stderr=True),
                transient=True,
            )
            bar.start()
            task = bar.add_task(label, total=max(horizon_s, 1e-9))
        assert task is not None
        bar.update(task, completed=min(now_s, horizon_s))

    try:
        yield update
    finally:
        if bar is not None:
            bar.stop()


def _run_one(prepared: PreparedRun, policy: str | None, router: str | None) -> RunRecord:
    scenario = prepared.scenario
    allocator = _allocator_for(scenario, policy)
    label = f"{scenario.name}: {allocator.name}"
    with _progress(label, prepared.spec.horizon_s) as progress:
        router_now = _router_for(scenario, router)
        return run_episode(
            prepared, allocator, router_now, recorders=[ProgressReport(progress)]
        ).record


def _result_dict(record: RunRecord, policy: str, router: str, seed: int) -> dict[str, Any]:
    out = summarize(record).to_dict()
    out.update({"policy": policy, "router": router, "seed": seed})
    return out


def _fmt(x: Any, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


# The table's columns after the policy's; `_table_row` fills them in this order.
_COLUMNS = (
    "jobs", "mean s", "p50 s", "p99 s", "SLO", "util", "moves", "load w·s", "rejected", "jobs/s",
)  # fmt: skip


def _table_row(label: str, r: dict[str, Any]) -> list[str]:
    return [
        label,
        str(r["jobs"]),
        _fmt(r["mean_jct_s"]),
        _fmt(r["p50_jct_s"]),
        _fmt(r["p99_jct_s"]),
        _fmt(r["slo_attainment"], ".1%"),
        _fmt(r["utilization"], ".1%"),
        str(r["reconfigurations"]),
        _fmt(r["loading_worker_s"], ".0f"),
        str(r["rejected"]),
        _fmt(r["sim_jobs_per_s"], ".0f"),
    ]


def _rank_key(item: tuple[str, dict[str, Any]]) -> float:
    mean = item[1]["mean_jct_s"]
    return float("inf") if mean is None else float(mean)


def simulate(
    scenario: Annotated[
        Path,
        typer.Option("--scenario", metavar="FILE", help="Scenario YAML file.", show_default=False),
    ],
    policy: Annotated[
        str | None,
        typer.Option(
            "--policy",
            help="Allocator name (default: the scenario's), 'learned' (the shipped checkpoint) "
            "or a checkpoint path.",
        ),
    ] = None,
    router: Annotated[
        str | None,
        typer.Option(
            "--router",
            help="Router name (default: the scenario's), 'learned' or a checkpoint path.",
        ),
    ] = None,
    seed: Annotated[
        int, typer.Option("--seed", help="Seed of arrivals, service times, router.")
    ] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    plot: Annotated[
        Path | None, typer.Option("--plot", help="Write a PNG: JCT CDF, depth, allocation.")
    ] = None,
    compare: Annotated[
        bool, typer.Option("--compare", help="Run every heuristic allocator on the same jobs.")
    ] = False,
    trace: Annotated[
        Path | None,
        typer.Option(
            "--trace",
            help="Trace file (servegen: a directory or one arrivals file) for trace-replay scenarios.",
        ),
    ] = None,
) -> None:
    """Simulate a scenario and report JCT, SLO attainment, utilisation and reconfigurations."""
    if compare and policy is not None:
        raise fail("--compare runs every heuristic allocator; drop --policy")
    if plot is not None:
        check_plot("--plot", plot)
    check_policy(policy)
    check_router(router)
    parsed = read_scenario(scenario)
    try:
        prepared = prepare_run(parsed, scenario, seed, trace)
    except ScenarioError as exc:
        raise fail(str(exc)) from None
    router_name = router if router is not None else parsed.routing.policy
    names = list(HEURISTIC_ALLOCATORS) if compare else [policy or parsed.allocation.policy]
    records: dict[str, RunRecord] = {}
    results: dict[str, dict[str, Any]] = {}
    for name in names:
        try:
            records[name] = _run_one(prepared, name, router)
        except ValueError as exc:
            raise fail(f"{name}: {exc}") from None
        results[name] = _result_dict(records[name], name, router_name, seed)
    ranked = dict(sorted(results.items(), key=_rank_key)) if compare else results
    # The results first: a plot that cannot be written must not take them with it.
    if as_json:
        payload = ranked if compare else next(iter(ranked.values()))
        typer.echo(json.dumps(payload, allow_nan=False))
    else:
        _print_table(parsed.name, prepared, router_name, seed, compare, ranked)
    if plot is not None:
        from scheduler.plots import plot_runs  # matplotlib is slow to import; only when asked

        try:
            plot_runs({n: records[n] for n in ranked}, plot, title=f"{parsed.name} (seed {seed})")
        except (OSError, ValueError, RuntimeError) as exc:
            raise write_failed("--plot", plot, exc) from None
        if not as_json:
            Console().print(f"plot written to {plot}", highlight=False, soft_wrap=True)


def _print_table(
    name: str,
    prepared: PreparedRun,
    router_name: str,
    seed: int,
    compare: bool,
    ranked: dict[str, dict[str, Any]],
) -> None:
    title = f"{name}: {prepared.spec.budget} workers, {len(prepared.jobs.arrivals)} arrivals"
    title += f", router {router_name}, seed {seed}"
    known = [*ALLOCATORS, "learned"]
    print_table(
        Console(),
        title + (" (ranked by mean JCT)" if compare else ""),
        [Column("policy", "name"), *(Column(c) for c in _COLUMNS)],
        [_table_row(policy_label(n, known), r) for n, r in ranked.items()],
    )


def register(app: typer.Typer) -> None:
    """Adds the `simulate` command to the CLI."""
    app.command("simulate")(simulate)
    if app.registered_callback is None:
        # Typer runs an app with a single command and no callback as that bare command, which
        # would turn `bilevel simulate ...` into `bilevel ...`; an empty callback keeps it a group.
        app.callback()(_group)


def _group() -> None:
    """Dynamic task scheduling for ML workloads on Ray, with learned two-level routing."""
