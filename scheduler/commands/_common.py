"""What the commands share: failing with a clear message, and reading scenario and trace files
(policies/ does no I/O, so the commands open the files and hand over text and lines)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from policies.evaluation import TraceInput
from policies.legacy_layout import LayoutDeprecationWarning
from policies.sim.scenario import Scenario, ScenarioError, parse_scenario
from policies.sim.trace_servegen import QUANTILES_FILE, is_arrivals_file
from policies.sim.traces import TraceFormat


def fail(message: str, code: int = 2) -> typer.Exit:
    """Prints `message` to stderr; the caller raises the returned Exit."""
    # Escaped: messages quote user input and policy reasons with [brackets] that are not markup.
    Console(stderr=True).print(
        f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True
    )
    return typer.Exit(code=code)


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    if issubclass(category, LayoutDeprecationWarning):
        Console(stderr=True).print(
            f"[yellow]warning:[/yellow] {escape(str(message))}", highlight=False, soft_wrap=True
        )
        return
    _python_show_warning(message, category, filename, lineno, file, line)


_python_show_warning = warnings.showwarning


def show_layout_warnings() -> None:
    """Print layout deprecation warnings as a plain `warning: ...` on stderr, not in Python's
    `file:line:` form, which would point into bilevel rather than at the user's file."""
    warnings.showwarning = _show_warning


def read_scenario(path: Path) -> Scenario:
    """The validated scenario in `path`, or Exit(2) naming the file and each bad field."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise fail(f"cannot read scenario: {exc}") from None
    try:
        return parse_scenario(text, source=str(path))
    except ScenarioError as exc:
        raise fail(str(exc)) from None


@dataclass(frozen=True, slots=True)
class TraceSource:
    """Where a public trace format's files come from (docs/traces.md has the whole story)."""

    title: str
    files: str
    url: str


# The project ships loaders, not data: a user downloads these (upstream, licences beside them).
TRACE_SOURCES: dict[TraceFormat, TraceSource] = {
    TraceFormat.AZURE_LLM_2023: TraceSource(
        "the Azure LLM inference trace 2023",
        "AzureLLMInferenceTrace_code.csv or AzureLLMInferenceTrace_conv.csv",
        "https://github.com/Azure/AzurePublicDataset/tree/master/data",
    ),
    TraceFormat.MOONCAKE: TraceSource(
        "the Mooncake FAST'25 trace",
        "conversation_trace.jsonl",
        "https://github.com/kvcache-ai/Mooncake/tree/main/FAST25-release/traces",
    ),
    TraceFormat.AZURE_FUNCTIONS_2019: TraceSource(
        "the Azure Functions 2019 trace",
        "1000_inv.csv and 1000_run.csv (a 1,000-function sample)",
        "https://github.com/vhive-serverless/invitro/tree/"
        "7e993e92dfacecf19b86ff603fef487404af5357/data/traces",
    ),
    TraceFormat.SERVEGEN: TraceSource(
        "the ServeGen trace",
        "arrivals_<category>_<model>.csv files joined from upstream's per-client chunks, with "
        "derived_length_quantiles.csv or lengths_<category>_<model>.jsonl beside them",
        "https://github.com/alibaba/ServeGen/tree/main/data",
    ),
}


def trace_hint(fmt: TraceFormat) -> str:
    """Where to get a trace of format `fmt`, in a few words for an error message."""
    source = TRACE_SOURCES.get(fmt)
    if source is None:
        return f"a {fmt.value} trace is a file of your own; its columns are in docs/traces.md"
    return f"{source.title} is {source.files} from {source.url} (see docs/traces.md)"


def _check_exists(path: Path, origin: str, fmt: TraceFormat) -> None:
    if not path.exists():
        raise fail(f"{origin} {path}: no such file; {trace_hint(fmt)}")
    if not path.is_file():
        raise fail(f"{origin} {path}: not a file; {trace_hint(fmt)}")


@dataclass(frozen=True, slots=True)
class TraceFiles:
    """The files a trace scenario replays."""

    trace: Path
    # Azure Functions durations (`*_run.csv`), when the format has them and they are found.
    run: Path | None = None
    # Servegen: the further arrivals files, then the lengths files found beside them.
    extra: tuple[Path, ...] = ()


