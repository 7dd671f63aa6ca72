"""`bilevel train`: train the learned allocator and router on scenario files, rollouts on Ray.

Writes CHECKPOINT.pt (weights), CHECKPOINT.json (metadata) and CHECKPOINT.png (learning curve).
The checkpoint then runs with `bilevel simulate --policy CHECKPOINT.pt` and in the live service.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
import platform
import shlex
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from policies.evaluation import TraceInput
from policies.features import FEATURE_SCHEMA_VERSION
from policies.learned.networks import BaseSpec
from policies.learned.policy import LearnedPolicy
from policies.learned.ppo import (
    Args,
    Evaluation,
    TrainingStopped,
    TrainResult,
    train,
)
from policies.learned.rollout import MapRollouts, has_routing_choice, with_traces
from policies.registry import HEURISTIC_ALLOCATORS, make_allocator
from policies.seeds import TRAIN_SEEDS, TRAIN_WINDOW_FRACTION
from policies.sim.scenario import Scenario
from scheduler.checkpoints import (
    CheckpointError,
    checkpoint_paths,
    load_checkpoint,
    save_checkpoint,
)
from scheduler.commands._common import fail, read_inputs
from scheduler.commands._dataclass_cli import build, dataclass_options, with_options
from scheduler.commands._outputs import check_output, write_failed
from scheduler.commands._tables import Column, print_table
from scheduler.stopping import StopSignals
from scheduler.training import RayRollouts, serial_rollouts


def _load_scenarios(
    paths: Sequence[Path], trace: Path | None
) -> tuple[list[Scenario], dict[str, TraceInput]]:
    """The scenarios, and the traces of those that replay one (by scenario name): read here, once,
    and handed to the rollouts, which replay only each trace's training window."""
    inputs = read_inputs(paths, trace)
    traces = {i.scenario.name: i.trace for i in inputs if i.trace is not None}
    return [i.scenario for i in inputs], traces


