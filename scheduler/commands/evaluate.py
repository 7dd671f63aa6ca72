"""`bilevel evaluate`: a policy against every tuned heuristic, on held-out arrivals, with CIs.

The file reading lives here; running, tuning and statistics are in `policies.evaluation` and
`policies.tuning` (pure). Which seeds and which part of a trace are held out: `policies.seeds`.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Iterable, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import Progress

from policies.evaluation import (
    MapEpisodes,
    PolicyFactory,
    RouterFactory,
    RunOutcome,
    compare,
    evaluate_scenario,
    policy_stats,
)
from policies.registry import ALLOCATORS, HEURISTIC_ALLOCATORS, ROUTERS, make_router
from policies.seeds import DEFAULT_EVAL_SEEDS, TRAIN_WINDOW_FRACTION, TUNING_SEEDS, eval_seeds
from policies.sim.scenario import Scenario
from policies.tuning import (
    default_grids,
    heuristic_factories,
    heuristic_factory,
    shipped_params,
    tune_scenario,
)
from scheduler.commands._common import ScenarioInput, fail, progress_bar, read_inputs
from scheduler.commands._tables import Column, policy_label, print_table
from scheduler.episode_tasks import episode_executor


def _note(message: str) -> None:
    Console(stderr=True).print(message, highlight=False, soft_wrap=True)


# --- the policy under test --------------------------------------------------------------------


def _check_resolves(
    kind: str, name: str, resolve: Callable[[str], object], known: Iterable[str]
) -> None:
    """Resolves `name` once now, so a bad name or checkpoint fails before any run, naming the
    `kind` ("policy", "router") and what would have worked."""
    try:
        resolve(name)
    except (ValueError, OSError) as exc:
        names = ", ".join(sorted(known))
        raise fail(
            f"cannot use {kind} {name!r}: {exc}\n"
            f"give a {kind} name ({names}), 'learned', or a checkpoint file"
        ) from None


def _policy_factory(policy: str) -> Callable[[Scenario], PolicyFactory]:
    """For each scenario, a factory of the policy under test (`scheduler.checkpoints`: a heuristic
    name, "learned", or a checkpoint path)."""
    # Imported here: it loads torch, which the other commands should not pay for at start-up.
    from scheduler.checkpoints import resolve_allocator

    _check_resolves("policy", policy, resolve_allocator, ALLOCATORS)

    def for_scenario(scenario: Scenario) -> PolicyFactory:
        if policy in ALLOCATORS:
            return lambda: resolve_allocator(policy)
        # A learned allocator masks moves the scenario's bounds forbid; guardrails still apply.
        bounds = scenario.bounds()
        return lambda: resolve_allocator(policy, bounds=bounds)

    return for_scenario


def _router_factory(router: str) -> RouterFactory:
    """A factory of the router under test (a router name, "learned", or a checkpoint path)."""
    from scheduler.checkpoints import resolve_router

    _check_resolves("router", router, resolve_router, ROUTERS)
    return lambda: resolve_router(router)


# --- inputs -------------------------------------------------------------------------------------


# --- running ------------------------------------------------------------------------------------


def _tuned_params(
    item: ScenarioInput,
    retune: bool,
    baselines: Sequence[str],
    map_episodes: MapEpisodes | None = None,
) -> tuple[dict[str, dict[str, Any]], str]:
    """(params per heuristic, where they came from): the shipped values for exactly this
    scenario, else a fresh tuning on the training arrivals."""
    stored = None if retune else shipped_params(item.scenario, item.trace)
    if stored is not None:
        return stored, "shipped"
    reason = "--retune" if retune else "no stored values for this exact scenario"
    _note(f"tuning heuristics on {item.scenario.name} ({reason}) ...")
    try:
        grids = {n: g for n, g in default_grids(item.scenario).items() if n in baselines}
        tuning = tune_scenario(
            item.scenario, grids=grids, trace=item.trace, map_episodes=map_episodes
        )
    except ValueError as exc:
        raise fail(f"{item.scenario.name}: {exc}") from None
    _note(f"  tuned in {tuning.wall_s:.1f} s on training seeds {list(tuning.seeds)}")
    return tuning.params(), "tuned now"


def _progress() -> Progress | None:
    """A progress bar on stderr when it is a terminal (piped output stays clean)."""
    console = Console(stderr=True)
    if not console.is_terminal:
        return None
    return progress_bar(console)


def _run_all(
    item: ScenarioInput,
    factories: dict[str, PolicyFactory],
    seeds: Sequence[int],
    routers: dict[str, RouterFactory] | None = None,
    map_episodes: MapEpisodes | None = None,
) -> dict[str, list[RunOutcome]]:
    """Every entry of `factories` (with its router from `routers`, if any) on every seed, with a
    progress bar on a terminal; with `map_episodes`, as its tasks."""
    with ExitStack() as stack:
        bar = _progress()
        update: Callable[[str, int], None] | None = None
        if bar is not None:
            stack.enter_context(bar)
            task = bar.add_task(item.scenario.name, total=len(seeds) * len(factories))

            def update(name: str, seed: int) -> None:
                bar.advance(task)

        try:
            return evaluate_scenario(
                item.scenario,
                factories,
                seeds,
                part="test",
                trace=item.trace,
                progress=update,
                routers=routers,
                map_episodes=map_episodes,
            )
        except ValueError as exc:
            raise fail(f"{item.scenario.name}: {exc}") from None


def _evaluate_one(
    item: ScenarioInput,
    policy: str,
    factory: Callable[[Scenario], PolicyFactory],
    baselines: Sequence[str],
    seeds: Sequence[int],
    retune: bool,
    map_episodes: MapEpisodes | None = None,
) -> dict[str, Any]:
    params, source = _tuned_params(item, retune, baselines, map_episodes)
    factories: dict[str, PolicyFactory] = {"__policy__": factory(item.scenario)}
    factories.update(heuristic_factories(params, baselines))
    results = _run_all(item, factories, seeds, map_episodes=map_episodes)
    return _scenario_payload(item, policy, results, params, source, baselines)


def _evaluate_router(
    item: ScenarioInput,
    router: str,
    factory: RouterFactory,
    baselines: Sequence[str],
    seeds: Sequence[int],
    retune: bool,
    map_episodes: MapEpisodes | None = None,
) -> dict[str, Any]:
    """The router under test against every heuristic router of `baselines`, all with the
    scenario's allocator at its tuned parameters, on the same held-out jobs."""
    allocator = item.scenario.allocation.policy
    params, source = _tuned_params(item, retune, [allocator], map_episodes)
    allocate = heuristic_factory(allocator, params.get(allocator, {}))
    routers: dict[str, RouterFactory] = {"__policy__": factory}
    routers.update({name: functools.partial(make_router, name) for name in baselines})
    results = _run_all(item, dict.fromkeys(routers, allocate), seeds, routers, map_episodes)
    payload = _scenario_payload(item, router, results, {}, source, baselines)
    payload["compared"] = "routers"
    payload["allocator"] = {"name": allocator, "params": params.get(allocator, {})}
    return payload


