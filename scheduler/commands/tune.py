"""`bilevel tune`: every heuristic's parameters tuned on a scenario's training arrivals.

This is how `policies/tuned.py` is made (`--write policies/tuned.py`, then `ruff format` on it, as
`make lint` checks the layout), and how a user tunes the heuristics for a scenario of their own
before comparing a policy with them. The grids and the
seeds are `policies.tuning.default_grids` and `policies.seeds.TUNING_SEEDS`, the same that
`bilevel evaluate --retune` uses.
"""

from __future__ import annotations

import json
import math
import os
import runpy
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from policies.evaluation import MapEpisodes
from policies.seeds import TRAIN_SEEDS, TUNING_SEEDS
from policies.tuned import TunedEntry
from policies.tuning import ScenarioTuning, render_tuned_module, tune_scenario
from scheduler.commands._common import ScenarioInput, fail, read_inputs
from scheduler.commands._outputs import check_output, write_failed
from scheduler.commands._tables import Column, print_table
from scheduler.episode_tasks import episode_executor

# The docstring note of a written module: where the values come from.
MODULE_NOTE = (
    "Written by `bilevel tune --write`: `policies.tuning.tune_scenario` on the training seeds\n"
    "`policies.seeds.TUNING_SEEDS`, full-length runs; trace scenarios on the training window\n"
    "(the first 60%) of the trace file they were tuned with, whose digest the fingerprint holds."
)


def _tune(
    item: ScenarioInput, seeds: Sequence[int], map_episodes: MapEpisodes | None = None
) -> ScenarioTuning:
    console = Console(stderr=True)
    console.print(f"tuning {item.scenario.name} ...", highlight=False)

    def progress(name: str, done: int, total: int) -> None:
        if done == total:
            console.print(f"  {name}: {total} grid points", highlight=False)

    try:
        tuning = tune_scenario(
            item.scenario,
            seeds=seeds,
            trace=item.trace,
            progress=progress,
            map_episodes=map_episodes,
        )
    except ValueError as exc:
        raise fail(f"{item.scenario.name}: {exc}") from None
    console.print(f"  done in {tuning.wall_s:.1f} s", highlight=False)
    return tuning


def _print_table(console: Console, tuning: ScenarioTuning) -> None:
    rows = []
    for name, h in tuning.heuristics.items():
        best = next((p for p in h.points if dict(p.params) == dict(h.best)), None)
        score = "-"
        if best is not None and math.isfinite(best.mean_sojourn_s):
            score = f"{best.mean_sojourn_s:.4g}"
        params = ", ".join(f"{k}={v}" for k, v in h.best.items()) or "(none)"
        rows.append([name, params, score])
    print_table(
        console,
        f"{tuning.scenario}: tuned on seeds {list(tuning.seeds)}",
        [
            Column("heuristic", "name"),
            Column("parameters", "text"),
            Column("mean time in system (s)"),
        ],
        rows,
    )


def read_tuned_module(path: Path) -> dict[str, TunedEntry]:
    """The entries of the tuned-values module at `path` (none when it does not exist yet);
    Exit(2) naming the file when it is not one."""
    if not path.exists():
        return {}
    if not path.is_file():
        raise fail(f"--write {path}: not a file")
    try:
        table = runpy.run_path(str(path)).get("TUNED")
    except Exception as exc:  # the file is the user's: any failure to load it is reported
        raise fail(f"cannot read the tuned values in {path}: {exc}") from None
    if not isinstance(table, Mapping):
        raise fail(f"{path} defines no TUNED mapping")
    try:
        return {
            str(name): TunedEntry(str(entry.fingerprint), tuple(entry.seeds), dict(entry.params))
            for name, entry in table.items()
        }
    except (AttributeError, TypeError, ValueError) as exc:
        raise fail(f"{path}: TUNED holds something other than tuned entries ({exc})") from None


def write_tuned_module(path: Path, entries: Mapping[str, TunedEntry]) -> None:
    """Merges `entries` into the tuned-values module at `path` (created when missing) and writes it
    whole: read at write time, so runs tuning other scenarios into the same file keep each other's
    entries, and replaced atomically, so a failed write leaves the old file."""
    merged = {**read_tuned_module(path), **entries}
    text = render_tuned_module(merged, note=MODULE_NOTE)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise write_failed("--write", path, exc) from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise write_failed("--write", path, exc) from None


def tune(
    scenarios: Annotated[
        list[Path],
        typer.Option(
            "--scenario",
            metavar="FILE",
            help="Scenario YAML file (repeatable).",
            show_default=False,
        ),
    ],
    trace: Annotated[
        Path | None,
        typer.Option(
            "--trace",
            help="Trace file (servegen: a directory or one arrivals file) for trace-replay scenarios.",
        ),
    ] = None,
    write: Annotated[
        Path | None,
        typer.Option(
            "--write",
            help="Merge the results into this tuned-values module (policies/tuned.py is the one "
            "`bilevel evaluate` reads).",
            show_default=False,
        ),
    ] = None,
    seeds: Annotated[
        int,
        typer.Option(
            "--seeds",
            help="Tune on the first N training seeds (fewer is faster and noisier; a trace "
            "replays the same arrivals whatever the seed).",
        ),
    ] = len(TUNING_SEEDS),
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    workers: Annotated[
        int,
        typer.Option(
            "--workers",
            help="Run the (grid point x seed) episodes as Ray tasks on a local Ray of this many "
            "CPUs; 0 runs them in this process (the same numbers either way).",
        ),
    ] = 0,
) -> None:
    """Tune every heuristic on each scenario's training arrivals: a grid over its parameters, the
    point of lowest mean time in system over the tuning seeds."""
    if not 1 <= seeds <= len(TRAIN_SEEDS):
        raise fail(f"--seeds must be between 1 and {len(TRAIN_SEEDS)}, got {seeds}")
    if write is not None:
        check_output("--write", write)
        read_tuned_module(write)  # refuse a target that is not a tuned-values module before tuning
    inputs = read_inputs(scenarios, trace)
    seed_list = list(TRAIN_SEEDS[:seeds])
    if workers < 0:
        raise fail(f"--workers must be >= 0, got {workers}")
    with episode_executor(workers) as run:
        tunings = {item.scenario.name: _tune(item, seed_list, run) for item in inputs}
    # The results first, so that a module that cannot be written does not take them with it.
    if as_json:
        typer.echo(json.dumps({name: t.to_dict() for name, t in tunings.items()}))
    else:
        console = Console()
        for t in tunings.values():
            _print_table(console, t)
    if write is not None:
        write_tuned_module(write, {name: t.entry() for name, t in tunings.items()})
        Console(stderr=True).print(f"wrote {write}", highlight=False)


def register(app: typer.Typer) -> None:
    """Adds the `tune` command to the CLI."""
    app.command("tune")(tune)