def plot_learning_curve(result: TrainResult, out_path: Path) -> None:
    """PNG: training episodes' mean JCT per iteration, and each scenario's evaluated ratio to the
    best heuristic (held-out seeds) over iterations."""
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    from scheduler.plots import legend_outside, save

    fig, (ax_train, ax_eval) = plt.subplots(2, 1, figsize=(9, 8))
    jct = [m.get("charts/episodic_mean_jct_s", math.nan) for m in result.history]
    ax_train.plot(range(1, len(jct) + 1), jct, lw=0.8, color="tab:gray", label="per iteration")
    if len(jct) >= 5:
        window = max(len(jct) // 20, 5)
        kernel = [1.0 / window] * window
        smooth = np.convolve(np.nan_to_num(jct, nan=0.0), kernel, mode="valid")
        ax_train.plot(range(window, len(jct) + 1), smooth, color="tab:blue", label="moving mean")
    if jct:
        ax_train.set_yscale("log")
    ax_train.set_xlabel("iteration")
    ax_train.set_ylabel("training episodes' mean JCT (s)")
    legend_outside(ax_train)
    iterations = [e.iteration for e in result.evaluations]
    for scenario in result.evaluations[0].mean_jct_s if result.evaluations else []:
        ratios = [e.ratio(scenario) for e in result.evaluations]
        ax_eval.plot(iterations, ratios, marker="o", label=scenario)
    ax_eval.axhline(1.0, color="black", lw=0.8, ls="--")
    ax_eval.set_yscale("log")
    ax_eval.set_xlabel("iteration")
    ax_eval.set_ylabel("learned / best tuned heuristic\nmean JCT (validation seeds)")
    legend_outside(ax_eval, title="scenario")
    for ax in (ax_train, ax_eval):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    save(fig, out_path, dpi=90)


def _evaluation_dict(evaluation: Evaluation | None) -> dict[str, Any]:
    if evaluation is None:
        return {}
    return {
        "iteration": evaluation.iteration,
        "score": evaluation.score,
        "per_scenario": {
            s: {
                "learned_mean_jct_s": evaluation.mean_jct_s[s]["learned"],
                "learned_p99_jct_s": evaluation.p99_jct_s[s]["learned"],
                "best_heuristic": evaluation.best_heuristic(s),
                "best_heuristic_mean_jct_s": evaluation.mean_jct_s[s][evaluation.best_heuristic(s)],
                "best_heuristic_p99_jct_s": evaluation.p99_jct_s[s][evaluation.best_heuristic(s)],
                "mean_jct_ratio": evaluation.ratio(s),
                "heuristics_mean_jct_s": {
                    h: v for h, v in evaluation.mean_jct_s[s].items() if h != "learned"
                },
            }
            for s in evaluation.mean_jct_s
        },
    }


def _print_summary(evaluation: Evaluation) -> None:
    rows = []
    for s in evaluation.mean_jct_s:
        best = evaluation.best_heuristic(s)
        rows.append(
            [
                s,
                f"{evaluation.mean_jct_s[s]['learned']:.3f}",
                f"{evaluation.p99_jct_s[s]['learned']:.3f}",
                best,
                f"{evaluation.mean_jct_s[s][best]:.3f}",
                f"{1.0 - evaluation.ratio(s):+.1%}",
            ]
        )
    columns = [
        Column("scenario", "name"),
        Column("learned mean s"),
        Column("learned p99 s"),
        Column("best heuristic", "text"),
        Column("its mean s"),
        Column("gain"),
    ]
    print_table(Console(), f"validation (iteration {evaluation.iteration})", columns, rows)


def parse_base(text: str) -> BaseSpec:
    """`--base NAME` or `--base NAME:K=V,K=V` as (name, parameters); checked by building it once,
    so a bad name or parameter fails now rather than inside every rollout."""
    name, _, rest = text.partition(":")
    params: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, _, value = item.partition("=")
        try:
            params[key.strip()] = float(value)
        except ValueError:
            raise fail(f"--base {text!r}: {item!r} is not K=NUMBER") from None
    # Only the picked base runs each tick, so a base that keeps state across ticks would act on a
    # history with holes: the target-ongoing autoscaler's delays would not mean what they say.
    stateless = [h for h in HEURISTIC_ALLOCATORS if h != "target_ongoing"]
    if name not in stateless:
        raise fail(f"--base must name a stateless heuristic ({', '.join(stateless)}): {text!r}")
    try:
        make_allocator(name, **params)
    except (TypeError, ValueError) as exc:
        raise fail(f"--base {text!r}: {exc}") from None
    return name, params


def _own_options(
    scenario: Annotated[
        list[Path],
        typer.Option(
            "--scenario",
            metavar="FILE",
            help="Scenario YAML file; repeat for several.",
            show_default=False,
        ),
    ],
    out: Annotated[
        Path,
        typer.Option(
            "--out", help="Checkpoint path (writes .pt, .json and .png).", show_default=False
        ),
    ],
    trace: Annotated[
        Path | None,
        typer.Option(
            "--trace",
            help="Trace file for trace-replay scenarios (default: the path in the scenario). "
            "Training replays its first part; the rest stays held out for `bilevel evaluate`.",
        ),
    ] = None,
    workers: Annotated[
        int, typer.Option("--workers", help="Parallel rollouts (Ray CPUs); 0 runs them serially.")
    ] = 2,
    address: Annotated[
        str | None,
        typer.Option("--address", help="Ray cluster address (e.g. 'auto'); default: a local Ray."),
    ] = None,
    init: Annotated[
        Path | None, typer.Option("--init", help="Continue from this checkpoint's weights.")
    ] = None,
) -> None:
    """The options of `bilevel train` that are not training arguments (those come from `Args`)."""


# Training arguments the command line spells as text: `--base NAME[:K=V,...]`, repeatable.
_PARSERS = {"net.bases": lambda text: parse_base(text)}
_OWN = list(inspect.signature(_own_options, eval_str=True).parameters.values())


def train_command(**options: Any) -> None:
    """Train the learned allocator (and router) on scenarios; write a checkpoint and its curve."""
    scenario: list[Path] = options.pop("scenario")
    out: Path = options.pop("out")
    trace: Path | None = options.pop("trace")
    workers: int = options.pop("workers")
    address: str | None = options.pop("address")
    init: Path | None = options.pop("init")
    weights_path, meta_path = checkpoint_paths(out)
    for path in (weights_path, meta_path, weights_path.with_suffix(".png")):
        check_output("--out", path, create_parents=True)
    scenarios, traces = _load_scenarios(scenario, trace)
    initial: LearnedPolicy | None = None
    initial_meta: dict[str, Any] | None = None
    if init is not None:
        try:
            initial, initial_meta = load_checkpoint(init)
        except CheckpointError as exc:
            raise fail(str(exc)) from None
    try:
        args = build(Args, options, parsers=_PARSERS)
    except ValueError as exc:
        raise fail(str(exc)) from None
    router_only = not args.ppo.train_allocator
    if router_only and initial is None:
        raise fail("--router-only trains the router of an existing policy: give --init CHECKPOINT")
    if router_only and not any(has_routing_choice(s) for s in scenarios):
        raise fail(
            "--router-only needs a scenario where some job type has two or more eligible queues; "
            f"none of {', '.join(s.name for s in scenarios)} has one"
        )
    console = Console(stderr=True)
    stop = StopSignals()
    started = time.monotonic()
    with stop:
        try:
            result = _run(args, scenarios, traces, initial, workers, address, stop, console)
        except KeyboardInterrupt:
            raise fail(
                "interrupted again: quit without writing a checkpoint",
                code=stop.exit_code() if stop.requested else 130,
            ) from None
        stop.hold()  # a signal now would only cut the write short
        wall_s = time.monotonic() - started
        if result is None:
            console.print(
                f"stopped by {stop.name()} before the first validation: no policy to keep, "
                "nothing written",
                highlight=False,
                soft_wrap=True,
            )
            raise typer.Exit(stop.exit_code())
        if stop.requested:
            console.print(
                f"stopped by {stop.name()} after {_iterations(result.iterations)} "
                f"({wall_s / 60:.1f} min): writing the best policy validated so far "
                f"(iteration {result.best.iteration if result.best else 0})",
                highlight=False,
                soft_wrap=True,
            )
        metadata = _metadata(result, args, scenario, scenarios, traces, workers, wall_s)
        metadata["initialized_from"] = (
            {"path": str(init), "metadata": initial_meta} if initial_meta is not None else None
        )
        metadata["stopped_early"] = (
            {"signal": stop.name(), "after_iterations": result.iterations}
            if stop.requested
            else None
        )
        for note in result.notes:
            console.print(f"budget: {note}", highlight=False, soft_wrap=True)
        if result.best is not None:
            _print_summary(result.best)
        _write(out, result, metadata, wall_s)
    if stop.requested:
        raise typer.Exit(stop.exit_code())


def _run(
    args: Args,
    scenarios: list[Scenario],
    traces: dict[str, TraceInput],
    initial: LearnedPolicy | None,
    workers: int,
    address: str | None,
    stop: StopSignals,
    console: Console,
) -> TrainResult | None:
    """Trains with rollouts on Ray (or serially), a progress bar on `console`; the result, or
    when `stop` was signalled the partial one (None if nothing had been validated yet)."""
    ray_module: Any = None
    if workers > 0 or address is not None:
        import ray

        ray_module = ray
        if address is not None:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(
                num_cpus=workers,
                include_dashboard=False,
                log_to_driver=False,
                _temp_dir=tempfile.mkdtemp(prefix="bltrain", dir="/tmp"),
            )
        stop.install()  # after ray.init, whose own SIGTERM handler would exit without writing
    try:
        map_rollouts: MapRollouts = (
            RayRollouts(should_stop=lambda: stop.requested)
            if ray_module is not None
            else serial_rollouts(should_stop=lambda: stop.requested)
        )
        map_rollouts = with_traces(map_rollouts, traces)
        console.print(
            f"training on {', '.join(s.name for s in scenarios)} for up to {args.minutes:g} min; "
            "Ctrl-C stops and writes the best policy validated so far",
            highlight=False,
            soft_wrap=True,
        )
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.percentage:>3.0f}%"),
            TimeElapsedColumn(),
            console=console,
            # Logs get a line per validation instead (below).
            disable=not console.is_terminal,
        ) as progress:
            task = progress.add_task("evaluating heuristics", total=1.0)
            best_score = [math.nan]

            def announce(signum: int) -> None:
                name = signal.Signals(signum).name
                if console.is_terminal:  # the bar's description: short enough to stay whole
                    progress.update(task, description=f"{name}: stopping (again: quit, no write)")
                    return
                note = (
                    f"{name}: stopping at the next rollout, then writing the best policy "
                    "validated so far (again to quit without writing)\n"
                )
                os.write(2, note.encode())  # from a signal handler: one plain write

            stop.on_request = announce

            def report(
                iteration: int, fraction: float, metrics: dict[str, float], ev: Evaluation | None
            ) -> None:
                if ev is not None:
                    best_score[0] = (
                        ev.score if math.isnan(best_score[0]) else min(best_score[0], ev.score)
                    )
                    if not console.is_terminal:
                        console.print(
                            f"iteration {iteration}: validated, score {ev.score:.3f} "
                            f"(best so far {best_score[0]:.3f})",
                            highlight=False,
                        )
                text = (
                    f"iter {iteration}  train JCT {metrics['charts/episodic_mean_jct_s']:.2f}s"
                    f"  best vs heuristic {best_score[0]:.3f}"
                )
                if not stop.requested:
                    progress.update(task, completed=fraction, description=text)

            try:
                result = train(args, scenarios, map_rollouts, on_iteration=report, initial=initial)
            except TrainingStopped as stopped:
                return stopped.partial
            progress.update(task, completed=1.0)
            return result
    finally:
        if ray_module is not None:
            ray_module.shutdown()


