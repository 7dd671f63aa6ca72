"""Trace replay adapters: each format parsed from a small file the test writes itself."""

from __future__ import annotations

import json
import pickle
import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from policies.sim import traces
from policies.sim.arrivals import Arrival
from policies.sim.traces import (
    OTHER_JOB_TYPE,
    TraceError,
    TraceFormat,
    load_trace,
    mooncake_prefix_ids,
    offered_utilization,
    parse_azure_functions,
    parse_azure_llm,
    parse_generic_csv,
    parse_mooncake,
    scale_time,
    scale_to_utilization,
    select_window,
)


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _lines(path: Path) -> list[str]:
    # The caller opens the file (policies/ does no I/O); a list keeps the tests free of open handles.
    with path.open() as handle:
        return handle.readlines()


def _times(arrivals: list[Arrival]) -> list[float]:
    return [arrival.arrival_s for arrival in arrivals]


# Hash-like ids in the shape of the Azure Functions files (64 hex characters).
def _hash(tag: str) -> str:
    return (tag * 64)[:64]


OWNER_A, OWNER_B = _hash("a1"), _hash("b2")
APP_A, APP_B = _hash("c3"), _hash("d4")
FN_HTTP, FN_TIMER, FN_QUEUE, FN_IDLE = _hash("e5"), _hash("f6"), _hash("07"), _hash("18")


def _published_inv(rows: list[tuple[str, str, str, str, list[int]]]) -> str:
    """An invocations file in the published layout: ids, Trigger, minute columns '1'..'N'."""
    minutes = len(rows[0][4])
    header = ["HashOwner", "HashApp", "HashFunction", "Trigger"] + [
        str(m) for m in range(1, minutes + 1)
    ]
    body = [",".join([*row[:4], *map(str, row[4])]) for row in rows]
    return "\n".join([",".join(header), *body]) + "\n"


def _invitro_inv(rows: list[tuple[str, str, str, list[int]]]) -> str:
    """An invocations file in invitro's layout: function first, no Trigger, 'minute_1'.."""
    minutes = len(rows[0][3])
    header = ["HashFunction", "HashApp", "HashOwner"] + [
        f"minute_{m}" for m in range(1, minutes + 1)
    ]
    body = [",".join([row[2], row[1], row[0], *map(str, row[3])]) for row in rows]
    return "\n".join([",".join(header), *body]) + "\n"


RUN_HEADER = (
    "HashFunction,HashApp,HashOwner,Count,Average,Minimum,Maximum,percentile_Average_0,"
    "percentile_Average_1,percentile_Average_25,percentile_Average_50,percentile_Average_75,"
    "percentile_Average_99,percentile_Average_100"
)


def _run_row(owner: str, app: str, function: str, percentiles_ms: list[float]) -> str:
    stats = [100, sum(percentiles_ms) / len(percentiles_ms), percentiles_ms[0], percentiles_ms[-1]]
    return ",".join([function, app, owner, *map(str, stats), *map(str, percentiles_ms)])


