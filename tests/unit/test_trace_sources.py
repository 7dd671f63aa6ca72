"""Trace files a user has: shipped scenarios name none, a missing one is a one-line error saying
where that trace is downloaded, and docs/traces.md gives the same sources."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from policies.sim.scenario import parse_scenario
from policies.sim.traces import TraceFormat
from scheduler.cli import app
from scheduler.commands._common import TRACE_SOURCES

ROOT = Path(__file__).resolve().parents[2]
SCENARIOS = sorted((ROOT / "policies" / "scenarios").glob("*.yaml"))
TRACE_SCENARIOS = [
    p for p in SCENARIOS if parse_scenario(p.read_text(), source=str(p)).workload.trace is not None
]


def test_shipped_trace_scenarios_name_no_file() -> None:
    """Every shipped trace scenario takes its file from --trace: none names a path (a user would
    not have it), and there is one per public trace format."""
    formats = set()
    for path in TRACE_SCENARIOS:
        spec = parse_scenario(path.read_text(), source=str(path)).workload.trace
        assert spec is not None
        assert spec.path is None, path
        assert spec.run_path is None, path
        formats.add(spec.format)
    assert formats == set(TRACE_SOURCES)
    assert set(TRACE_SOURCES) == set(TraceFormat) - {TraceFormat.GENERIC_CSV}


def _one_line_error(args: list[str]) -> str:
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert "Traceback" not in result.output
    return lines[0]


@pytest.mark.parametrize("scenario", TRACE_SCENARIOS, ids=lambda p: p.stem)
@pytest.mark.parametrize("command", ["simulate", "evaluate", "tune", "train"])
def test_a_missing_trace_says_where_to_download_it(
    scenario: Path, command: str, tmp_path: Path
) -> None:
    """Without --trace, or with a file that is not there, every command stops in one line that
    names the file (or asks for --trace) and the trace's upstream URL."""
    fmt = parse_scenario(scenario.read_text()).workload.trace.format  # type: ignore[union-attr]
    url = TRACE_SOURCES[fmt].url
    extra = {"evaluate": ["--policy", "static"], "train": ["--out", str(tmp_path / "ckpt")]}
    base = [command, "--scenario", str(scenario), *extra.get(command, [])]
    missing = tmp_path / "traces" / "not_here.csv"
    line = _one_line_error([*base, "--trace", str(missing)])
    assert f"--trace {missing}: no such file" in line
    assert url in line
    line = _one_line_error(base)
    assert "give --trace PATH" in line
    assert url in line


def test_a_scenario_naming_a_missing_file_says_which_field(tmp_path: Path) -> None:
    """A scenario of one's own whose workload.trace.path is not there: the error names the field
    and the resolved path; a generic trace points to the format's description."""
    data = {
        "name": "mine",
        "queues": [{"name": "q", "job_types": ["x"], "service": {"kind": "constant", "mean_s": 1}}],
        "allocation": {"policy": "proportional", "budget": 1},
        "workload": {"trace": {"format": "generic_csv", "path": "data/mine.csv"}},
    }
    scenario = tmp_path / "mine.yaml"
    scenario.write_text(yaml.safe_dump(data))
    line = _one_line_error(["simulate", "--scenario", str(scenario)])
    assert f"workload.trace.path {tmp_path / 'data' / 'mine.csv'}: no such file" in line
    assert "docs/traces.md" in line


def test_trace_can_go_to_the_trace_scenario_among_synthetic_ones(tmp_path: Path) -> None:
    """`--trace` with a synthetic and a trace scenario feeds the trace scenario and leaves the
    synthetic one alone; with synthetic scenarios only it is refused."""
    trace = tmp_path / "t.csv"
    trace.write_text("arrival_s,job_type\n" + "".join(f"{i * 0.3},x\n" for i in range(30)))
    replay = {
        "name": "replay",
        "queues": [{"name": "q", "job_types": ["x"], "service": {"kind": "constant", "mean_s": 0.2}}],
        "allocation": {"policy": "proportional", "budget": 2},
        "workload": {"trace": {"format": "generic_csv"}},
    }  # fmt: skip
    (tmp_path / "replay.yaml").write_text(yaml.safe_dump(replay))
    steady = ROOT / "policies" / "scenarios" / "steady.yaml"
    args = ["tune", "--scenario", str(steady), "--scenario", str(tmp_path / "replay.yaml"),
            "--trace", str(trace), "--seeds", "1", "--json"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    line = _one_line_error(["tune", "--scenario", str(steady), "--trace", str(trace)])
    assert "does not replay a trace" in line


def test_docs_give_every_source_and_no_private_path() -> None:
    """docs/traces.md names every upstream URL the errors give, and the ServeGen data; it sends
    no one to a directory only this project's developers have."""
    text = (ROOT / "docs" / "traces.md").read_text()
    for source in TRACE_SOURCES.values():
        assert source.url in text
    assert "https://github.com/alibaba/ServeGen/tree/main/data" in text
    commands = [line for line in text.splitlines() if line.startswith(("bilevel", "curl"))]
    assert commands
    assert not [line for line in commands if "shared/traces" in line]