def _scenario_payload(
    item: ScenarioInput,
    policy: str,
    results: dict[str, list[RunOutcome]],
    params: dict[str, dict[str, Any]],
    source: str,
    baselines: Sequence[str],
) -> dict[str, Any]:
    comparison = compare(results, "__policy__", baselines)
    held_out = (
        f"held-out window (last {1 - TRAIN_WINDOW_FRACTION:.0%} of the trace)"
        if item.trace is not None
        else "held-out seeds"
    )
    heuristics = {
        name: {"params": params.get(name, {}), **policy_stats(results[name]).to_dict()}
        for name in baselines
    }
    gains = comparison.to_dict()
    gains.pop("policy")
    return {
        "held_out": held_out,
        "tuned_params": source,
        "policy": {"name": policy, **policy_stats(results["__policy__"]).to_dict()},
        "heuristics": heuristics,
        **gains,
    }


# --- output -------------------------------------------------------------------------------------


def _ci(stat: dict[str, Any]) -> str:
    mean, half = stat["mean"], stat["ci95"]
    if mean is None:
        return "-"
    return f"{mean:.3f} ± {half:.3f}" if half is not None else f"{mean:.3f}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:+.1%}"


def _params_text(params: dict[str, Any]) -> str:
    return ", ".join(
        f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items()
    )