def trace_files(scenario: Scenario, scenario_path: Path, trace: Path | None) -> TraceFiles | None:
    """Which files the scenario replays: --trace, else the path in the scenario (relative to the
    scenario file, not the shell). None for a synthetic scenario; Exit(2) when a trace scenario
    has no trace or its file is missing (saying where that trace is downloaded), or --trace is
    given to a synthetic one."""
    spec = scenario.workload.trace
    if spec is None:
        if trace is not None:
            raise fail(f"--trace given, but scenario {scenario_path} does not replay a trace")
        return None
    if spec.format is TraceFormat.SERVEGEN:
        return _servegen_files(spec.path, scenario_path, trace)
    assert not isinstance(spec.path, list)  # the scenario's checks allow lists for servegen only
    trace_path = trace
    origin = "--trace"
    if trace_path is None and spec.path is not None:
        trace_path = scenario_path.parent / spec.path
        origin = f"{scenario_path}: workload.trace.path"
    if trace_path is None:
        raise fail(
            f"scenario {scenario_path} replays a trace ({spec.format.value}): give --trace PATH; "
            f"{trace_hint(spec.format)}"
        )
    _check_exists(trace_path, origin, spec.format)
    run_path: Path | None = None
    if spec.format is TraceFormat.AZURE_FUNCTIONS_2019:
        if spec.run_path is not None:
            run_path = scenario_path.parent / spec.run_path
            _check_exists(run_path, f"{scenario_path}: workload.trace.run_path", spec.format)
        elif "_inv" in trace_path.name:
            # The invitro layout: durations sit beside the invocations as *_run.csv.
            candidate = trace_path.with_name(trace_path.name.replace("_inv", "_run"))
            run_path = candidate if candidate.exists() else None
    return TraceFiles(trace_path, run_path)


def _servegen_files(
    names: str | list[str] | None, scenario_path: Path, trace: Path | None
) -> TraceFiles:
    """Servegen's arrivals files and the lengths files beside them.

    --trace DIR takes the scenario's file names inside DIR (every `arrivals_*.csv` there when it
    names none); --trace FILE replays that one model; without --trace, the scenario's paths count
    from the scenario file's directory.
    """
    fmt = TraceFormat.SERVEGEN
    listed = [names] if isinstance(names, str) else list(names or [])
    if trace is not None and trace.is_dir():
        arrivals = [trace / name for name in listed] or sorted(trace.glob("arrivals_*.csv"))
        if not arrivals:
            raise fail(f"--trace {trace}: no arrivals_*.csv in this directory; {trace_hint(fmt)}")
        origin = "--trace"
    elif trace is not None:
        arrivals, origin = [trace], "--trace"
    elif listed:
        arrivals = [scenario_path.parent / name for name in listed]
        origin = f"{scenario_path}: workload.trace.path"
    else:
        raise fail(
            f"scenario {scenario_path} replays a trace ({fmt.value}): give --trace PATH (a "
            f"directory of arrivals files, or one); "
            f"{trace_hint(fmt)}"
        )
    for path in arrivals:
        _check_exists(path, origin, fmt)
        if not is_arrivals_file(path.name):
            raise fail(
                f"{origin} {path}: a servegen arrivals file is named "
                "arrivals_<category>_<model>.csv"
            )
    lengths: list[Path] = []
    for path in arrivals:
        beside = [
            path.with_name(QUANTILES_FILE),
            path.with_name("lengths_" + path.name.removeprefix("arrivals_")).with_suffix(".jsonl"),
        ]
        lengths += [p for p in beside if p.is_file() and p not in lengths]
    return TraceFiles(arrivals[0], None, tuple(arrivals[1:]) + tuple(lengths))


def _read_lines(path: Path) -> tuple[str, ...]:
    try:
        with path.open(encoding="utf-8") as f:
            return tuple(f)
    except OSError as exc:
        raise fail(f"cannot read trace: {exc}") from None


def read_trace(scenario: Scenario, scenario_path: Path, trace: Path | None) -> TraceInput | None:
    """The trace a trace scenario replays (--trace, else the scenario's own path), read whole;
    None for a synthetic scenario."""
    files = trace_files(scenario, scenario_path, trace)
    if files is None:
        return None
    run_lines = _read_lines(files.run) if files.run is not None else None
    return TraceInput(
        lines=_read_lines(files.trace),
        source=str(files.trace),
        run_lines=run_lines,
        extra_files=tuple((str(path), _read_lines(path)) for path in files.extra),
    )


@dataclass(frozen=True)
class ScenarioInput:
    """A scenario file, read and validated, with the trace it replays (None for a synthetic one)."""

    path: Path
    scenario: Scenario
    trace: TraceInput | None


def read_inputs(paths: Sequence[Path], trace: Path | None) -> list[ScenarioInput]:
    """Every scenario in `paths` with its trace (--trace goes to the trace scenarios among them,
    so synthetic ones can train beside a trace); Exit(2) when --trace fits none of them or two
    scenarios share a name (results are keyed by it)."""
    scenarios = [(path, read_scenario(path)) for path in paths]
    if trace is not None and all(s.workload.trace is None for _, s in scenarios):
        if len(scenarios) == 1:
            raise fail(f"--trace given, but scenario {paths[0]} does not replay a trace")
        raise fail("--trace given, but no scenario replays a trace")
    inputs = [
        ScenarioInput(path, s, read_trace(s, path, trace if s.workload.trace is not None else None))
        for path, s in scenarios
    ]
    names = [i.scenario.name for i in inputs]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise fail(f"scenario names must be unique in one run: {duplicated}")
    return inputs


def progress_bar(console: Console) -> Progress:
    """The commands' progress bar (what, a bar, done of total, time elapsed) on `console`, gone
    once it ends."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )
