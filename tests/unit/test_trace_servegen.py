"""ServeGen loader: arrivals drawn from windowed statistics in small files the test writes itself
(one test also reads the real files in ../shared/traces/alibaba_servegen when they are there)."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import typer
import yaml
from typer.testing import CliRunner

from policies.env import AllocationEnv
from policies.sim.arrivals import Arrival
from policies.sim.scenario import parse_scenario, prepare
from policies.sim.trace_servegen import WINDOW_S, parse_servegen, read_lengths
from policies.sim.traces import TraceError, TraceFormat, load_trace
from scheduler.commands.simulate import register

HEADER = "client,window_start_s,rate,cv,iat_dist,iat_shape,iat_scale\n"
QUANTILES_HEADER = "model,client,window_start_s,field,mean,p50,p90,p99,max\n"
REAL_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "traces" / "alibaba_servegen"


def _rows(*rows: str) -> list[str]:
    return [HEADER, *(row + "\n" for row in rows)]


def _busy(client: int, start_s: int, rate: float, dist: str = "Gamma", shape: float = 0.5) -> str:
    # The scale is rescaled to the rate anyway; any positive value will do.
    return f"{client},{start_s},{rate},1.5,{dist},{shape},2.0"


def _draw(files: dict[str, list[str]], seed: int = 0, **options: object) -> list[Arrival]:
    return parse_servegen(files, rng=np.random.default_rng(seed), **options)  # type: ignore[arg-type]


SMALL = {
    "arrivals_language_m-a.csv": _rows(
        _busy(0, 0, 1.0),
        _busy(0, 600, 0.5, "Weibull", 0.7),
        "0,1200,0,0,,0,0",
        _busy(1, 0, 0.2),
        _busy(1, 1200, 0.3, "Weibull", 1.2),
    )
}


# --- parsing ------------------------------------------------------------------------------------


def test_model_from_file_name_and_tenant_from_client() -> None:
    """Job type is the model of arrivals_<category>_<model>.csv; tenant is model/client."""
    arrivals = _draw(SMALL)
    assert {a.job_type for a in arrivals} == {"m-a"}
    assert {a.tenant for a in arrivals} == {"m-a/0", "m-a/1"}
    times = [a.arrival_s for a in arrivals]
    assert times == sorted(times)
    assert times[0] >= 0
    assert times[-1] < 3 * WINDOW_S
    # The idle window of client 0 holds none of its arrivals.
    assert not [a for a in arrivals if a.tenant == "m-a/0" and a.arrival_s >= 1200]


def test_job_type_renames_one_file_only() -> None:
    """`job_type` renames the model of one file; with several files it is refused."""
    assert {a.job_type for a in _draw(SMALL, job_type="llm")} == {"llm"}
    two = {**SMALL, "arrivals_reason_r1.csv": _rows(_busy(0, 0, 0.1))}
    with pytest.raises(ValueError, match="one arrivals file"):
        _draw(two, job_type="llm")


def test_several_files_are_several_models() -> None:
    """Each arrivals file is one model, so one trace feeds one queue per model."""
    two = {**SMALL, "arrivals_reason_r1.csv": _rows(_busy(0, 0, 0.5))}
    counts = Counter(a.job_type for a in _draw(two))
    assert set(counts) == {"m-a", "r1"}


def test_a_file_not_named_like_arrivals_is_refused() -> None:
    """The model comes from the file name, so a file named otherwise cannot be replayed."""
    with pytest.raises(ValueError, match=re.escape("arrivals_<category>_<model>.csv")):
        _draw({"trace.csv": SMALL["arrivals_language_m-a.csv"]})


# --- bad input ----------------------------------------------------------------------------------

ARRIVAL_ERRORS = [
    ([HEADER.replace("rate", "rat")], 1, "header must be"),
    (_rows("0,0,1.0,1.5,Gamma,0.5"), 2, "expected 7 fields"),
    (_rows("x,0,1.0,1.5,Gamma,0.5,2"), 2, "column 'client': 'x' is not an integer"),
    (_rows("0,30,1.0,1.5,Gamma,0.5,2"), 2, "column 'window_start_s': '30' is not a multiple"),
    (_rows("0,0,fast,1.5,Gamma,0.5,2"), 2, "column 'rate': 'fast' is not a number"),
    (_rows("0,0,-1,1.5,Gamma,0.5,2"), 2, "column 'rate': '-1' is negative"),
    (_rows("0,0,1,nan,Gamma,0.5,2"), 2, "column 'cv': 'nan' is not a finite number"),
    (_rows("0,0,1,1.5,Pareto,0.5,2"), 2, "column 'iat_dist': 'Pareto'"),
    (_rows("0,0,1,1.5,,0,0"), 2, "column 'iat_dist' is empty but 'rate' is 1"),
    (_rows("0,0,1,1.5,Weibull,0,2"), 2, "column 'iat_shape': '0' must be > 0"),
    (_rows("0,0,0,1.5,Gamma,0.5,2"), 2, "column 'rate': '0' must be > 0"),
    (_rows(_busy(0, 0, 1.0), _busy(0, 0, 1.0)), 3, "client 0 window 0 s appears twice"),
    (_rows(), 2, "no windows after the header"),
    ([], 1, "empty file"),
]


@pytest.mark.parametrize(("lines", "line_no", "reason"), ARRIVAL_ERRORS)
def test_every_bad_arrivals_row_names_file_line_and_column(
    lines: list[str], line_no: int, reason: str
) -> None:
    """A bad arrivals file is a TraceError naming the file, the line and what is wrong."""
    with pytest.raises(TraceError) as caught:
        _draw({"data/arrivals_language_m-a.csv": lines})
    assert caught.value.source == "data/arrivals_language_m-a.csv"
    assert caught.value.line_no == line_no
    assert reason in caught.value.reason


QUANTILE_ERRORS = [
    (["model,client\n"], 1, "header must be"),
    (
        [QUANTILES_HEADER, "m-a,0,0,input_tokens,10,5,4,20,30\n"],
        2,
        "column 'p90': 4 is below 'p50'",
    ),
    ([QUANTILES_HEADER, "m-a,0,0,input_tokens,99,5,8,20,30\n"], 2, "column 'mean': 99 is above"),
    ([QUANTILES_HEADER, "m-a,0,60,input_tokens,10,5,8,20,30\n"], 2, "not a multiple of the 21600"),
    ([QUANTILES_HEADER, "m-a,0,0,input_tokens,10,five,8,20,30\n"], 2, "column 'p50': 'five'"),
    ([QUANTILES_HEADER, "m-a,0,0,,10,5,8,20,30\n"], 2, "column 'field' is empty"),
    (
        [
            QUANTILES_HEADER,
            "m-a,0,0,input_tokens,10,5,8,20,30\n",
            "m-a,0,0,input_tokens,10,5,8,20,30\n",
        ],
        3,
        "field 'input_tokens' appears twice",
    ),
]


@pytest.mark.parametrize(("lines", "line_no", "reason"), QUANTILE_ERRORS)
def test_every_bad_quantile_row_names_file_line_and_column(
    lines: list[str], line_no: int, reason: str
) -> None:
    """A bad derived_length_quantiles.csv is a TraceError naming file, line and column."""
    with pytest.raises(TraceError) as caught:
        read_lengths({"d/derived_length_quantiles.csv": lines}, models={"m-a"})
    assert caught.value.source == "d/derived_length_quantiles.csv"
    assert caught.value.line_no == line_no
    assert reason in caught.value.reason


def _record(**fields: object) -> str:
    return json.dumps({"client": 0, "window_start_s": 0, **fields}) + "\n"


JSONL_ERRORS = [
    (["{not json\n"], 1, "not valid JSON"),
    (["[1, 2]\n"], 1, "expected a JSON object"),
    ([json.dumps({"client": -1, "window_start_s": 0}) + "\n"], 1, "key 'client'"),
    ([_record(input_tokens={"5": 1.0}, output_tokens={"3": 1.5})], 1, "probability of '3'"),
    ([_record(input_tokens={"5": 0.5}, output_tokens={"3": 1.0})], 1, "sum to 0.5000"),
    ([_record(input_tokens={"a": 1.0}, output_tokens={"3": 1.0})], 1, "value 'a' is not a number"),
    ([_record(input_tokens={"5": 1.0})], 1, "needs 'output_tokens'"),
    ([_record(input_tokens=[5], output_tokens={"3": 1.0})], 1, "key 'input_tokens'"),
    (
        [
            "\n",
            _record(input_tokens={"5": 1.0}, output_tokens={"3": 1.0}) * 1,
            _record(input_tokens={"5": 1.0}, output_tokens={"3": 1.0}),
        ],
        3,
        "appears twice",
    ),
]


@pytest.mark.parametrize(("lines", "line_no", "reason"), JSONL_ERRORS)
def test_every_bad_lengths_record_names_file_line_and_key(
    lines: list[str], line_no: int, reason: str
) -> None:
    """A bad lengths_*.jsonl is a TraceError naming file, line and key."""
    with pytest.raises(TraceError) as caught:
        read_lengths({"d/lengths_reason_m-a.jsonl": lines}, models={"m-a"})
    assert caught.value.source == "d/lengths_reason_m-a.jsonl"
    assert caught.value.line_no == line_no
    assert reason in caught.value.reason


def test_an_unknown_lengths_file_name_is_refused() -> None:
    """Lengths files are told apart by name; any other name is a mistake, not ignored."""
    with pytest.raises(ValueError, match="not a servegen lengths file"):
        read_lengths({"lengths.csv": []}, models={"m-a"})


# --- draws --------------------------------------------------------------------------------------


def test_same_seed_same_arrivals_other_seed_others() -> None:
    """Draws come only from the generator passed in."""
    assert _draw(SMALL, seed=3) == _draw(SMALL, seed=3)
    assert _draw(SMALL, seed=3) != _draw(SMALL, seed=4)


@pytest.mark.parametrize(
    ("dist", "shape"),
    [("Gamma", 1.0), ("Gamma", 0.1), ("Weibull", 0.4), ("Weibull", 2.0)],
)
def test_drawn_count_matches_the_rates(dist: str, shape: float) -> None:
    """Over many windows the count is within 5% of sum(rate x 600), bursty laws included."""
    rates = [0.2 + 0.1 * (w % 7) for w in range(300)]
    lines = _rows(*(_busy(w % 3, w * 600, rate, dist, shape) for w, rate in enumerate(rates)))
    expected = sum(rates) * WINDOW_S
    drawn = len(_draw({"arrivals_language_m-a.csv": lines}, seed=1))
    assert abs(drawn - expected) / expected < 0.05, (drawn, expected)


def test_load_scale_thins_the_rates_and_keeps_the_clock() -> None:
    """load_scale multiplies rates; arrivals stay inside the same windows."""
    lines = _rows(*(_busy(0, w * 600, 2.0) for w in range(20)))
    full = _draw({"arrivals_language_m-a.csv": lines})
    tenth = _draw({"arrivals_language_m-a.csv": lines}, load_scale=0.1)
    assert abs(len(tenth) / len(full) - 0.1) < 0.02
    assert tenth[-1].arrival_s > 18 * 600
    by_model = _draw({"arrivals_language_m-a.csv": lines}, load_scale_by_model={"m-a": 0.1})
    assert abs(len(by_model) / len(full) - 0.1) < 0.02
    # A model without a file is no error here: a scenario may replay a subset of its models.
    subset = _draw({"arrivals_language_m-a.csv": lines}, load_scale_by_model={"m-b": 0.1})
    assert len(subset) == len(full)


def test_window_selects_and_rebases() -> None:
    """Only windows overlapping window_s are drawn; times count from its start."""
    lines = _rows(*(_busy(0, w * 600, 1.0) for w in range(10)))
    arrivals = _draw({"arrivals_language_m-a.csv": lines}, window_s=(900.0, 2100.0))
    times = [a.arrival_s for a in arrivals]
    assert min(times) >= 0
    assert max(times) < 1200
    # 1,200 s at 1 req/s, minus noise.
    assert 900 < len(arrivals) < 1500
    with pytest.raises(ValueError, match="no arrivals drawn in window"):
        _draw({"arrivals_language_m-a.csv": lines}, window_s=(7200.0, 9000.0))


def test_clients_and_top_clients() -> None:
    """`clients` keeps the ids named; `top_clients` each model's busiest in the window."""
    lines = _rows(_busy(0, 0, 0.1), _busy(1, 0, 2.0), _busy(2, 0, 1.0), _busy(0, 600, 5.0))
    files = {"arrivals_language_m-a.csv": lines}
    assert {a.tenant for a in _draw(files, clients=[2])} == {"m-a/2"}
    assert {a.tenant for a in _draw(files, top_clients=2)} == {"m-a/0", "m-a/1"}
    in_first = _draw(files, top_clients=2, window_s=(0.0, 600.0))
    assert {a.tenant for a in in_first} == {"m-a/1", "m-a/2"}
    with pytest.raises(ValueError, match=re.escape("clients [7]")):
        _draw(files, clients=[7])


def test_too_many_expected_arrivals_are_refused_before_drawing() -> None:
    """Above the cap nothing is drawn, and the message names window_s and load_scale."""
    lines = _rows(*(_busy(0, w * 600, 1000.0) for w in range(2016)))
    with pytest.raises(ValueError, match=r"window_s.*load_scale") as caught:
        _draw({"arrivals_language_m-a.csv": lines})
    assert "1,209,600,000" in str(caught.value)
    small = _draw({"arrivals_language_m-a.csv": lines}, window_s=(0.0, 60.0), load_scale=0.01)
    assert 0 < len(small) < 2000


# --- lengths ------------------------------------------------------------------------------------

QUANTILES = [
    QUANTILES_HEADER,
    "m-a,0,0,input_tokens,300,200,500,900,1000\n",
    "m-a,0,0,output_tokens,80,50,150,300,400\n",
    "other,0,0,input_tokens,1,1,1,1,1\n",
]


def test_lengths_from_quantiles_stay_in_range() -> None:
    """Quantile laws give tokens in [1, max] with the median near p50; an unknown client draws
    from the model's pool."""
    files = {"arrivals_language_m-a.csv": _rows(*(_busy(c, 0, 3.0) for c in (0, 5)))}
    arrivals = parse_servegen(
        files, {"derived_length_quantiles.csv": QUANTILES}, rng=np.random.default_rng(0)
    )
    tokens_in = np.array([a.tokens_in for a in arrivals], dtype=float)
    tokens_out = np.array([a.tokens_out for a in arrivals], dtype=float)
    assert tokens_in.min() >= 1
    assert tokens_in.max() <= 1000
    assert tokens_out.min() >= 1
    assert tokens_out.max() <= 400
    assert 170 < np.median(tokens_in) < 230
    pooled = [a for a in arrivals if a.tenant == "m-a/5"]
    assert pooled
    assert all(a.tokens_in is not None and a.tokens_in <= 1000 for a in pooled)