# Three busy functions over four minutes, and one that never fires in the window.
PUBLISHED_ROWS = [
    (OWNER_A, APP_A, FN_HTTP, "http", [3, 0, 5, 2]),
    (OWNER_A, APP_A, FN_TIMER, "timer", [1, 1, 1, 1]),
    (OWNER_B, APP_B, FN_QUEUE, "queue", [0, 7, 0, 0]),
    (OWNER_B, APP_B, FN_IDLE, "http", [0, 0, 0, 9]),
]
# Percentile points 0, 1, 25, 50, 75, 99, 100 in ms, as the real durations file has them.
DURATIONS_MS = {
    FN_HTTP: [100.0, 110.0, 200.0, 300.0, 400.0, 900.0, 1000.0],
    FN_TIMER: [5000.0, 5000.0, 5000.0, 5000.0, 5000.0, 5000.0, 5000.0],
    FN_QUEUE: [10.0, 10.0, 20.0, 40.0, 80.0, 160.0, 170.0],
    FN_IDLE: [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
}
OWNERS = {FN_HTTP: (OWNER_A, APP_A), FN_TIMER: (OWNER_A, APP_A)} | {
    FN_QUEUE: (OWNER_B, APP_B),
    FN_IDLE: (OWNER_B, APP_B),
}


def _run_file(functions: list[str]) -> str:
    rows = [_run_row(*OWNERS[fn], fn, DURATIONS_MS[fn]) for fn in functions]
    return "\n".join([RUN_HEADER, *rows]) + "\n"


class TestPublicApi:
    def test_exported_members(self) -> None:
        """The module exports exactly its documented public API, and every name exists."""
        assert set(traces.__all__) == {
            "DEFAULT_MAX_JOB_TYPES",
            "MAX_TARGET_UTILIZATION",
            "OTHER_JOB_TYPE",
            "JobTypeBy",
            "TraceError",
            "TraceFormat",
            "load_trace",
            "mooncake_prefix_ids",
            "offered_utilization",
            "parse_azure_functions",
            "parse_azure_llm",
            "parse_generic_csv",
            "parse_mooncake",
            "scale_time",
            "scale_to_utilization",
            "select_window",
        }
        assert all(hasattr(traces, name) for name in traces.__all__)

    def test_format_values(self) -> None:
        """Format values are the strings scenario files spell, and the enum is a str."""
        assert [member.value for member in TraceFormat] == [
            "generic_csv",
            "azure_llm_2023",
            "mooncake",
            "azure_functions_2019",
            "servegen",
        ]
        assert TraceFormat("mooncake") == "mooncake"

    def test_trace_error_names_source_and_line(self) -> None:
        """TraceError formats `source line N: reason`, keeps the parts, and survives pickling."""
        error = TraceError("trace.csv", 17, "column 'arrival_s': 'abc' is not a number")
        assert str(error) == "trace.csv line 17: column 'arrival_s': 'abc' is not a number"
        assert isinstance(error, ValueError)
        copy = pickle.loads(pickle.dumps(error))
        assert (copy.source, copy.line_no, copy.reason) == ("trace.csv", 17, error.reason)
        assert str(copy) == str(error)


class TestGenericCsv:
    def test_parses_every_column(self, tmp_path: Path) -> None:
        """All optional columns land in the Arrival fields with their types."""
        path = _write(
            tmp_path,
            "trace.csv",
            "arrival_s,job_type,service_s,tokens_in,tokens_out,tenant,priority,deadline_s\n"
            "1.5,embed,0.25,512,0,acme,2,3.0\n"
            "2.0,chat,,,,,,\n",
        )
        assert parse_generic_csv(_lines(path), source="trace.csv") == [
            Arrival(0.0, "embed", 0.25, 512, 0, "acme", 2, 3.0),
            Arrival(0.5, "chat"),
        ]

    def test_sorts_and_rebases(self, tmp_path: Path) -> None:
        """Out-of-order rows are sorted (ties keep file order) and the first arrival is at 0."""
        path = _write(
            tmp_path,
            "trace.csv",
            "job_type,arrival_s\nc,30\na,10\nb,10\nd,12.5\n",
        )
        arrivals = parse_generic_csv(_lines(path))
        assert [(a.arrival_s, a.job_type) for a in arrivals] == [
            (0.0, "a"),
            (0.0, "b"),
            (2.5, "d"),
            (20.0, "c"),
        ]

    def test_blank_lines_are_skipped(self, tmp_path: Path) -> None:
        """Blank lines (such as a trailing one) carry no arrival."""
        path = _write(tmp_path, "trace.csv", "arrival_s,job_type\n\n0,a\n\n1,b\n\n")
        assert len(parse_generic_csv(_lines(path))) == 2

    def test_malformed_cell_names_line_and_column(self, tmp_path: Path) -> None:
        """A bad number is reported at its physical line, blank lines counted."""
        path = _write(tmp_path, "trace.csv", "arrival_s,job_type\n0,a\n\n1,b\nabc,c\n")
        with pytest.raises(TraceError) as info:
            parse_generic_csv(_lines(path), source="trace.csv")
        assert str(info.value) == "trace.csv line 5: column 'arrival_s': 'abc' is not a number"
        assert info.value.line_no == 5

    @pytest.mark.parametrize(
        ("row", "message"),
        [
            ("nan,a,,,", "column 'arrival_s': 'nan' is not a finite number"),
            ("-1,a,,,", "column 'arrival_s': '-1' is negative"),
            ("1,a,inf,,", "column 'service_s': 'inf' is not a finite number"),
            ("1,a,,1.5,", "column 'tokens_in': '1.5' is not an integer"),
            ("1,a,,-3,", "column 'tokens_in': '-3' is negative"),
            ("1,a,,,x", "column 'priority': 'x' is not an integer"),
            (",a,,,", "column 'arrival_s' is empty"),
            ("1,,,,", "column 'job_type' is empty"),
            ("1,a,2", "expected 5 fields as in the header, got 3"),
        ],
    )
    def test_bad_cells(self, tmp_path: Path, row: str, message: str) -> None:
        """NaN, negative, non-integer, empty-required and short rows are errors at their line."""
        path = _write(
            tmp_path, "t.csv", f"arrival_s,job_type,service_s,tokens_in,priority\n0,a,,,\n{row}\n"
        )
        with pytest.raises(TraceError, match=r"^t\.csv line 3: ") as info:
            parse_generic_csv(_lines(path), source="t.csv")
        assert info.value.reason == message

    def test_negative_priority_is_allowed(self) -> None:
        """Priority orders jobs, so any integer is accepted."""
        assert parse_generic_csv(["arrival_s,job_type,priority\n", "0,a,-2\n"])[0].priority == -2

    def test_unknown_columns_are_named(self) -> None:
        """A misspelt optional column is refused, naming it, rather than silently dropped."""
        with pytest.raises(TraceError, match=r"^t.csv line 1: unknown column\(s\) 'servce_s'"):
            parse_generic_csv(["arrival_s,job_type,servce_s\n", "0,a,1\n"], source="t.csv")

    def test_missing_required_columns_are_named(self) -> None:
        """A header without job_type is refused, naming the column."""
        with pytest.raises(TraceError, match=r"line 1: missing required column\(s\) 'job_type'"):
            parse_generic_csv(["arrival_s,service_s\n", "0,1\n"])

    def test_duplicate_columns(self) -> None:
        """A column named twice is ambiguous and refused."""
        with pytest.raises(TraceError, match=r"duplicate column\(s\) 'arrival_s'"):
            parse_generic_csv(["arrival_s,job_type,arrival_s\n", "0,a,1\n"])

    def test_empty_input(self) -> None:
        """No lines at all is an error at line 1."""
        with pytest.raises(TraceError, match=r"^<trace> line 1: empty trace: no header row$"):
            parse_generic_csv([])

    def test_header_only(self) -> None:
        """A header with no rows is an error pointing past the header."""
        with pytest.raises(TraceError, match=r"^x line 2: trace has no arrivals"):
            parse_generic_csv(["arrival_s,job_type\n"], source="x")


LLM_HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens\n"


class TestAzureLlm:
    def test_parses_seven_fractional_digits(self, tmp_path: Path) -> None:
        """100 ns timestamps parse exactly; tokens are set, service time is left to the model."""
        path = _write(
            tmp_path,
            "AzureLLMInferenceTrace_code.csv",
            LLM_HEADER + "2023-11-16 18:17:03.9799600,4808,10\n"
            "2023-11-16 18:17:04.0319600,3180,8\n"
            "2023-11-16 18:18:04,100,1\n",
        )
        arrivals = parse_azure_llm(_lines(path), job_type="code")
        assert _times(arrivals) == pytest.approx([0.0, 0.052, 60.02004], abs=1e-9)
        assert arrivals[0] == Arrival(0.0, "code", None, 4808, 10)
        assert {a.job_type for a in arrivals} == {"code"}
        assert all(a.service_s is None for a in arrivals)

    def test_crosses_midnight_and_sorts(self) -> None:
        """Times are absolute: a row across midnight and out of order lands in place."""
        lines = [
            LLM_HEADER,
            "2023-11-17 00:00:01.5,1,1\n",
            "2023-11-16 23:59:59.5,2,2\n",
        ]
        arrivals = parse_azure_llm(lines, job_type="conv")
        assert _times(arrivals) == pytest.approx([0.0, 2.0])
        assert [a.tokens_in for a in arrivals] == [2, 1]

    @pytest.mark.parametrize(
        ("row", "reason"),
        [
            ("16/11/2023 18:17:03,1,1", "is not a timestamp like"),
            ("2023-02-30 18:17:03.1,1,1", "day is out of range for month"),
            ("2023-11-16 18:17:03.1,many,1", "column 'ContextTokens': 'many' is not an integer"),
            ("2023-11-16 18:17:03.1,1", "expected 3 fields"),
        ],
    )
    def test_malformed_row_names_line(self, row: str, reason: str) -> None:
        """Unparseable timestamps, impossible dates and bad counts are errors at their line."""
        lines = [LLM_HEADER, "2023-11-16 18:17:03.0,1,1\n", row + "\n"]
        with pytest.raises(TraceError, match=f"^code.csv line 3: .*{reason}"):
            parse_azure_llm(lines, job_type="code", source="code.csv")

    def test_missing_column(self) -> None:
        """A file without GeneratedTokens is refused, naming it."""
        with pytest.raises(TraceError, match=r"missing required column\(s\) 'GeneratedTokens'"):
            parse_azure_llm(["TIMESTAMP,ContextTokens\n", "2023-11-16 18:00:00,1\n"], job_type="c")

    def test_job_type_required(self) -> None:
        """An empty job type is an option error, not a trace error."""
        with pytest.raises(ValueError, match="job_type"):
            parse_azure_llm([LLM_HEADER, "2023-11-16 18:00:00,1,1\n"], job_type="")


def _mooncake_line(timestamp_ms: float, tokens_in: int, tokens_out: int, ids: list[int]) -> str:
    record = {
        "timestamp": timestamp_ms,
        "input_length": tokens_in,
        "output_length": tokens_out,
        "hash_ids": ids,
    }
    return json.dumps(record) + "\n"


class TestMooncake:
    def test_parses_milliseconds_and_tokens(self, tmp_path: Path) -> None:
        """Millisecond timestamps become seconds from the first; lengths become token counts."""
        path = _write(
            tmp_path,
            "conversation_trace.jsonl",
            _mooncake_line(1000, 6758, 500, [0, 1, 2])
            + _mooncake_line(1000, 7322, 490, [0, 14])
            + _mooncake_line(4500, 7236, 794, [0, 28, 29]),
        )
        arrivals = parse_mooncake(_lines(path))
        assert arrivals == [
            Arrival(0.0, "mooncake", None, 6758, 500),
            Arrival(0.0, "mooncake", None, 7322, 490),
            Arrival(3.5, "mooncake", None, 7236, 794),
        ]
        assert parse_mooncake(_lines(path), job_type="kimi")[0].job_type == "kimi"

    def test_prefix_ids_align_with_sorted_arrivals(self) -> None:
        """mooncake_prefix_ids follows parse_mooncake's time order, ties in file order."""
        lines = [
            _mooncake_line(900, 3, 1, [7, 8]),
            _mooncake_line(100, 1, 1, [0, 1]),
            _mooncake_line(900, 4, 1, [7, 9]),
            json.dumps({"timestamp": 50, "input_length": 2, "output_length": 1}) + "\n",
        ]
        arrivals = parse_mooncake(lines)
        prefixes = mooncake_prefix_ids(lines)
        assert [a.tokens_in for a in arrivals] == [2, 1, 3, 4]
        assert prefixes == [(), (0, 1), (7, 8), (7, 9)]

    @pytest.mark.parametrize(
        ("line", "reason"),
        [
            ('{"timestamp": 5, "input_length": 1\n', "not valid JSON"),
            ("[1, 2]\n", "expected a JSON object, got list"),
            ('{"timestamp": 5, "input_length": 1}\n', "missing required key(s) 'output_length'"),
            (
                '{"timestamp": 5, "input_length": 1, "output_length": 1, "model": "k"}\n',
                "unknown key(s) 'model'",
            ),
            (
                '{"timestamp": -5, "input_length": 1, "output_length": 1}\n',
                "key 'timestamp': -5 is negative",
            ),
            (
                '{"timestamp": NaN, "input_length": 1, "output_length": 1}\n',
                "key 'timestamp': nan is not a finite number",
            ),
            (
                '{"timestamp": 5, "input_length": 1.5, "output_length": 1}\n',
                "key 'input_length': 1.5 is not an integer",
            ),
            (
                '{"timestamp": 5, "input_length": 1, "output_length": 1, "hash_ids": [1, "a"]}\n',
                "key 'hash_ids': 'a' is not an integer",
            ),
        ],
    )
    def test_malformed_record_names_line(self, line: str, reason: str) -> None:
        """Bad JSON, missing or unknown keys and bad values are errors at their line."""
        lines = [_mooncake_line(0, 1, 1, [0]), "\n", line]
        with pytest.raises(TraceError) as info:
            parse_mooncake(lines, source="m.jsonl")
        assert (info.value.source, info.value.line_no) == ("m.jsonl", 3)
        assert info.value.reason.startswith(reason)

    def test_empty_trace(self) -> None:
        """Blank lines only is an error."""
        with pytest.raises(TraceError, match="empty trace"):
            parse_mooncake(["\n", "  \n"])


class TestAzureFunctions:
    def _parse(
        self, tmp_path: Path, seed: int = 7, with_run: bool = True, **options: Any
    ) -> list[Arrival]:
        inv = _write(tmp_path, "d01_inv.csv", _published_inv(PUBLISHED_ROWS))
        run = _write(tmp_path, "d01_run.csv", _run_file(list(DURATIONS_MS)))
        return parse_azure_functions(
            _lines(inv),
            _lines(run) if with_run else None,
            rng=np.random.default_rng(seed),
            **options,
        )

    def test_one_arrival_per_invocation_inside_its_minute(self) -> None:
        """Every count becomes that many arrivals, each inside its own minute, sorted."""
        # A burst in minute 0 pins the first arrival (what rebasing moves to 0) to within
        # milliseconds of the minute's start, so minute m is [60 m, 60 m + 60) after rebasing.
        burst = (OWNER_B, APP_B, _hash("9a"), "event", [20_000, 0, 0, 0])
        inv = _published_inv([*PUBLISHED_ROWS, burst]).splitlines()
        arrivals = parse_azure_functions(inv, rng=np.random.default_rng(7))
        assert len(arrivals) == 30 + 20_000
        assert _times(arrivals) == sorted(_times(arrivals))
        assert arrivals[0].arrival_s == 0.0
        by_minute_type = Counter(
            (a.job_type, int(a.arrival_s // 60)) for a in arrivals if a.job_type != "event"
        )
        assert by_minute_type == {
            ("http", 0): 3,
            ("http", 2): 5,
            ("http", 3): 2 + 9,
            ("timer", 0): 1,
            ("timer", 1): 1,
            ("timer", 2): 1,
            ("timer", 3): 1,
            ("queue", 1): 7,
        }
        assert all(a.service_s is None for a in arrivals)

    def test_same_seed_same_trace(self, tmp_path: Path) -> None:
        """The same seed gives identical arrivals; another seed gives other times."""
        assert self._parse(tmp_path, seed=3) == self._parse(tmp_path, seed=3)
        assert _times(self._parse(tmp_path, seed=3)) != _times(self._parse(tmp_path, seed=4))

    def test_service_from_percentiles(self, tmp_path: Path) -> None:
        """Durations follow each function's percentiles: bounds hold and medians come out right."""
        rows = [
            (OWNER_A, APP_A, FN_HTTP, "http", [4000, 0]),
            (OWNER_B, APP_B, FN_QUEUE, "queue", [0, 4000]),
        ]
        inv = _published_inv(rows).splitlines(keepends=True)
        run = _run_file([FN_QUEUE, FN_HTTP]).splitlines(keepends=True)
        arrivals = parse_azure_functions(inv, run, rng=np.random.default_rng(1))
        for job_type, fn in (("http", FN_HTTP), ("queue", FN_QUEUE)):
            service_s = np.array([a.service_s for a in arrivals if a.job_type == job_type])
            percentiles_s = np.array(DURATIONS_MS[fn]) / 1000.0
            assert len(service_s) == 4000
            assert percentiles_s[0] <= service_s.min() <= service_s.max() <= percentiles_s[-1]
            assert np.quantile(service_s, [0.25, 0.5, 0.75]) == pytest.approx(
                percentiles_s[2:5], rel=0.05
            )

    def test_constant_service_when_percentiles_are_flat(self, tmp_path: Path) -> None:
        """A function whose percentiles are all equal always takes exactly that long."""
        arrivals = self._parse(tmp_path)
        assert {a.service_s for a in arrivals if a.job_type == "timer"} == {5.0}

    def test_minutes_window(self, tmp_path: Path) -> None:
        """minutes=(1, 3) replays only the second and third minute columns."""
        arrivals = self._parse(tmp_path, minutes=(1, 3))
        assert Counter(a.job_type for a in arrivals) == {"http": 5, "timer": 2, "queue": 7}
        assert arrivals[-1].arrival_s < 120.0

    def test_top_functions_in_window(self, tmp_path: Path) -> None:
        """top_functions keeps the busiest functions inside the window and drops the rest."""
        arrivals = self._parse(tmp_path, top_functions=2, job_type_by="function")
        # Totals: http 10, idle 9, queue 7, timer 4.
        assert Counter(a.job_type for a in arrivals) == {
            "fn-" + FN_HTTP[:8]: 10,
            "fn-" + FN_IDLE[:8]: 9,
        }

    def test_group_by_app_and_tenant(self, tmp_path: Path) -> None:
        """job_type_by='app' names types by app; the tenant is the owner."""
        arrivals = self._parse(tmp_path, job_type_by="app")
        assert Counter((a.job_type, a.tenant) for a in arrivals) == {
            ("app-" + APP_A[:8], "owner-" + OWNER_A[:8]): 14,
            ("app-" + APP_B[:8], "owner-" + OWNER_B[:8]): 16,
        }

    def test_constant_job_type(self, tmp_path: Path) -> None:
        """job_type gives every arrival one type."""
        assert {a.job_type for a in self._parse(tmp_path, job_type="faas")} == {"faas"}

    def test_cardinality_cap_folds_into_other(self, tmp_path: Path) -> None:
        """Beyond max_job_types, the busiest keep their names and the rest become 'other'."""
        arrivals = self._parse(tmp_path, job_type_by="function", max_job_types=3)
        assert Counter(a.job_type for a in arrivals) == {
            "fn-" + FN_HTTP[:8]: 10,
            "fn-" + FN_IDLE[:8]: 9,
            OTHER_JOB_TYPE: 7 + 4,
        }

    def test_names_stay_distinct_when_hashes_share_a_prefix(self) -> None:
        """Function names grow past 8 characters until they are distinct."""
        twin_a, twin_b = "0123456789" + "a" * 54, "0123456789" + "b" * 54
        inv = _published_inv(
            [(OWNER_A, APP_A, twin_a, "http", [1]), (OWNER_A, APP_A, twin_b, "http", [1])]
        )
        arrivals = parse_azure_functions(
            inv.splitlines(), rng=np.random.default_rng(0), job_type_by="function"
        )
        assert {a.job_type for a in arrivals} == {"fn-0123456789a", "fn-0123456789b"}

    def test_invitro_layout_without_trigger(self, tmp_path: Path) -> None:
        """The invitro carrier's columns (function first, minute_N, no Trigger) parse too."""
        rows = [(o, a, f, counts) for o, a, f, _, counts in PUBLISHED_ROWS]
        inv = _write(tmp_path, "1000_inv.csv", _invitro_inv(rows))
        run = _write(tmp_path, "1000_run.csv", _run_file(list(DURATIONS_MS)))
        arrivals = parse_azure_functions(
            _lines(inv), _lines(run), rng=np.random.default_rng(0), job_type_by="function"
        )
        assert len(arrivals) == 30
        with pytest.raises(TraceError, match=r"^inv line 1: job_type_by='trigger' needs"):
            parse_azure_functions(_lines(inv), rng=np.random.default_rng(0), source="inv")

    def test_bad_count_names_line_and_column(self) -> None:
        """A non-integer or negative count is an error at its line, naming the minute column."""
        inv = _published_inv(PUBLISHED_ROWS).splitlines()
        inv[2] = inv[2].replace(",1,1,1,1", ",1,x,1,1")
        with pytest.raises(TraceError, match=r"^inv line 3: column '2': 'x' is not an integer$"):
            parse_azure_functions(inv, rng=np.random.default_rng(0), source="inv")
        inv[2] = inv[2].replace(",1,x,1,1", ",1,1,-1,1")
        with pytest.raises(TraceError, match=r"^inv line 3: column '3': '-1' is negative$"):
            parse_azure_functions(inv, rng=np.random.default_rng(0), source="inv")

    def test_header_problems(self) -> None:
        """Missing id columns, unknown columns and gaps in the minutes are refused by name."""
        rng = np.random.default_rng(0)
        with pytest.raises(TraceError, match=r"missing required column\(s\) 'HashApp'"):
            parse_azure_functions(["HashOwner,HashFunction,1\n", "o,f,1\n"], rng=rng)
        with pytest.raises(TraceError, match=r"unknown column\(s\) 'Region'"):
            parse_azure_functions(["HashOwner,HashApp,HashFunction,Region,1\n"], rng=rng)
        with pytest.raises(TraceError, match=r"without gaps; missing \[2\]"):
            parse_azure_functions(["HashOwner,HashApp,HashFunction,1,3\n"], rng=rng)

    def test_function_without_durations(self, tmp_path: Path) -> None:
        """A replayed function absent from the durations file is named at its inv line."""
        inv = _published_inv(PUBLISHED_ROWS).splitlines()
        run = _run_file([FN_HTTP, FN_TIMER, FN_IDLE]).splitlines()
        with pytest.raises(TraceError, match=rf"^inv line 4: function '{FN_QUEUE}' has no dur"):
            parse_azure_functions(inv, run, rng=np.random.default_rng(0), source="inv")

    def test_decreasing_percentiles_are_refused(self) -> None:
        """A durations row whose percentiles decrease is corrupt, reported at its line."""
        inv = _published_inv(PUBLISHED_ROWS[:1]).splitlines()
        bad = _run_row(OWNER_A, APP_A, FN_HTTP, [1, 2, 3, 2, 5, 6, 7])
        with pytest.raises(TraceError, match=r"^run line 2: percentile_Average_50 \(2 ms\)"):
            parse_azure_functions(
                inv, [RUN_HEADER, bad], rng=np.random.default_rng(0), run_source="run"
            )

    def test_no_invocations_in_window(self) -> None:
        """A window in which nothing fires is an error, not an empty replay."""
        inv = _published_inv([(OWNER_A, APP_A, FN_HTTP, "http", [0, 0, 3])]).splitlines()
        with pytest.raises(TraceError, match=r"no invocations in minutes \[0, 2\)"):
            parse_azure_functions(inv, rng=np.random.default_rng(0), minutes=(0, 2))

    @pytest.mark.parametrize(
        ("options", "message"),
        [
            ({"minutes": (3, 3)}, "minutes must satisfy"),
            ({"minutes": (0, 5)}, "minutes must satisfy"),
            ({"top_functions": 0}, "top_functions"),
            ({"max_job_types": 0}, "max_job_types"),
            ({"job_type_by": "owner"}, "job_type_by must be one of"),
            ({"job_type_by": "app", "job_type": "x"}, "not both"),
        ],
    )
    def test_bad_options(self, tmp_path: Path, options: dict[str, Any], message: str) -> None:
        """Out-of-range windows and caps, unknown groupings and conflicts are option errors."""
        with pytest.raises(ValueError, match=message) as info:
            self._parse(tmp_path, **options)
        assert not isinstance(info.value, TraceError)


def _arrivals(
    times_s: list[float], job_type: str = "a", service_s: float | None = None
) -> list[Arrival]:
    return [Arrival(t, job_type, service_s) for t in times_s]


class TestWindowAndScaling:
    def test_select_window_is_half_open_and_rebased(self) -> None:
        """[start, end) keeps its arrivals, sorted, with start mapped to 0."""
        arrivals = _arrivals([0.0, 5.0, 10.0, 15.0, 20.0])
        assert _times(select_window(arrivals, 5.0, 15.0)) == [0.0, 5.0]
        assert _times(select_window(list(reversed(arrivals)), 2.0, 12.0)) == [3.0, 8.0]
        assert select_window(arrivals, 21.0, 30.0) == []
        with pytest.raises(ValueError, match="start_s < end_s"):
            select_window(arrivals, 3.0, 3.0)

    def test_scale_time_scales_gaps(self) -> None:
        """A factor of 2 doubles every gap; service times are untouched."""
        arrivals = _arrivals([0.0, 1.0, 3.0], service_s=0.5)
        scaled = scale_time(arrivals, 2.0)
        assert _times(scaled) == [0.0, 2.0, 6.0]
        assert {a.service_s for a in scaled} == {0.5}
        assert _times(scale_time(arrivals, 0.5)) == [0.0, 0.5, 1.5]
        with pytest.raises(ValueError, match="finite and > 0"):
            scale_time(arrivals, 0.0)

    def test_offered_utilization_mixes_known_and_mean_service(self) -> None:
        """Known service_s counts as is; unknown uses the type's mean."""
        arrivals = [Arrival(0.0, "a", 3.0), Arrival(5.0, "b"), Arrival(10.0, "b")]
        utilization = offered_utilization(arrivals, workers=2, mean_service_s_by_type={"b": 1.0})
        assert utilization == pytest.approx((3.0 + 1.0 + 1.0) / 10.0 / 2)

    @pytest.mark.parametrize("target", [0.3, 0.9, 1.5])
    def test_scale_to_utilization_hits_target(self, target: float) -> None:
        """After scaling, the offered utilisation is within 1% of the target."""
        rng = np.random.default_rng(5)
        times_s = np.cumsum(rng.exponential(0.2, size=2000)).tolist()
        arrivals = [
            Arrival(t, "a" if i % 3 else "b", float(rng.exponential(1.0)) if i % 2 else None)
            for i, t in enumerate(times_s)
        ]
        means = {"a": 0.8, "b": 2.5}
        scaled = scale_to_utilization(
            arrivals, target_utilization=target, workers=4, mean_service_s_by_type=means
        )
        assert offered_utilization(
            scaled, workers=4, mean_service_s_by_type=means
        ) == pytest.approx(target, rel=0.01)
        assert [a.job_type for a in scaled] == [a.job_type for a in arrivals]

    @pytest.mark.parametrize(
        ("arrivals", "options", "message"),
        [
            (_arrivals([0.0, 1.0], "a"), {"target_utilization": 0.0}, "target_utilization"),
            (_arrivals([0.0, 1.0], "a"), {"target_utilization": 2.5}, "target_utilization"),
            (_arrivals([0.0, 1.0], "a"), {"target_utilization": float("nan")}, "target"),
            (_arrivals([4.0, 4.0], "a"), {"target_utilization": 0.5}, "zero duration"),
            (_arrivals([0.0, 1.0], "zzz"), {"target_utilization": 0.5}, "job type(s) 'zzz'"),
            (_arrivals([0.0, 1.0], "a", 0.0), {"target_utilization": 0.5}, "offers no work"),
            (_arrivals([0.0, 1.0], "a"), {"target_utilization": 0.5, "workers": 0}, "workers"),
            ([], {"target_utilization": 0.5}, "no arrivals"),
        ],
    )
    def test_scale_to_utilization_errors(
        self, arrivals: list[Arrival], options: dict[str, float], message: str
    ) -> None:
        """Bad targets, zero duration, unknown types and zero work are refused."""
        kwargs: dict[str, object] = {"workers": 1, "mean_service_s_by_type": {"a": 1.0}} | options
        with pytest.raises(ValueError, match=re.escape(message)):
            scale_to_utilization(arrivals, **kwargs)  # type: ignore[arg-type]


GENERIC = "arrival_s,job_type,service_s\n0,a,1\n10,b,2\n20,a,3\n30,b,4\n"


class TestLoadTrace:
    def test_dispatches_every_format(self) -> None:
        """Each format, given as enum or string, reaches its parser."""
        assert len(load_trace("generic_csv", GENERIC.splitlines())) == 4
        llm = load_trace(
            TraceFormat.AZURE_LLM_2023,
            [LLM_HEADER, "2023-11-16 18:00:00,1,2\n"],
            job_type="conv",
        )
        assert llm == [Arrival(0.0, "conv", None, 1, 2)]
        assert load_trace("mooncake", [_mooncake_line(5, 1, 2, [])])[0].job_type == "mooncake"
        functions = load_trace(
            "azure_functions_2019",
            _published_inv(PUBLISHED_ROWS).splitlines(),
            rng=np.random.default_rng(0),
            run_lines=_run_file(list(DURATIONS_MS)).splitlines(),
            minutes=(0, 1),
        )
        assert Counter(a.job_type for a in functions) == {"http": 3, "timer": 1}

    def test_window_then_scale(self) -> None:
        """The window is cut first, then time is scaled."""
        arrivals = load_trace("generic_csv", GENERIC.splitlines(), window_s=(10, 30), time_scale=3)
        assert [(a.arrival_s, a.job_type) for a in arrivals] == [(0.0, "b"), (30.0, "a")]

    def test_target_utilization(self) -> None:
        """target_utilization rescales time to the requested load."""
        arrivals = load_trace(
            "generic_csv", GENERIC.splitlines(), target_utilization=0.5, workers=1
        )
        assert offered_utilization(arrivals, workers=1) == pytest.approx(0.5)

    @pytest.mark.parametrize(
        ("fmt", "options", "message"),
        [
            ("parquet", {}, "unknown trace format 'parquet'; known formats: 'generic_csv'"),
            ("azure_functions_2019", {}, "pass a seeded rng"),
            ("azure_llm_2023", {}, "azure_llm_2023 needs job_type"),
            ("generic_csv", {"job_type": "a"}, "drop job_type"),
            ("mooncake", {"minutes": (0, 1)}, "'minutes' only apply to azure_functions_2019"),
            ("generic_csv", {"run_lines": []}, "'run_lines' only apply"),
            ("generic_csv", {"time_scale": 2, "target_utilization": 0.5}, "not both"),
            ("generic_csv", {"target_utilization": 0.5}, "needs workers"),
            ("generic_csv", {"workers": 2}, "only apply with target_utilization"),
            ("generic_csv", {"window_s": (100, 200)}, r"window \[100, 200\) s holds no arrivals"),
        ],
    )
    def test_options_must_fit_the_format(
        self, fmt: str, options: dict[str, object], message: str
    ) -> None:
        """Options that do not fit the format, or each other, are clear ValueErrors."""
        with pytest.raises(ValueError, match=message):
            load_trace(fmt, GENERIC.splitlines(), **options)  # type: ignore[arg-type]

    def test_rng_is_accepted_and_unused_by_deterministic_formats(self) -> None:
        """A caller may pass its generator to any format; deterministic ones draw nothing."""
        rng = np.random.default_rng(0)
        state = rng.bit_generator.state
        load_trace("generic_csv", GENERIC.splitlines(), rng=rng)
        assert rng.bit_generator.state == state

    def test_trace_errors_pass_through(self) -> None:
        """A bad row surfaces as the parser's TraceError, with the caller's source name."""
        with pytest.raises(TraceError, match=r"^my.csv line 2: column 'arrival_s'"):
            load_trace("generic_csv", ["arrival_s,job_type\n", "x,a\n"], source="my.csv")