def _print_tables(console: Console, name: str, payload: dict[str, Any], n_seeds: int) -> None:
    """The comparison table (the policy first, then the heuristics by mean JCT, the best marked
    *), its gain as a caption, and the heuristics' tuned parameters in a table of their own, so
    that long parameter lists never squeeze the numbers."""
    if payload.get("compared") == "routers":
        allocator = payload["allocator"]
        title = (
            f"{name}: routers, {n_seeds} evaluation seeds, {payload['held_out']}; every router "
            f"with the scenario's allocator {allocator['name']} "
            f"({_params_text(allocator['params']) or 'defaults'}, {payload['tuned_params']})"
        )
        known = [*ROUTERS, "learned"]
    else:
        title = (
            f"{name}: {n_seeds} evaluation seeds, {payload['held_out']}; heuristics tuned on "
            f"training arrivals ({payload['tuned_params']} values)"
        )
        known = [*ALLOCATORS, "learned"]
    mine = payload["policy"]
    label = policy_label(mine["name"], known)
    rows: list[tuple[str, dict[str, Any]]] = [(label, mine)]

    def rank(item: tuple[str, dict[str, Any]]) -> float:
        mean = item[1]["mean_jct_s"]["mean"]
        return math.inf if mean is None else float(mean)

    ranked = sorted(payload["heuristics"].items(), key=rank)
    for h_name, stats in ranked:
        rows.append((h_name + (" *" if h_name == payload["best_heuristic"] else ""), stats))
    paired = payload["paired_gain_mean_jct"]
    paired_text = (
        f" (paired per seed {_pct(paired['mean'])} ± {paired['ci95']:.1%})"
        if paired["mean"] is not None and paired["ci95"] is not None
        else ""
    )
    caption = (
        f"gain of {label} over the best heuristic ({payload['best_heuristic']}, *): "
        f"mean JCT {_pct(payload['gain_mean_jct'])}{paired_text}, "
        f"p99 JCT {_pct(payload['gain_p99_jct'])}"
    )
    columns = [
        Column("policy", "name"),
        Column("mean JCT s (95% CI)"),
        Column("p99 JCT s (95% CI)"),
        Column("moves"),
        Column("unfinished"),
    ]
    cells = []
    for row_label, stats in rows:
        moves = stats["reconfigurations"]["mean"]
        cells.append(
            [
                row_label,
                _ci(stats["mean_jct_s"]),
                _ci(stats["p99_jct_s"]),
                "-" if moves is None else f"{moves:.0f}",
                str(stats["unfinished"]),
            ]
        )
    styles = ["bold", *([None] * (len(cells) - 1))]
    print_table(console, title, columns, cells, caption=caption, row_styles=styles)
    tuned = [(h, _params_text(stats["params"])) for h, stats in ranked if stats["params"]]
    if tuned:
        print_table(
            console,
            f"{name}: the heuristics' parameters ({payload['tuned_params']} values)",
            [Column("heuristic", "name"), Column("parameters", "text")],
            [list(row) for row in tuned],
        )


# --- the command --------------------------------------------------------------------------------