def test_lengths_from_jsonl_win_and_sum_modalities() -> None:
    """A model's lengths_*.jsonl wins over the quantiles; per-modality inputs are summed."""
    record = _record(
        text_tokens={"100": 0.5, "200": 0.5},
        image_tokens={"1000": 1.0},
        output_tokens={"7": 0.25, "9": 0.75},
        image_count={"1": 1.0},
    )
    files = {"arrivals_multimodal_m-a.csv": _rows(_busy(0, 0, 2.0))}
    arrivals = parse_servegen(
        files,
        {"lengths_multimodal_m-a.jsonl": [record], "derived_length_quantiles.csv": QUANTILES},
        rng=np.random.default_rng(0),
    )
    assert {a.tokens_in for a in arrivals} == {1100, 1200}
    outs = Counter(a.tokens_out for a in arrivals)
    assert set(outs) == {7, 9}
    assert outs[9] > outs[7]


def test_no_lengths_leaves_tokens_unknown() -> None:
    """A model with no lengths file keeps tokens None (a token service model then refuses)."""
    assert all(a.tokens_in is None for a in _draw(SMALL))


# --- load_trace and scenarios ----------------------------------------------------------------


def test_load_trace_dispatches_servegen() -> None:
    """load_trace takes the first arrivals file as lines, the rest by name, and windows early."""
    arrivals = load_trace(
        TraceFormat.SERVEGEN,
        SMALL["arrivals_language_m-a.csv"],
        source="arrivals_language_m-a.csv",
        extra_files={"arrivals_reason_r1.csv": _rows(_busy(0, 0, 0.5))},
        rng=np.random.default_rng(0),
        window_s=(0.0, 600.0),
    )
    assert {a.job_type for a in arrivals} == {"m-a", "r1"}
    assert max(a.arrival_s for a in arrivals) < 600
    with pytest.raises(ValueError, match="seeded rng"):
        load_trace(
            TraceFormat.SERVEGEN, SMALL["arrivals_language_m-a.csv"], source="arrivals_l_m.csv"
        )
    with pytest.raises(ValueError, match="only apply to servegen"):
        load_trace(TraceFormat.GENERIC_CSV, ["arrival_s,job_type\n"], extra_files={})


