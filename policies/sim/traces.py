"""Trace replay adapters: public request traces in, `Arrival` records out.

Nothing here does I/O. Every parser takes an iterable of text lines (the caller opens the file; the
`source` name only labels error messages) and returns arrivals sorted by time, ties in file order,
shifted so that the first arrival is at 0.0 s. Pure helpers then cut a time window, stretch time, or
rescale time so the offered load hits a target utilisation; `load_trace` is the one entry point the
scenario layer calls.

Formats (see `TraceFormat`):

- generic CSV, our own (DESIGN.md): `arrival_s, job_type` required; `service_s, tokens_in,
  tokens_out, tenant, priority, deadline_s` optional.
- Azure LLM inference 2023: `TIMESTAMP, ContextTokens, GeneratedTokens`, one job class per file.
- Mooncake FAST'25 JSON lines: `timestamp` (ms), `input_length`, `output_length`, `hash_ids`.
- Azure Functions 2019: per-function invocation counts per minute (`*_inv.csv`) and duration
  percentiles in ms (`*_run.csv`), either as published or as carried by invitro.

Every problem in a trace raises `TraceError`, whose message names the source, the 1-based line and
what is wrong. Option errors (a bad argument rather than a bad trace) raise plain `ValueError`.
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Final, Literal

import numpy as np
import numpy.typing as npt

from policies.sim.arrivals import Arrival

if TYPE_CHECKING:
    from policies.sim.trace_servegen import ServegenOptions

__all__ = [
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
]


class TraceFormat(StrEnum):
    """The trace formats `load_trace` understands; the value is what scenario files spell."""

    # Ours (DESIGN.md): one arrival per row with its job type, optionally its service time.
    GENERIC_CSV = "generic_csv"
    # Azure LLM inference 2023 (Splitwise): one job class per file; tokens, no service time.
    AZURE_LLM_2023 = "azure_llm_2023"
    # Mooncake FAST'25 JSON lines: ms timestamps, tokens, shared-prefix block ids.
    MOONCAKE = "mooncake"
    # Azure Functions 2019: invocation counts per function per minute, duration percentiles.
    AZURE_FUNCTIONS_2019 = "azure_functions_2019"
    # ServeGen (Alibaba Model Studio): per-client rates and inter-arrival laws per 600 s window,
    # one file per model, lengths beside them; arrivals are drawn (policies/sim/trace_servegen.py).
    SERVEGEN = "servegen"


class TraceError(ValueError):
    """A trace that cannot be replayed: `source line N: what is wrong`."""

    def __init__(self, source: str, line_no: int, reason: str) -> None:
        super().__init__(f"{source} line {line_no}: {reason}")
        self.source = source
        self.line_no = line_no
        self.reason = reason

    def __reduce__(self) -> tuple[type[TraceError], tuple[str, int, str]]:
        # Default pickling replays __init__ with the formatted message only, which does not fit
        # this signature; Ray pickles exceptions raised inside tasks, so keep it round-trippable.
        return (TraceError, (self.source, self.line_no, self.reason))


# Azure Functions job types beyond this many (by invocations in the window) fold into
# OTHER_JOB_TYPE: each job type becomes queues, features and policy outputs downstream, so its
# cardinality must stay bounded however many functions a trace has.
DEFAULT_MAX_JOB_TYPES: Final = 16
OTHER_JOB_TYPE: Final = "other"
# Targets above this are refused by `scale_to_utilization`: at twice the capacity the backlog of any
# replay grows by a whole trace-length of work per trace length, which measures nothing but the
# overload itself.
MAX_TARGET_UTILIZATION: Final = 2.0

_MS_PER_S: Final = 1000.0
_S_PER_MINUTE: Final = 60.0


# --------------------------------------------------------------------------------------------------
# Cell parsing shared by the formats


def _number(text: str, *, source: str, line_no: int, column: str) -> float:
    """A finite, non-negative float from a cell, or a TraceError naming the column."""
    try:
        value = float(text)
    except ValueError:
        raise TraceError(source, line_no, f"column {column!r}: {text!r} is not a number") from None
    if math.isnan(value) or math.isinf(value):
        raise TraceError(source, line_no, f"column {column!r}: {text!r} is not a finite number")
    if value < 0:
        raise TraceError(source, line_no, f"column {column!r}: {text!r} is negative")
    return value


def _integer(text: str, *, source: str, line_no: int, column: str, signed: bool = False) -> int:
    """An int from a cell (no fractional part), non-negative unless `signed`."""
    try:
        value = int(text)
    except ValueError:
        raise TraceError(
            source, line_no, f"column {column!r}: {text!r} is not an integer"
        ) from None
    if value < 0 and not signed:
        raise TraceError(source, line_no, f"column {column!r}: {text!r} is negative")
    return value


def _json_integer(value: object, *, source: str, line_no: int, key: str) -> int:
    # bool is an int subclass in Python, and `true` is never a token count.
    if isinstance(value, bool) or not isinstance(value, int):
        raise TraceError(source, line_no, f"key {key!r}: {value!r} is not an integer")
    if value < 0:
        raise TraceError(source, line_no, f"key {key!r}: {value!r} is negative")
    return value


def _quoted(names: Iterable[str]) -> str:
    return ", ".join(repr(name) for name in names)


def _check_columns(
    columns: Sequence[str],
    *,
    required: Iterable[str],
    allowed: Iterable[str],
    source: str,
    line_no: int,
) -> None:
    """Refuse duplicate, missing and unknown header columns, naming every offender."""
    duplicates = [name for name, count in Counter(columns).items() if count > 1]
    if duplicates:
        raise TraceError(source, line_no, f"duplicate column(s) {_quoted(duplicates)}")
    missing = [name for name in required if name not in columns]
    if missing:
        raise TraceError(
            source,
            line_no,
            f"missing required column(s) {_quoted(missing)} (found {_quoted(columns)})",
        )
    allowed_set = set(allowed)
    unknown = [name for name in columns if name not in allowed_set]
    if unknown:
        raise TraceError(
            source,
            line_no,
            f"unknown column(s) {_quoted(unknown)} (allowed: {_quoted(sorted(allowed_set))})",
        )


class _CsvRows:
    """CSV rows with their 1-based line numbers; blank rows skipped, csv errors wrapped."""

    def __init__(self, lines: Iterable[str], source: str) -> None:
        self._reader = csv.reader(lines)
        self._source = source
        # The line a caller should blame when the input ends early: one past the last line read.
        self.end_line_no = 1

    def __iter__(self) -> Iterator[tuple[int, list[str]]]:
        while True:
            try:
                row = next(self._reader)
            except StopIteration:
                return
            except csv.Error as exc:
                raise TraceError(self._source, self._reader.line_num, f"bad CSV: {exc}") from None
            self.end_line_no = self._reader.line_num + 1
            if row:
                yield self._reader.line_num, row

    def header(self) -> tuple[int, list[str]]:
        """The first non-blank row, names stripped; an empty input is an error."""
        for line_no, row in self:
            return line_no, [name.strip() for name in row]
        raise TraceError(self._source, self.end_line_no, "empty trace: no header row")


def _check_width(row: Sequence[str], width: int, *, source: str, line_no: int) -> None:
    if len(row) != width:
        raise TraceError(
            source, line_no, f"expected {width} fields as in the header, got {len(row)}"
        )


def _no_arrivals(source: str, line_no: int) -> TraceError:
    return TraceError(source, line_no, "trace has no arrivals (nothing after the header)")


def _from_zero(arrivals: list[Arrival]) -> list[Arrival]:
    """Sort by time (stable, so ties keep file order) and shift the first arrival to 0.0 s."""
    arrivals.sort(key=lambda arrival: arrival.arrival_s)
    first_s = arrivals[0].arrival_s
    if first_s == 0.0:
        return arrivals
    return [replace(arrival, arrival_s=arrival.arrival_s - first_s) for arrival in arrivals]


# --------------------------------------------------------------------------------------------------
# Generic CSV

_GENERIC_REQUIRED: Final = ("arrival_s", "job_type")
_GENERIC_OPTIONAL: Final = (
    "service_s",
    "tokens_in",
    "tokens_out",
    "tenant",
    "priority",
    "deadline_s",
)
# Every column of the generic CSV, in the order a writer of one puts them.
GENERIC_COLUMNS: Final = _GENERIC_REQUIRED + _GENERIC_OPTIONAL


def _generic_arrival(cells: Mapping[str, str], *, source: str, line_no: int) -> Arrival:
    """One generic CSV row (column -> stripped cell) as an Arrival; empty optional cells -> None."""

    def optional_float(column: str) -> float | None:
        text = cells.get(column, "")
        return _number(text, source=source, line_no=line_no, column=column) if text else None

    def optional_int(column: str, *, signed: bool = False) -> int | None:
        text = cells.get(column, "")
        if not text:
            return None
        return _integer(text, source=source, line_no=line_no, column=column, signed=signed)

    for column in _GENERIC_REQUIRED:
        if not cells[column]:
            raise TraceError(source, line_no, f"column {column!r} is empty")
    return Arrival(
        arrival_s=_number(cells["arrival_s"], source=source, line_no=line_no, column="arrival_s"),
        job_type=cells["job_type"],
        service_s=optional_float("service_s"),
        tokens_in=optional_int("tokens_in"),
        tokens_out=optional_int("tokens_out"),
        tenant=cells.get("tenant") or None,
        priority=optional_int("priority", signed=True) or 0,
        deadline_s=optional_float("deadline_s"),
    )


def parse_generic_csv(lines: Iterable[str], *, source: str = "<trace>") -> list[Arrival]:
    """Parse our generic trace CSV into arrivals sorted by time, the first at 0.0 s.

    A header row is required; `arrival_s` and `job_type` must be present, the optional columns are
    those of `Arrival`, and any other column is an error (a misspelt `servce_s` would otherwise be
    silently dropped). Empty optional cells mean "not known" (None; priority 0). Rows need not be in
    time order. Times, service and deadline seconds must be finite and non-negative, token counts
    non-negative integers, priority an integer.
    """
    rows = _CsvRows(lines, source)
    header_line_no, columns = rows.header()
    _check_columns(
        columns,
        required=_GENERIC_REQUIRED,
        allowed=GENERIC_COLUMNS,
        source=source,
        line_no=header_line_no,
    )
    index = {name: position for position, name in enumerate(columns)}

    arrivals: list[Arrival] = []
    for line_no, row in rows:
        _check_width(row, len(columns), source=source, line_no=line_no)
        cells = {name: row[position].strip() for name, position in index.items()}
        arrivals.append(_generic_arrival(cells, source=source, line_no=line_no))
    if not arrivals:
        raise _no_arrivals(source, rows.end_line_no)
    return _from_zero(arrivals)


# --------------------------------------------------------------------------------------------------
# Azure LLM inference 2023

_AZURE_LLM_COLUMNS: Final = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
# The published files carry 7 fractional digits (100 ns ticks), which `datetime.fromisoformat` and
# `strptime("%f")` both refuse; parse the fields ourselves and keep the fraction as a float.
_TIMESTAMP_RE: Final = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[ T](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?(?:Z|[+-]00:?00)?"
)
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)


def _timestamp_s(text: str, *, source: str, line_no: int, column: str) -> tuple[int, float]:
    """(whole seconds since the epoch, fraction of a second) of a timestamp read as UTC.

    Split in two so that subtracting the first arrival is exact on the whole seconds: a float of
    1.7e9 s keeps only ~0.2 us, which would blur the 100 ns ticks of the source.
    """
    match = _TIMESTAMP_RE.fullmatch(text.strip())
    if match is None:
        raise TraceError(
            source,
            line_no,
            f"column {column!r}: {text!r} is not a timestamp like '2023-11-16 18:15:46.6805900'",
        )
    year, month, day, hour, minute, second = (int(match[group]) for group in range(1, 7))
    try:
        moment = datetime(year, month, day, hour, minute, second, tzinfo=UTC)
    except ValueError as exc:
        raise TraceError(source, line_no, f"column {column!r}: {text!r}: {exc}") from None
    fraction_digits = match[7]
    fraction_s = float(f"0.{fraction_digits}") if fraction_digits else 0.0
    since_epoch = moment - _EPOCH
    return since_epoch.days * 86_400 + since_epoch.seconds, fraction_s


def parse_azure_llm(
    lines: Iterable[str], *, job_type: str, source: str = "<trace>"
) -> list[Arrival]:
    """Parse an Azure LLM inference 2023 CSV into arrivals of one job class.

    The trace names no model, so each file is one class and the caller names it (`"code"`,
    `"conv"`). `ContextTokens` becomes `tokens_in`, `GeneratedTokens` becomes `tokens_out`, and
    `service_s` stays None: the scenario's per-type token model turns tokens into service time.
    Timestamps (`2023-11-16 18:15:46.6805900`, any number of fractional digits up to 9) are read as
    UTC; only their differences matter.
    """
    if not job_type:
        raise ValueError("job_type must be a non-empty string")
    rows = _CsvRows(lines, source)
    header_line_no, columns = rows.header()
    _check_columns(
        columns,
        required=_AZURE_LLM_COLUMNS,
        allowed=_AZURE_LLM_COLUMNS,
        source=source,
        line_no=header_line_no,
    )
    ts_pos, in_pos, out_pos = (columns.index(name) for name in _AZURE_LLM_COLUMNS)

    records: list[tuple[int, float, int, int]] = []
    for line_no, row in rows:
        _check_width(row, len(columns), source=source, line_no=line_no)
        whole_s, fraction_s = _timestamp_s(
            row[ts_pos], source=source, line_no=line_no, column="TIMESTAMP"
        )
        tokens_in = _integer(row[in_pos], source=source, line_no=line_no, column="ContextTokens")
        tokens_out = _integer(
            row[out_pos], source=source, line_no=line_no, column="GeneratedTokens"
        )
        records.append((whole_s, fraction_s, tokens_in, tokens_out))
    if not records:
        raise _no_arrivals(source, rows.end_line_no)

    base_s = min(whole_s for whole_s, _, _, _ in records)
    arrivals = [
        Arrival(
            arrival_s=(whole_s - base_s) + fraction_s,
            job_type=job_type,
            tokens_in=tokens_in,
            tokens_out=tokens_out,
        )
        for whole_s, fraction_s, tokens_in, tokens_out in records
    ]
    return _from_zero(arrivals)


# --------------------------------------------------------------------------------------------------
# Mooncake FAST'25

_MOONCAKE_REQUIRED: Final = ("timestamp", "input_length", "output_length")
_MOONCAKE_ALLOWED: Final = (*_MOONCAKE_REQUIRED, "hash_ids")


def json_objects(lines: Iterable[str], *, source: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) of each non-blank line of a JSON-lines file; a TraceError naming the
    line when one is not JSON or not an object."""
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record: Any = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TraceError(source, line_no, f"not valid JSON: {exc.msg}") from None
        if not isinstance(record, dict):
            raise TraceError(
                source, line_no, f"expected a JSON object, got {type(record).__name__}"
            )
        yield line_no, record