def _iterations(n: int) -> str:
    return f"{n} iteration" if n == 1 else f"{n} iterations"


def _metadata(
    result: TrainResult,
    args: Args,
    scenario_files: list[Path],
    scenarios: list[Scenario],
    traces: dict[str, TraceInput],
    workers: int,
    wall_s: float,
) -> dict[str, Any]:
    """What a checkpoint records about the run that made it."""
    return {
        "command": shlex.join(["bilevel", *sys.argv[1:]]),
        "created_unix_s": time.time(),
        "training_time_s": wall_s,
        "iterations": result.iterations,
        "scenarios": [s.name for s in scenarios],
        "scenario_files": [str(p) for p in scenario_files],
        "traces": {
            name: {
                "source": t.source,
                "digest": t.digest(),
                "window": f"first {TRAIN_WINDOW_FRACTION:.0%} of the arrivals",
            }
            for name, t in traces.items()
        },
        "seed": args.seed,
        "train_arrival_seeds": (
            f"{len(result.train_seeds)} seeds drawn from [{TRAIN_SEEDS.start}, {TRAIN_SEEDS.stop})"
        ),
        "validation_arrival_seeds": result.validation_seeds,
        "validation": "tuned heuristics (policies.tuned), scenario start"
        + (" and random starts" if args.validate.random_starts else "")
        + "; score = mean of worst and geometric-mean per-cell badness (mean ratio + p99 penalty)",
        "workers": workers,
        "args": args.to_dict(),
        "budget_notes": result.notes,
        "imitation_teachers": result.teachers,
        "gate_pretrain_nll": None
        if math.isnan(result.gate_pretrain_nll)
        else result.gate_pretrain_nll,
        "forecast_fit": result.forecast_fit.to_dict() if result.forecast_fit else None,
        "regime_tables": {name: t.to_dict() for name, t in result.regime_tables.items()},
        "target_fit": result.target_fit.to_dict() if result.target_fit else None,
        "best_evaluation": _evaluation_dict(result.best),
        "python": platform.python_version(),
        "feature_schema_version": FEATURE_SCHEMA_VERSION,
    }