def _scenario(path: object = None) -> dict[str, object]:
    tokens = {"kind": "tokens", "a_s": 0.01, "b_s_per_token_in": 0.0001, "c_s_per_token_out": 0.001}
    trace: dict[str, object] = {
        "format": "servegen",
        "window_s": [0, 1800],
        "load_scale": 0.5,
        "load_scale_by_model": {"r1": 2.0},
        "target_utilization": 0.6,
    }
    if path is not None:
        trace["path"] = path
    return {
        "name": "sg",
        "queues": [
            {"name": "a", "job_types": ["m-a"], "service": tokens, "model_load_s": 5.0},
            {"name": "r", "job_types": ["r1"], "service": tokens, "model_load_s": 10.0},
        ],
        "allocation": {"policy": "proportional", "budget": 4},
        "workload": {"trace": trace},
    }


def _write_trace(directory: Path) -> None:
    directory.mkdir(exist_ok=True)
    (directory / "arrivals_language_m-a.csv").write_text(
        "".join(SMALL["arrivals_language_m-a.csv"])
    )
    (directory / "arrivals_reason_r1.csv").write_text(
        "".join(_rows(_busy(3, 0, 0.4), _busy(3, 600, 0.4)))
    )
    (directory / "derived_length_quantiles.csv").write_text("".join(QUANTILES))
    (directory / "lengths_reason_r1.jsonl").write_text(
        _record(input_tokens={"10": 1.0}, output_tokens={"20": 1.0}).replace(
            '"client": 0', '"client": 3'
        )
    )