def _read_mooncake(
    lines: Iterable[str], source: str
) -> tuple[list[float], list[int], list[int], list[tuple[int, ...]]]:
    """Validated columns of a Mooncake trace in file order: (time s, tokens in, out, prefix ids)."""
    times_s: list[float] = []
    tokens_in: list[int] = []
    tokens_out: list[int] = []
    prefix_ids: list[tuple[int, ...]] = []
    line_no = 0
    for line_no, record in json_objects(lines, source=source):
        missing = [key for key in _MOONCAKE_REQUIRED if key not in record]
        if missing:
            raise TraceError(source, line_no, f"missing required key(s) {_quoted(missing)}")
        unknown = [key for key in record if key not in _MOONCAKE_ALLOWED]
        if unknown:
            raise TraceError(
                source,
                line_no,
                f"unknown key(s) {_quoted(unknown)} (allowed: {_quoted(_MOONCAKE_ALLOWED)})",
            )
        timestamp_ms = record["timestamp"]
        if isinstance(timestamp_ms, bool) or not isinstance(timestamp_ms, int | float):
            raise TraceError(source, line_no, f"key 'timestamp': {timestamp_ms!r} is not a number")
        if not math.isfinite(timestamp_ms):
            raise TraceError(
                source, line_no, f"key 'timestamp': {timestamp_ms!r} is not a finite number"
            )
        if timestamp_ms < 0:
            raise TraceError(source, line_no, f"key 'timestamp': {timestamp_ms!r} is negative")
        raw_ids = record.get("hash_ids", [])
        if not isinstance(raw_ids, list):
            raise TraceError(source, line_no, f"key 'hash_ids': {raw_ids!r} is not a list")
        times_s.append(timestamp_ms / _MS_PER_S)
        tokens_in.append(
            _json_integer(
                record["input_length"], source=source, line_no=line_no, key="input_length"
            )
        )
        tokens_out.append(
            _json_integer(
                record["output_length"], source=source, line_no=line_no, key="output_length"
            )
        )
        prefix_ids.append(
            tuple(
                _json_integer(block, source=source, line_no=line_no, key="hash_ids")
                for block in raw_ids
            )
        )
    if not times_s:
        raise TraceError(source, line_no + 1, "empty trace: no JSON records")
    return times_s, tokens_in, tokens_out, prefix_ids