def _write(out: Path, result: TrainResult, metadata: dict[str, Any], wall_s: float) -> None:
    """Writes the checkpoint and its curve and prints where. When --out cannot take the
    checkpoint after all (a full disk, a directory gone), it goes to a new temporary directory
    instead, so the run is not lost; either failure is one line and Exit(1)."""
    try:
        weights_path, meta_path = save_checkpoint(out, result.policy, metadata)
    except OSError as exc:
        rescue = (
            Path(tempfile.mkdtemp(prefix="bilevel-checkpoint-")) / checkpoint_paths(out)[0].stem
        )
        try:
            weights_path, meta_path = save_checkpoint(rescue, result.policy, metadata)
        except OSError as again:
            raise write_failed("--out", checkpoint_paths(out)[0], exc) from again
        # The checkpoint is what matters here; the error below is about --out.
        with contextlib.suppress(OSError, ValueError, RuntimeError):
            plot_learning_curve(result, weights_path.with_suffix(".png"))
        raise fail(
            f"--out {checkpoint_paths(out)[0]}: could not write it: {exc.strerror or exc}; "
            f"the checkpoint is in {weights_path} (metadata {meta_path}) instead",
            code=1,
        ) from None
    curve = weights_path.with_suffix(".png")
    try:
        plot_learning_curve(result, curve)
    except (OSError, ValueError, RuntimeError) as exc:
        raise write_failed("--out", curve, exc) from None
    Console().print(
        f"checkpoint: {weights_path} ({weights_path.stat().st_size / 1024:.0f} KiB), "
        f"metadata: {meta_path}, curve: {curve}; "
        f"{_iterations(result.iterations)} in {wall_s / 60:.1f} min",
        highlight=False,
        soft_wrap=True,
    )


def register(app: typer.Typer) -> None:
    """Adds the `train` command to the CLI, its training options derived from `Args`."""
    derived = dataclass_options(Args, parsers=_PARSERS)
    app.command("train")(with_options(train_command, _OWN, derived))