def test_prepare_builds_one_queue_per_model(tmp_path: Path) -> None:
    """prepare() on self-written files: both models arrive, with tokens, scaled to the target."""
    _write_trace(tmp_path)
    scenario = parse_scenario(yaml.safe_dump(_scenario()))
    files = {
        str(tmp_path / name): (tmp_path / name).read_text().splitlines(keepends=True)
        for name in (
            "arrivals_reason_r1.csv",
            "derived_length_quantiles.csv",
            "lengths_reason_r1.jsonl",
        )
    }
    first = tmp_path / "arrivals_language_m-a.csv"
    run = prepare(
        scenario,
        7,
        trace_lines=first.read_text().splitlines(True),
        trace_source=str(first),
        extra_files=files,
    )
    a = run.jobs.arrivals
    assert set(a.job_types) == {"m-a", "r1"}
    r1 = a.job_types.index("r1")
    assert np.all(a.tokens_out[a.type_idx == r1] == 20)
    assert not np.any(np.isnan(a.tokens_in))
    span_s = float(a.arrival_s[-1] - a.arrival_s[0])
    offered = float(run.jobs.service_s.sum()) / span_s / 4
    assert abs(offered - 0.6) < 1e-6
    again = prepare(
        scenario,
        7,
        trace_lines=first.read_text().splitlines(True),
        trace_source=str(first),
        extra_files=files,
    )
    assert np.array_equal(again.jobs.arrivals.arrival_s, a.arrival_s)