def evaluate(
    scenarios: Annotated[
        list[Path],
        typer.Option(
            "--scenario",
            metavar="FILE",
            help="Scenario YAML file (repeatable).",
            show_default=False,
        ),
    ],
    policy: Annotated[
        str | None,
        typer.Option(
            "--policy",
            help="Policy under test: a heuristic name, 'learned', or a checkpoint path.",
            show_default=False,
        ),
    ] = None,
    router: Annotated[
        str | None,
        typer.Option(
            "--router",
            help="Evaluate a level-1 router instead (a router name, 'learned', or a checkpoint "
            "path): against every heuristic router, all with the scenario's tuned allocator.",
            show_default=False,
        ),
    ] = None,
    seeds: Annotated[
        int, typer.Option("--seeds", help="Held-out evaluation seeds (at least 5).")
    ] = DEFAULT_EVAL_SEEDS,
    trace: Annotated[
        Path | None,
        typer.Option(
            "--trace",
            help="Trace file (servegen: a directory or one arrivals file) for trace-replay scenarios.",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    workers: Annotated[
        int,
        typer.Option(
            "--workers",
            help="Run the (policy x seed) episodes as Ray tasks on a local Ray of this many "
            "CPUs; 0 runs them in this process (the same numbers either way).",
        ),
    ] = 0,
    retune: Annotated[
        bool,
        typer.Option(
            "--retune", help="Tune the heuristics again instead of using the stored values."
        ),
    ] = False,
    baselines: Annotated[
        list[str] | None,
        typer.Option(
            "--baseline",
            metavar="NAME",
            help="Compare with these heuristics only (repeatable; default: every heuristic, or "
            "every router with --router).",
        ),
    ] = None,
) -> None:
    """Evaluate a policy against every tuned heuristic on held-out arrivals: mean and p99 JCT with
    95% CIs over seeds, and the gain over the best heuristic, per scenario. With --router, a
    router against every heuristic router instead."""
    if (policy is None) == (router is None):
        raise fail("give exactly one of --policy (an allocator) and --router")
    try:
        seed_list = eval_seeds(seeds)
    except ValueError as exc:
        raise fail(str(exc)) from None
    known = tuple(ROUTERS) if router is not None else HEURISTIC_ALLOCATORS
    chosen = list(baselines) if baselines else list(known)
    unknown = [b for b in chosen if b not in known]
    if unknown:
        raise fail(f"unknown baseline(s) {unknown}; choose from: {', '.join(known)}")
    if workers < 0:
        raise fail(f"--workers must be >= 0, got {workers}")
    inputs: list[ScenarioInput]
    if router is not None:
        router_factory = _router_factory(router)
        inputs = read_inputs(scenarios, trace)
        with episode_executor(workers) as run:
            payloads = {
                item.scenario.name: _evaluate_router(
                    item, router, router_factory, chosen, seed_list, retune, run
                )
                for item in inputs
            }
    else:
        assert policy is not None
        factory = _policy_factory(policy)
        inputs = read_inputs(scenarios, trace)
        with episode_executor(workers) as run:
            payloads = {
                item.scenario.name: _evaluate_one(
                    item, policy, factory, chosen, seed_list, retune, run
                )
                for item in inputs
            }
    if as_json:
        out = {
            "policy": policy,
            "router": router,
            "seeds": seed_list,
            "tuning_seeds": list(TUNING_SEEDS),
            "scenarios": payloads,
        }
        typer.echo(json.dumps(out, allow_nan=False))
        return
    console = Console()
    for name, payload in payloads.items():
        _print_tables(console, name, payload, len(seed_list))


def register(app: typer.Typer) -> None:
    """Adds the `evaluate` command to the CLI."""
    app.command("evaluate")(evaluate)
    if app.registered_callback is None:
        # As in `simulate`: an app with one command and no callback would run it bare.
        app.callback()(_group)


def _group() -> None:
    """Dynamic task scheduling for ML workloads on Ray, with learned two-level routing."""