def _time_order(times_s: Sequence[float]) -> list[int]:
    # sorted() is stable, so records at the same millisecond keep their file order.
    return sorted(range(len(times_s)), key=times_s.__getitem__)


def parse_mooncake(
    lines: Iterable[str], *, job_type: str = "mooncake", source: str = "<trace>"
) -> list[Arrival]:
    """Parse a Mooncake JSON-lines trace (ms timestamps) into arrivals of one job class.

    `input_length` becomes `tokens_in`, `output_length` becomes `tokens_out`; service time is left
    to the scenario's token model. The shared-prefix block ids do not fit `Arrival`; read them,
    aligned with this function's output, with `mooncake_prefix_ids`.
    """
    if not job_type:
        raise ValueError("job_type must be a non-empty string")
    times_s, tokens_in, tokens_out, _ = _read_mooncake(lines, source)
    order = _time_order(times_s)
    first_s = times_s[order[0]]
    return [
        Arrival(
            arrival_s=times_s[i] - first_s,
            job_type=job_type,
            tokens_in=tokens_in[i],
            tokens_out=tokens_out[i],
        )
        for i in order
    ]


def mooncake_prefix_ids(lines: Iterable[str], *, source: str = "<trace>") -> list[tuple[int, ...]]:
    """The `hash_ids` (shared-prefix block ids) of a Mooncake trace, in `parse_mooncake`'s order.

    Element i belongs to arrival i of `parse_mooncake` on the same lines, so a cache-aware router
    can zip the two. A record without `hash_ids` gives an empty tuple.
    """
    times_s, _, _, prefix_ids = _read_mooncake(lines, source)
    return [prefix_ids[i] for i in _time_order(times_s)]