def test_servegen_only_options_are_refused_elsewhere() -> None:
    """A list of paths or a servegen option on another format is a scenario error."""
    data = _scenario(["a.csv", "b.csv"])
    data["workload"] = {"trace": {"format": "mooncake", "path": ["a", "b"], "top_clients": 3}}
    with pytest.raises(ValueError, match="servegen only") as caught:
        parse_scenario(yaml.safe_dump(data))
    assert "workload.trace.path" in str(caught.value)
    assert "workload.trace.top_clients" in str(caught.value)
    typo = _scenario()
    typo["workload"]["trace"]["load_scale_by_model"] = {"r2": 2.0}  # type: ignore[index]
    with pytest.raises(ValueError, match="no queue serves this model"):
        parse_scenario(yaml.safe_dump(typo))


def test_simulate_takes_a_directory_or_the_scenario_paths(tmp_path: Path) -> None:
    """--trace DIR finds the listed files and the lengths beside them; so does a path list."""
    app = typer.Typer()
    register(app)
    _write_trace(tmp_path / "data")
    scenario = tmp_path / "sg.yaml"
    names = ["arrivals_language_m-a.csv", "arrivals_reason_r1.csv"]
    scenario.write_text(yaml.safe_dump(_scenario(names)))
    result = CliRunner().invoke(
        app, ["simulate", "--scenario", str(scenario), "--trace", str(tmp_path / "data"), "--json"]
    )
    assert result.exit_code == 0, result.output
    jobs = json.loads(result.stdout)["jobs"]
    assert jobs > 100
    scenario.write_text(yaml.safe_dump(_scenario([f"data/{name}" for name in names])))
    result = CliRunner().invoke(app, ["simulate", "--scenario", str(scenario), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["jobs"] == jobs
    (tmp_path / "empty").mkdir()
    missing = CliRunner().invoke(
        app, ["simulate", "--scenario", str(scenario), "--trace", str(tmp_path / "empty")]
    )
    assert missing.exit_code == 2
    assert "alibaba/ServeGen" in missing.output


def test_the_real_files_when_present() -> None:
    """The shipped scenario's day of the real ServeGen files: counts follow the rates, lengths
    stay inside each client's quantile range."""
    if not REAL_DIR.is_dir():
        pytest.skip(f"the ServeGen files are not at {REAL_DIR}: real-data check not run")
    files = {
        name: (REAL_DIR / name).read_text().splitlines(True)
        for name in ("arrivals_language_m-small.csv", "arrivals_reason_deepseek-r1.csv")
    }
    lengths = {
        name: (REAL_DIR / name).read_text().splitlines(True)
        for name in ("derived_length_quantiles.csv", "lengths_reason_deepseek-r1.jsonl")
    }
    arrivals = parse_servegen(
        files,
        lengths,
        rng=np.random.default_rng(0),
        window_s=(0.0, 86_400.0),
        load_scale=1e-4,
        load_scale_by_model={"deepseek-r1": 10.0},
    )
    counts = Counter(a.job_type for a in arrivals)
    # The first day's requests at raw rates, measured from the files: ~85.1 M and ~1.38 M.
    assert abs(counts["m-small"] - 8509) / 8509 < 0.1, counts
    assert abs(counts["deepseek-r1"] - 1384) / 1384 < 0.15, counts
    assert all(a.tokens_in is not None and a.tokens_out is not None for a in arrivals)


def test_the_gym_env_replays_every_model(tmp_path: Path) -> None:
    """AllocationEnv takes the first arrivals file by name and the others as extra files."""
    _write_trace(tmp_path)
    others = ("arrivals_reason_r1.csv", "derived_length_quantiles.csv", "lengths_reason_r1.jsonl")
    first = tmp_path / "arrivals_language_m-a.csv"
    env = AllocationEnv(
        yaml.safe_dump(_scenario()),
        trace_lines=first.read_text().splitlines(True),
        trace_source=str(first),
        trace_extra_files={
            str(tmp_path / name): (tmp_path / name).read_text().splitlines(True) for name in others
        },
    )
    env.reset(seed=0)
    assert env.run is not None
    assert set(env.run.jobs.arrivals.job_types) == {"m-a", "r1"}