# --------------------------------------------------------------------------------------------------
# Azure Functions 2019

_AF_ID_COLUMNS: Final = ("HashOwner", "HashApp", "HashFunction")
_AF_TRIGGER_COLUMN: Final = "Trigger"
# The published trace names minute columns "1".."1440", the invitro carrier "minute_1"..
_AF_MINUTE_RE: Final = re.compile(r"(?:minute_)?([0-9]+)")
_AF_PERCENTILE_RE: Final = re.compile(r"percentile_Average_([0-9]+)")
# Summary statistics a durations file may carry; the inverse CDF does not need them.
_AF_RUN_STAT_COLUMNS: Final = ("Count", "Average", "Minimum", "Maximum")
_AF_GROUPINGS: Final[tuple[str, ...]] = ("trigger", "function", "app")
# Hash-derived job type names are cut to the shortest prefix (at least this long) that keeps the
# kept names distinct: readable in metrics, still unambiguous.
_AF_MIN_PREFIX_CHARS: Final = 8

_FunctionKey = tuple[str, str, str]
# How `parse_azure_functions` names job types when no constant job_type is given.
JobTypeBy = Literal["trigger", "function", "app"]


def _af_minute_positions(
    columns: Sequence[str], *, source: str, line_no: int
) -> tuple[npt.NDArray[np.intp], bool]:
    """Column positions of minutes 1..K in minute order, and whether a Trigger column exists."""
    minute_at: dict[int, int] = {}
    unknown: list[str] = []
    for position, name in enumerate(columns):
        if name in _AF_ID_COLUMNS or name == _AF_TRIGGER_COLUMN:
            continue
        match = _AF_MINUTE_RE.fullmatch(name)
        if match is None:
            unknown.append(name)
        else:
            minute_at[int(match[1])] = position
    if unknown:
        shown = _quoted(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise TraceError(
            source,
            line_no,
            f"unknown column(s) {shown} (expected {_quoted(_AF_ID_COLUMNS)}, optionally "
            f"{_AF_TRIGGER_COLUMN!r}, then minute columns '1'.. or 'minute_1'..)",
        )
    if not minute_at:
        raise TraceError(source, line_no, "no minute columns ('1'.. or 'minute_1'..)")
    if sorted(minute_at) != list(range(1, len(minute_at) + 1)):
        gaps = sorted(set(range(1, max(minute_at) + 1)) - set(minute_at))
        raise TraceError(
            source,
            line_no,
            f"minute columns must run 1..{len(minute_at)} without gaps; missing {gaps[:5]}",
        )
    positions = np.array([minute_at[m] for m in range(1, len(minute_at) + 1)], dtype=np.intp)
    return positions, _AF_TRIGGER_COLUMN in columns


def _af_read_durations(
    run_lines: Iterable[str], *, source: str
) -> tuple[npt.NDArray[np.float64], dict[_FunctionKey, npt.NDArray[np.float64]]]:
    """Percentile points in [0, 1] and, per function, its duration at each point in seconds."""
    rows = _CsvRows(run_lines, source)
    header_line_no, columns = rows.header()
    percentile_at: dict[int, int] = {}
    for position, name in enumerate(columns):
        match = _AF_PERCENTILE_RE.fullmatch(name)
        if match is not None:
            percentile_at[int(match[1])] = position
    percentile_names = [columns[position] for position in percentile_at.values()]
    _check_columns(
        columns,
        required=(*_AF_ID_COLUMNS, "percentile_Average_0", "percentile_Average_100"),
        allowed=(*_AF_ID_COLUMNS, *_AF_RUN_STAT_COLUMNS, *percentile_names),
        source=source,
        line_no=header_line_no,
    )
    if any(p > 100 for p in percentile_at):
        raise TraceError(source, header_line_no, "a percentile column is above 100")
    points = sorted(percentile_at)
    value_positions = [percentile_at[p] for p in points]
    id_positions = [columns.index(name) for name in _AF_ID_COLUMNS]

    durations: dict[_FunctionKey, npt.NDArray[np.float64]] = {}
    for line_no, row in rows:
        _check_width(row, len(columns), source=source, line_no=line_no)
        key = (row[id_positions[0]], row[id_positions[1]], row[id_positions[2]])
        if key in durations:
            raise TraceError(source, line_no, f"function {key[2]!r} of app {key[1]!r} repeats")
        values_ms = [
            _number(row[position], source=source, line_no=line_no, column=columns[position])
            for position in value_positions
        ]
        # An inverse CDF must not decrease; a row that does is corrupt, not a shape to guess at.
        for low, high, p_high in zip(values_ms, values_ms[1:], points[1:], strict=False):
            if high < low:
                raise TraceError(
                    source,
                    line_no,
                    f"percentile_Average_{p_high} ({high:g} ms) is below the previous percentile "
                    f"({low:g} ms)",
                )
        durations[key] = np.asarray(values_ms, dtype=np.float64) / _MS_PER_S
    if not durations:
        raise _no_arrivals(source, rows.end_line_no)
    return np.asarray(points, dtype=np.float64) / 100.0, durations


def _shortest_unique_prefixes(names: Sequence[str]) -> dict[str, str]:
    """Each distinct name cut to the shortest common length (>= 8) that keeps them all distinct."""
    distinct = sorted(set(names))
    longest = max((len(name) for name in distinct), default=0)
    for length in range(_AF_MIN_PREFIX_CHARS, longest + 1):
        if len({name[:length] for name in distinct}) == len(distinct):
            return {name: name[:length] for name in distinct}
    return {name: name for name in distinct}


def _af_job_types(
    labels: Sequence[str], totals: npt.NDArray[np.int64], max_job_types: int
) -> list[str]:
    """Cap label cardinality: the busiest `max_job_types - 1` keep theirs, the rest are other."""
    invocations: dict[str, int] = {}
    for label, total in zip(labels, totals.tolist(), strict=True):
        invocations[label] = invocations.get(label, 0) + int(total)
    if len(invocations) <= max_job_types:
        return list(labels)
    # Python's sort is stable, so equal totals keep first-appearance order: deterministic.
    busiest = sorted(invocations, key=lambda label: -invocations[label])[: max_job_types - 1]
    kept = set(busiest)
    return [label if label in kept else OTHER_JOB_TYPE for label in labels]


def parse_azure_functions(
    inv_lines: Iterable[str],
    run_lines: Iterable[str] | None = None,
    *,
    rng: np.random.Generator,
    minutes: tuple[int, int] | None = None,
    job_type_by: JobTypeBy | None = None,
    job_type: str | None = None,
    top_functions: int | None = None,
    max_job_types: int = DEFAULT_MAX_JOB_TYPES,
    source: str = "<inv>",
    run_source: str = "<run>",
) -> list[Arrival]:
    """Replay Azure Functions 2019 per-minute invocation counts as individual arrivals.

    `inv_lines` is an invocations file: `HashOwner, HashApp, HashFunction`, optionally `Trigger`,
    then one count column per minute, named `1`.. (published) or `minute_1`.. (invitro carrier).

    - `minutes=(start, end)`: 0-based, half-open minute range to replay, e.g. `(0, 60)` is the first
      hour (columns 1..60); None replays every minute. Cells outside the range are not parsed.
    - Arrivals inside a minute are drawn uniformly from `rng`: given its count, that is exactly a
      Poisson process conditioned on the count, so per-minute burstiness is the trace's own.
    - `top_functions=N` keeps only the N functions with the most invocations inside the range
      (ties in file order); the others are dropped, not relabelled.
    - Job types: `job_type="x"` gives every arrival type "x"; otherwise `job_type_by` groups by
      `"trigger"` (the default; needs the Trigger column, which invitro drops), `"function"` or
      `"app"` (named `fn-`/`app-` + a short hash prefix). Beyond `max_job_types` distinct types,
      the busiest `max_job_types - 1` keep their names and the rest become `OTHER_JOB_TYPE`.
    - `run_lines`, a durations file (`percentile_Average_0` .. `_100` in ms per function), gives
      each arrival a `service_s` drawn by inverse transform from the piecewise-linear CDF through
      the function's percentile points; without it `service_s` is None. Every replayed function must
      have a durations row.
    - `tenant` is the owner (`owner-` + a short hash prefix).

    Draws come only from `rng`, times first then durations, so a seed fixes the output. The whole
    day of the shipped 1,000-function sample is ~11.6 M arrivals; replay a window.
    """
    if max_job_types < 1:
        raise ValueError(f"max_job_types must be >= 1, got {max_job_types}")
    if top_functions is not None and top_functions < 1:
        raise ValueError(f"top_functions must be >= 1 or None, got {top_functions}")
    if job_type is not None and job_type_by is not None:
        raise ValueError("give job_type (one constant type) or job_type_by, not both")
    if job_type is not None and not job_type:
        raise ValueError("job_type must be a non-empty string")
    if job_type_by is not None and job_type_by not in _AF_GROUPINGS:
        raise ValueError(
            f"job_type_by must be one of {_quoted(_AF_GROUPINGS)}, got {job_type_by!r}"
        )
    grouping = None if job_type is not None else (job_type_by or "trigger")

    rows = _CsvRows(inv_lines, source)
    header_line_no, columns = rows.header()
    missing = [name for name in _AF_ID_COLUMNS if name not in columns]
    if missing:
        raise TraceError(source, header_line_no, f"missing required column(s) {_quoted(missing)}")
    if len(set(columns)) != len(columns):
        raise TraceError(source, header_line_no, "duplicate column names")
    minute_positions, has_trigger = _af_minute_positions(
        columns, source=source, line_no=header_line_no
    )
    if grouping == "trigger" and not has_trigger:
        raise TraceError(
            source,
            header_line_no,
            "job_type_by='trigger' needs a 'Trigger' column, which this file lacks (the invitro "
            "carrier drops it); use 'function', 'app' or a constant job type",
        )
    minute_count = len(minute_positions)
    start_min, end_min = (0, minute_count) if minutes is None else minutes
    if not 0 <= start_min < end_min <= minute_count:
        raise ValueError(
            f"minutes must satisfy 0 <= start < end <= {minute_count} (the file's minute columns), "
            f"got {minutes}"
        )
    window_positions = minute_positions[start_min:end_min].tolist()
    owner_pos, app_pos, function_pos = (columns.index(name) for name in _AF_ID_COLUMNS)
    trigger_pos = columns.index(_AF_TRIGGER_COLUMN) if has_trigger else -1

    keys: list[_FunctionKey] = []
    key_line_nos: list[int] = []
    triggers: list[str] = []
    count_rows: list[list[int]] = []
    seen: set[_FunctionKey] = set()
    for line_no, row in rows:
        _check_width(row, len(columns), source=source, line_no=line_no)
        key = (row[owner_pos], row[app_pos], row[function_pos])
        if key in seen:
            raise TraceError(source, line_no, f"function {key[2]!r} of app {key[1]!r} repeats")
        seen.add(key)
        cells = [row[position] for position in window_positions]
        try:
            counts = [int(cell) for cell in cells]
        except ValueError:
            counts = [
                _integer(cell, source=source, line_no=line_no, column=columns[position])
                for cell, position in zip(cells, window_positions, strict=True)
            ]
        if counts and min(counts) < 0:
            position = window_positions[counts.index(min(counts))]
            raise TraceError(
                source, line_no, f"column {columns[position]!r}: {row[position]!r} is negative"
            )
        if grouping == "trigger" and not row[trigger_pos].strip():
            raise TraceError(source, line_no, "column 'Trigger' is empty")
        keys.append(key)
        key_line_nos.append(line_no)
        triggers.append(row[trigger_pos].strip().lower() if has_trigger else "")
        count_rows.append(counts)
    if not keys:
        raise _no_arrivals(source, rows.end_line_no)

    counts_matrix = np.asarray(count_rows, dtype=np.int64).reshape(len(keys), end_min - start_min)
    totals = counts_matrix.sum(axis=1)
    # Most invocations first, ties in file order (stable sort), then only functions that fire.
    kept = np.argsort(-totals, kind="stable")
    kept = kept[totals[kept] > 0]
    if top_functions is not None:
        kept = kept[:top_functions]
    if len(kept) == 0:
        raise TraceError(
            source,
            rows.end_line_no,
            f"no invocations in minutes [{start_min}, {end_min}) of the {minute_count} in the file",
        )
    kept_keys = [keys[i] for i in kept.tolist()]
    kept_counts = counts_matrix[kept]
    kept_totals = totals[kept]

    if grouping == "trigger":
        labels = [triggers[i] for i in kept.tolist()]
    elif grouping is not None:
        labels = [key[2] if grouping == "function" else key[1] for key in kept_keys]
    else:
        labels = [job_type or ""] * len(kept_keys)
    labels = _af_job_types(labels, kept_totals, max_job_types)
    if grouping in ("function", "app"):
        short = _shortest_unique_prefixes([label for label in labels if label != OTHER_JOB_TYPE])
        prefix = "fn-" if grouping == "function" else "app-"
        labels = [label if label == OTHER_JOB_TYPE else prefix + short[label] for label in labels]
    owner_short = _shortest_unique_prefixes([key[0] for key in kept_keys])
    tenants = ["owner-" + owner_short[key[0]] for key in kept_keys]

    # One arrival per invocation: the flat (function, minute) cell of each, times uniform within.
    cell_of_arrival = np.repeat(np.arange(kept_counts.size), kept_counts.ravel())
    function_of_arrival = cell_of_arrival // kept_counts.shape[1]
    minute_of_arrival = cell_of_arrival % kept_counts.shape[1] + start_min
    times_s = (minute_of_arrival + rng.random(len(cell_of_arrival))) * _S_PER_MINUTE

    service_s: npt.NDArray[np.float64] | None = None
    if run_lines is not None:
        points, durations = _af_read_durations(run_lines, source=run_source)
        try:
            table_s = np.stack([durations[key] for key in kept_keys])
        except KeyError as exc:
            missing_key: _FunctionKey = exc.args[0]
            line_no = key_line_nos[keys.index(missing_key)]
            raise TraceError(
                source,
                line_no,
                f"function {missing_key[2]!r} has no durations row in {run_source}",
            ) from None
        service_s = _piecewise_linear_inverse_cdf(
            points, table_s, function_of_arrival, rng.random(len(cell_of_arrival))
        )

    order = np.argsort(times_s, kind="stable")
    times_sorted = (times_s[order] - times_s[order[0]]).tolist()
    functions_sorted = function_of_arrival[order].tolist()
    if service_s is None:
        return [
            Arrival(time_s, labels[f], tenant=tenants[f])
            for time_s, f in zip(times_sorted, functions_sorted, strict=True)
        ]
    return [
        Arrival(time_s, labels[f], duration_s, tenant=tenants[f])
        for time_s, f, duration_s in zip(
            times_sorted, functions_sorted, service_s[order].tolist(), strict=True
        )
    ]


def _piecewise_linear_inverse_cdf(
    points: npt.NDArray[np.float64],
    table_s: npt.NDArray[np.float64],
    rows: npt.NDArray[np.intp],
    uniforms: npt.NDArray[np.float64],
) -> npt.NDArray[np.float64]:
    """Inverse transform: row `rows[i]` of `table_s` (values at `points`) at `uniforms[i]`.

    `points` must rise strictly from 0 to 1, so every uniform in [0, 1) falls in one segment.
    """
    segment = np.clip(np.searchsorted(points, uniforms, side="right") - 1, 0, len(points) - 2)
    low_p, high_p = points[segment], points[segment + 1]
    low_s, high_s = table_s[rows, segment], table_s[rows, segment + 1]
    result: npt.NDArray[np.float64] = low_s + (uniforms - low_p) / (high_p - low_p) * (
        high_s - low_s
    )
    return result


# --------------------------------------------------------------------------------------------------
# Windowing and scaling


def select_window(arrivals: Iterable[Arrival], start_s: float, end_s: float) -> list[Arrival]:
    """The arrivals with `start_s <= arrival_s < end_s`, sorted, times re-based so `start_s` is 0.

    The gap between the window's start and its first arrival is kept: it is idle time the trace
    really had. An empty window gives an empty list.
    """
    if not (math.isfinite(start_s) and math.isfinite(end_s)) or not start_s < end_s:
        raise ValueError(f"window needs finite start_s < end_s, got [{start_s}, {end_s})")
    inside = [arrival for arrival in arrivals if start_s <= arrival.arrival_s < end_s]
    inside.sort(key=lambda arrival: arrival.arrival_s)
    return [replace(arrival, arrival_s=arrival.arrival_s - start_s) for arrival in inside]


def scale_time(arrivals: Iterable[Arrival], factor: float) -> list[Arrival]:
    """Multiply every arrival time by `factor`: > 1 stretches inter-arrival gaps, < 1 compresses.

    Service times and relative deadlines are the jobs' own and stay as they are, so the offered load
    scales by 1 / factor.
    """
    if not (math.isfinite(factor) and factor > 0):
        raise ValueError(f"time scale factor must be finite and > 0, got {factor}")
    scaled = [replace(arrival, arrival_s=arrival.arrival_s * factor) for arrival in arrivals]
    scaled.sort(key=lambda arrival: arrival.arrival_s)
    return scaled


def offered_utilization(
    arrivals: Sequence[Arrival],
    *,
    workers: int,
    mean_service_s_by_type: Mapping[str, float] | None = None,
) -> float:
    """Offered load per worker: total service seconds / (last - first arrival) / workers.

    An arrival's own `service_s` counts when known, else its job type's mean from
    `mean_service_s_by_type`; a type needed but missing there is an error, as are fewer than two
    distinct arrival times (no duration to divide by).
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    means = mean_service_s_by_type or {}
    for job_type, mean_s in means.items():
        if not (math.isfinite(mean_s) and mean_s > 0):
            raise ValueError(f"mean service time of {job_type!r} must be finite and > 0: {mean_s}")
    if not arrivals:
        raise ValueError("no arrivals: offered load is undefined")
    unknown = sorted(
        {a.job_type for a in arrivals if a.service_s is None and a.job_type not in means}
    )
    if unknown:
        raise ValueError(
            f"no service_s and no mean service time for job type(s) {_quoted(unknown)} "
            f"(known: {_quoted(sorted(means))})"
        )
    work_s = math.fsum(
        a.service_s if a.service_s is not None else means[a.job_type] for a in arrivals
    )
    duration_s = max(a.arrival_s for a in arrivals) - min(a.arrival_s for a in arrivals)
    if duration_s <= 0:
        raise ValueError("all arrivals are at the same time: zero duration, offered load undefined")
    return work_s / duration_s / workers


def scale_to_utilization(
    arrivals: Sequence[Arrival],
    *,
    target_utilization: float,
    workers: int,
    mean_service_s_by_type: Mapping[str, float] | None = None,
) -> list[Arrival]:
    """Stretch or compress time so `offered_utilization` of the result equals the target.

    Only arrival times change (see `scale_time`), so burstiness and the mix of job types are the
    trace's own. `target_utilization` must be in (0, MAX_TARGET_UTILIZATION]; a trace that offers
    no work (all service times 0) cannot be scaled.
    """
    if not (math.isfinite(target_utilization) and 0 < target_utilization <= MAX_TARGET_UTILIZATION):
        raise ValueError(
            f"target_utilization must be in (0, {MAX_TARGET_UTILIZATION}], got {target_utilization}"
        )
    offered = offered_utilization(
        arrivals, workers=workers, mean_service_s_by_type=mean_service_s_by_type
    )
    if offered <= 0:
        raise ValueError("the trace offers no work (all service times are 0): cannot scale to load")
    # Utilisation is work / duration, and the work is fixed: duration must scale by offered/target.
    return scale_time(arrivals, offered / target_utilization)


# --------------------------------------------------------------------------------------------------
# The entry point


def _as_format(fmt: TraceFormat | str) -> TraceFormat:
    try:
        return TraceFormat(fmt)
    except ValueError:
        known = _quoted(member.value for member in TraceFormat)
        raise ValueError(f"unknown trace format {fmt!r}; known formats: {known}") from None


def _load_servegen(
    lines: Iterable[str],
    *,
    source: str,
    extra_files: Mapping[str, Iterable[str]],
    options: ServegenOptions | None,
    rng: np.random.Generator | None,
    window_s: tuple[float, float] | None,
    job_type: str | None,
) -> list[Arrival]:
    # Imported here: trace_servegen raises this module's TraceError, so a top-level import
    # would be circular.
    from policies.sim.trace_servegen import ServegenOptions, is_arrivals_file, parse_servegen

    if rng is None:
        raise ValueError("servegen draws its arrivals from fitted laws: pass a seeded rng")
    arrival_files: dict[str, Iterable[str]] = {source: lines}
    length_files: dict[str, Iterable[str]] = {}
    for name, file_lines in extra_files.items():
        (arrival_files if is_arrivals_file(name) else length_files)[name] = file_lines
    opts = options or ServegenOptions()
    return parse_servegen(
        arrival_files,
        length_files,
        rng=rng,
        window_s=window_s,
        clients=opts.clients,
        top_clients=opts.top_clients,
        load_scale=opts.load_scale,
        load_scale_by_model=opts.load_scale_by_model,
        job_type=job_type,
        max_arrivals=opts.max_arrivals,
    )


def load_trace(
    fmt: TraceFormat | str,
    lines: Iterable[str],
    *,
    source: str = "<trace>",
    job_type: str | None = None,
    rng: np.random.Generator | None = None,
    run_lines: Iterable[str] | None = None,
    run_source: str = "<run>",
    minutes: tuple[int, int] | None = None,
    job_type_by: JobTypeBy | None = None,
    top_functions: int | None = None,
    max_job_types: int | None = None,
    extra_files: Mapping[str, Iterable[str]] | None = None,
    servegen: ServegenOptions | None = None,
    window_s: tuple[float, float] | None = None,
    time_scale: float | None = None,
    target_utilization: float | None = None,
    workers: int | None = None,
    mean_service_s_by_type: Mapping[str, float] | None = None,
) -> list[Arrival]:
    """Parse a trace of any `TraceFormat`, then window it, then scale its time or its load.

    Options must fit the format, else ValueError:

    - `job_type`: the class of every arrival. Required for azure_llm_2023, default "mooncake" for
      mooncake, refused for generic_csv (types come from the file); for azure_functions_2019 it is
      the constant alternative to `job_type_by` (default "trigger").
    - `rng`: required for azure_functions_2019, whose arrival times are drawn; the other formats are
      deterministic and draw nothing from it, so a caller may pass its generator regardless.
    - `run_lines`, `run_source`, `minutes`, `job_type_by`, `top_functions`, `max_job_types`: only
      for azure_functions_2019 (see `parse_azure_functions`).
    - `extra_files` (name -> lines), `servegen`: only for servegen. `lines` is its first arrivals
      file; `extra_files` holds any further `arrivals_*.csv` and the lengths files, told apart by
      name (see `policies.sim.trace_servegen.parse_servegen`). Servegen draws only the windows
      `window_s` overlaps, so it windows while parsing, never after.
    - `window_s=(start, end)`: keep `start <= t < end` and re-base to 0 (`select_window`); an empty
      window is an error.
    - `time_scale` (see `scale_time`) or `target_utilization` with `workers` and
      `mean_service_s_by_type` (see `scale_to_utilization`): at most one of the two.
    """
    trace_format = _as_format(fmt)
    is_functions = trace_format is TraceFormat.AZURE_FUNCTIONS_2019
    functions_only = {
        "run_lines": run_lines is not None,
        "minutes": minutes is not None,
        "job_type_by": job_type_by is not None,
        "top_functions": top_functions is not None,
        "max_job_types": max_job_types is not None,
    }
    misplaced = [name for name, given in functions_only.items() if given]
    if misplaced and not is_functions:
        raise ValueError(
            f"option(s) {_quoted(misplaced)} only apply to "
            f"{TraceFormat.AZURE_FUNCTIONS_2019.value}, not {trace_format.value}"
        )
    if (extra_files is not None or servegen is not None) and (
        trace_format is not TraceFormat.SERVEGEN
    ):
        raise ValueError(
            f"extra_files and servegen only apply to servegen, not {trace_format.value}"
        )
    if time_scale is not None and target_utilization is not None:
        raise ValueError("give time_scale or target_utilization, not both")
    if target_utilization is not None and workers is None:
        raise ValueError("target_utilization needs workers")
    if target_utilization is None and (workers is not None or mean_service_s_by_type is not None):
        raise ValueError("workers and mean_service_s_by_type only apply with target_utilization")

    arrivals: list[Arrival]
    if trace_format is TraceFormat.GENERIC_CSV:
        if job_type is not None:
            raise ValueError("generic_csv takes job types from its job_type column; drop job_type")
        arrivals = parse_generic_csv(lines, source=source)
    elif trace_format is TraceFormat.AZURE_LLM_2023:
        if job_type is None:
            raise ValueError(
                "azure_llm_2023 needs job_type (the file's class, e.g. 'code' or 'conv')"
            )
        arrivals = parse_azure_llm(lines, job_type=job_type, source=source)
    elif trace_format is TraceFormat.MOONCAKE:
        arrivals = parse_mooncake(lines, job_type=job_type or "mooncake", source=source)
    elif trace_format is TraceFormat.SERVEGEN:
        arrivals = _load_servegen(
            lines,
            source=source,
            extra_files=extra_files or {},
            options=servegen,
            rng=rng,
            window_s=window_s,
            job_type=job_type,
        )
        window_s = None
    else:
        if rng is None:
            raise ValueError(
                "azure_functions_2019 draws arrival times within each minute: pass a seeded rng"
            )
        arrivals = parse_azure_functions(
            lines,
            run_lines,
            rng=rng,
            minutes=minutes,
            job_type_by=job_type_by,
            job_type=job_type,
            top_functions=top_functions,
            max_job_types=DEFAULT_MAX_JOB_TYPES if max_job_types is None else max_job_types,
            source=source,
            run_source=run_source,
        )

    if window_s is not None:
        start_s, end_s = window_s
        windowed = select_window(arrivals, start_s, end_s)
        if not windowed:
            raise ValueError(
                f"{source}: window [{start_s}, {end_s}) s holds no arrivals "
                f"(the trace spans 0 to {arrivals[-1].arrival_s:.3f} s)"
            )
        arrivals = windowed
    if time_scale is not None:
        arrivals = scale_time(arrivals, time_scale)
    if target_utilization is not None:
        assert workers is not None  # checked above, before parsing
        arrivals = scale_to_utilization(
            arrivals,
            target_utilization=target_utilization,
            workers=workers,
            mean_service_s_by_type=mean_service_s_by_type,
        )
    return arrivals
