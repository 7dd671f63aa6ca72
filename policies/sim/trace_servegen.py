"""ServeGen (Alibaba Model Studio, arXiv:2505.09999): windowed arrival statistics in, arrivals out.

ServeGen publishes no request log. For each model, client and 600 s window it gives the mean rate
and a fitted inter-arrival law (Gamma or Weibull); for each client and 6 h window, distributions of
request lengths. This module draws a request stream from those statistics. Nothing here does I/O:
every function takes lines, and a `source` name (the file's path) that labels errors and, for
arrivals and lengths files, names the model.

Files (as joined from upstream's per-client chunks, see docs/traces.md):

- `arrivals_<category>_<model>.csv`: `client, window_start_s, rate, cv, iat_dist, iat_shape,
  iat_scale`; `window_start_s` counts from midnight of the first day.
- `lengths_<category>_<model>.jsonl`: one JSON object per client and 6 h window, each field
  (`input_tokens`, `output_tokens`, `text_tokens`, ...) a map from value to probability.
- `derived_length_quantiles.csv`: `model, client, window_start_s, field, mean, p50, p90, p99, max`
  per client and 6 h window, for the models whose full distributions are too large to carry.

Every problem in a file raises `TraceError` naming the file, the 1-based line and the column or
key; a bad option raises `ValueError`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Final

import numpy as np
import numpy.typing as npt

from policies.sim.arrivals import Arrival
from policies.sim.traces import TraceError, json_objects

__all__ = [
    "ARRIVALS_COLUMNS",
    "DEFAULT_MAX_ARRIVALS",
    "QUANTILES_FILE",
    "WINDOW_S",
    "ArrivalWindows",
    "ServegenLengths",
    "ServegenOptions",
    "arrivals_model",
    "is_arrivals_file",
    "lengths_model",
    "parse_servegen",
    "read_arrival_windows",
    "read_lengths",
]

# The width of ServeGen's rate windows, and of its length windows.
WINDOW_S: Final = 600.0
LENGTH_WINDOW_S: Final = 21_600.0
ARRIVALS_COLUMNS: Final = (
    "client",
    "window_start_s",
    "rate",
    "cv",
    "iat_dist",
    "iat_shape",
    "iat_scale",
)
QUANTILES_FILE: Final = "derived_length_quantiles.csv"
_QUANTILE_COLUMNS: Final = ("model", "client", "window_start_s", "field", "mean", "p50", "p90")
_QUANTILE_ALL_COLUMNS: Final = (*_QUANTILE_COLUMNS, "p99", "max")
# Cumulative probabilities of the quantile columns; the 0 point is added (see `_quantile_knots`).
_QUANTILE_POINTS: Final = np.array([0.0, 0.5, 0.9, 0.99, 1.0])
# Expected arrivals above this are refused before anything is drawn: a million Arrival records
# take ~250 MB (measured) before the simulator's own copies, and the shipped scenario's 87,000
# take ~1.5 s to simulate per policy; 14 days of m-mid at raw rates are ~2.2 G requests.
DEFAULT_MAX_ARRIVALS: Final = 1_000_000
_ARRIVALS_NAME_RE: Final = re.compile(r"arrivals_([A-Za-z0-9]+)_(.+)\.csv")
_LENGTHS_NAME_RE: Final = re.compile(r"lengths_([A-Za-z0-9]+)_(.+)\.jsonl")
_DISTRIBUTIONS: Final = ("Gamma", "Weibull")
# Multimodal records split the prompt by modality; a request's input is the sum of these.
_INPUT_PARTS: Final = ("text_tokens", "image_tokens", "audio_tokens", "video_tokens")


def is_arrivals_file(source: str) -> bool:
    """True when the file name is `arrivals_<category>_<model>.csv`."""
    return _ARRIVALS_NAME_RE.fullmatch(PurePath(source).name) is not None


def arrivals_model(source: str) -> str:
    """The model of an `arrivals_<category>_<model>.csv` file; ValueError for any other name."""
    match = _ARRIVALS_NAME_RE.fullmatch(PurePath(source).name)
    if match is None:
        raise ValueError(
            f"{source}: a servegen arrivals file is named arrivals_<category>_<model>.csv"
        )
    return match[2]


def lengths_model(source: str) -> str | None:
    """The model of a `lengths_<category>_<model>.jsonl` file, None for any other name."""
    match = _LENGTHS_NAME_RE.fullmatch(PurePath(source).name)
    return None if match is None else match[2]


# --------------------------------------------------------------------------------------------------
# Cells


def _number(text: str, *, source: str, line_no: int, column: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise TraceError(source, line_no, f"column {column!r}: {text!r} is not a number") from None
    if not math.isfinite(value):
        raise TraceError(source, line_no, f"column {column!r}: {text!r} is not a finite number")
    if value < 0:
        raise TraceError(source, line_no, f"column {column!r}: {text!r} is negative")
    return value


def _integer(text: str, *, source: str, line_no: int, column: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise TraceError(
            source, line_no, f"column {column!r}: {text!r} is not an integer"
        ) from None
    if value < 0:
        raise TraceError(source, line_no, f"column {column!r}: {text!r} is negative")
    return value


def _window_start(text: str, *, source: str, line_no: int, width_s: float) -> float:
    value = _number(text, source=source, line_no=line_no, column="window_start_s")
    if value % width_s != 0:
        raise TraceError(
            source,
            line_no,
            f"column 'window_start_s': {text!r} is not a multiple of the {width_s:g} s window",
        )
    return value


def _header(
    lines: Iterable[str], source: str, expected: Sequence[str]
) -> tuple[Iterable[tuple[int, str]], int]:
    """(numbered data lines, header line number), after checking the header names `expected`."""
    numbered = ((n, line) for n, line in enumerate(lines, start=1) if line.strip())
    try:
        line_no, header = next(numbered)
    except StopIteration:
        raise TraceError(source, 1, "empty file: no header row") from None
    columns = [name.strip() for name in header.rstrip("\r\n").split(",")]
    if tuple(columns) != tuple(expected):
        raise TraceError(
            source,
            line_no,
            f"header must be {','.join(expected)!r}, got {','.join(columns)!r}",
        )
    return numbered, line_no


def _cells(line: str, width: int, *, source: str, line_no: int) -> list[str]:
    # ServeGen's files hold no quoted cells (numbers, model names, two law names), so a plain
    # split reads them exactly, and a line number is the file's own (a csv reader may span lines).
    cells = line.rstrip("\r\n").split(",")
    if len(cells) != width:
        raise TraceError(
            source, line_no, f"expected {width} fields as in the header, got {len(cells)}"
        )
    return [cell.strip() for cell in cells]


# --------------------------------------------------------------------------------------------------
# Arrival windows


@dataclass(frozen=True)
class ServegenOptions:
    """What of a ServeGen trace to draw, besides the time window (see `parse_servegen`)."""

    clients: tuple[int, ...] | None = None
    top_clients: int | None = None
    load_scale: float = 1.0
    load_scale_by_model: Mapping[str, float] | None = None
    max_arrivals: int = DEFAULT_MAX_ARRIVALS


@dataclass(frozen=True)
class ArrivalWindows:
    """The busy windows of one arrivals file, one entry per (client, window), in file order."""

    source: str
    clients: npt.NDArray[np.int64]
    start_s: npt.NDArray[np.float64]
    rate: npt.NDArray[np.float64]
    is_weibull: npt.NDArray[np.bool_]
    shape: npt.NDArray[np.float64]
    scale: npt.NDArray[np.float64]
    # The first and one-past-the-last window the file covers, busy or idle.
    span_s: tuple[float, float]


def read_arrival_windows(lines: Iterable[str], *, source: str) -> ArrivalWindows:
    """Validated rows of an arrivals file; idle windows (empty `iat_dist`) are checked, not kept.

    A busy window needs rate > 0 and a law (`Gamma` or `Weibull`) with shape and scale > 0; an idle
    one must have rate 0. A (client, window) pair may appear once.
    """
    numbered, header_line_no = _header(lines, source, ARRIVALS_COLUMNS)
    clients: list[int] = []
    starts: list[float] = []
    rates: list[float] = []
    weibull: list[bool] = []
    shapes: list[float] = []
    scales: list[float] = []
    seen: set[tuple[int, float]] = set()
    first_s, end_s = math.inf, -math.inf
    line_no = header_line_no
    for line_no, line in numbered:
        client_text, start_text, rate_text, cv_text, dist, shape_text, scale_text = _cells(
            line, len(ARRIVALS_COLUMNS), source=source, line_no=line_no
        )
        client = _integer(client_text, source=source, line_no=line_no, column="client")
        start_s = _window_start(start_text, source=source, line_no=line_no, width_s=WINDOW_S)
        if (client, start_s) in seen:
            raise TraceError(
                source, line_no, f"client {client} window {start_text} s appears twice"
            )
        seen.add((client, start_s))
        first_s, end_s = min(first_s, start_s), max(end_s, start_s + WINDOW_S)
        rate = _number(rate_text, source=source, line_no=line_no, column="rate")
        _number(cv_text, source=source, line_no=line_no, column="cv")
        shape = _number(shape_text, source=source, line_no=line_no, column="iat_shape")
        scale = _number(scale_text, source=source, line_no=line_no, column="iat_scale")
        if not dist:
            if rate > 0:
                raise TraceError(
                    source, line_no, f"column 'iat_dist' is empty but 'rate' is {rate_text}"
                )
            continue
        if dist not in _DISTRIBUTIONS:
            raise TraceError(
                source,
                line_no,
                f"column 'iat_dist': {dist!r} is not 'Gamma', 'Weibull' or empty (idle window)",
            )
        for column, value, text in (
            ("rate", rate, rate_text),
            ("iat_shape", shape, shape_text),
            ("iat_scale", scale, scale_text),
        ):
            if value <= 0:
                raise TraceError(
                    source, line_no, f"column {column!r}: {text!r} must be > 0 for a {dist} window"
                )
        clients.append(client)
        starts.append(start_s)
        rates.append(rate)
        weibull.append(dist == "Weibull")
        shapes.append(shape)
        scales.append(scale)
    if not seen:
        raise TraceError(source, line_no + 1, "no windows after the header")
    return ArrivalWindows(
        source=source,
        clients=np.asarray(clients, dtype=np.int64),
        start_s=np.asarray(starts, dtype=np.float64),
        rate=np.asarray(rates, dtype=np.float64),
        is_weibull=np.asarray(weibull, dtype=np.bool_),
        shape=np.asarray(shapes, dtype=np.float64),
        scale=np.asarray(scales, dtype=np.float64),
        span_s=(first_s, end_s),
    )


def _law_mean(windows: ArrivalWindows, rows: npt.NDArray[np.intp]) -> npt.NDArray[np.float64]:
    """Mean inter-arrival time of each row's fitted law (Gamma: k theta; Weibull: lam G(1+1/c))."""
    shape, scale = windows.shape[rows], windows.scale[rows]
    weibull_mean = scale * np.exp(_lgamma(1.0 + 1.0 / shape))
    return np.where(windows.is_weibull[rows], weibull_mean, shape * scale)


def _lgamma(x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    return np.asarray([math.lgamma(v) for v in x.tolist()], dtype=np.float64)


def _draw_gaps(
    rng: np.random.Generator,
    is_weibull: npt.NDArray[np.bool_],
    shape: npt.NDArray[np.float64],
    scale: npt.NDArray[np.float64],
    *,
    length_biased: bool = False,
) -> npt.NDArray[np.float64]:
    """One gap per entry from its law; `length_biased` draws from x f(x) / mean instead.

    Length-biased laws stay in closed form: for Gamma(k, theta) it is Gamma(k + 1, theta); for
    Weibull(c, lam), (X / lam)^c of the biased law is Gamma(1 + 1/c, 1), so X = lam G^(1/c).
    """
    n = len(shape)
    out = np.empty(n)
    gamma_rows = ~is_weibull
    k = shape[gamma_rows] + (1.0 if length_biased else 0.0)
    out[gamma_rows] = rng.gamma(k, scale[gamma_rows])
    c, lam = shape[is_weibull], scale[is_weibull]
    if length_biased:
        out[is_weibull] = lam * rng.gamma(1.0 + 1.0 / c) ** (1.0 / c)
    else:
        out[is_weibull] = lam * rng.weibull(c)
    return out


def _draw_window_times(
    windows: ArrivalWindows,
    rows: npt.NDArray[np.intp],
    rate_factor: float,
    rng: np.random.Generator,
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.intp]]:
    """Arrival times of a stationary renewal process per row inside its 600 s window.

    Each row's law is rescaled (same shape, so the same CV) to mean 1 / (rate x rate_factor). The
    first arrival is the equilibrium forward gap, U times a length-biased gap, so the expected
    count in the window is exactly rate x 600 even for bursty laws; starting at the window's edge
    instead would add (cv^2 - 1) / 2 arrivals per window, 36 at the CV of 8.6 some windows have.
    Returns (times, row of each time), grouped by row.
    """
    shape = windows.shape[rows]
    scale = windows.scale[rows] / (_law_mean(windows, rows) * windows.rate[rows] * rate_factor)
    weibull = windows.is_weibull[rows]
    now = rng.random(len(rows)) * _draw_gaps(rng, weibull, shape, scale, length_biased=True)
    times: list[npt.NDArray[np.float64]] = []
    owners: list[npt.NDArray[np.intp]] = []
    active = np.arange(len(rows))
    inside = now < WINDOW_S
    while True:
        active, now = active[inside], now[inside]
        if len(active) == 0:
            break
        times.append(now)
        owners.append(active)
        now = now + _draw_gaps(rng, weibull[active], shape[active], scale[active])
        inside = now < WINDOW_S
    if not times:
        return np.empty(0), np.empty(0, dtype=np.intp)
    all_times = np.concatenate(times)
    all_rows = np.concatenate(owners)
    order = np.argsort(all_rows, kind="stable")
    return all_times[order] + windows.start_s[rows][all_rows[order]], rows[all_rows[order]]


# --------------------------------------------------------------------------------------------------
# Lengths


@dataclass(frozen=True)
class _Empirical:
    """A discrete distribution: sorted values and their cumulative probabilities."""

    values: npt.NDArray[np.float64]
    cdf: npt.NDArray[np.float64]

    def draw(self, uniforms: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        index = np.minimum(np.searchsorted(self.cdf, uniforms, side="right"), len(self.values) - 1)
        return self.values[index]


@dataclass(frozen=True)
class _Quantiles:
    """A piecewise-linear inverse CDF through (0, low), (.5, p50), (.9, p90), (.99, p99), (1, max)."""

    knots: npt.NDArray[np.float64]

    def draw(self, uniforms: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        return np.round(np.interp(uniforms, _QUANTILE_POINTS, self.knots))


_Law = _Empirical | _Quantiles
# (client, 6 h window start) -> field -> law.
_LengthTable = dict[tuple[int, float], dict[str, _Law]]


@dataclass(frozen=True)
class ServegenLengths:
    """Length laws by model: from `lengths_*.jsonl` when the model has one, else the quantiles."""

    by_model: dict[str, _LengthTable] = field(default_factory=dict)


def _quantile_knots(p50: float, p90: float, p99: float, max_: float) -> npt.NDArray[np.float64]:
    # The files give no minimum. A request carries at least one token, so the law starts at 1
    # (or at p50 when that is below 1); the lower half is then uniform up to the median, which
    # keeps the median and the tail exact and errs only on the shape of short requests. Checked
    # against the rows' own means over the language and reasoning models' rows of the derived
    # file: this law's mean / the row's mean has a median of 0.90-0.93 for inputs and 0.95-1.05
    # for outputs (10th-90th percentile 0.76-1.29 and 0.82-1.54; m-small outputs reach 2.1).
    return np.array([min(1.0, p50), p50, p90, p99, max_])


def _read_quantiles(
    lines: Iterable[str], *, source: str, models: set[str]
) -> dict[str, _LengthTable]:
    """Quantile laws of `models` from `derived_length_quantiles.csv` (every row is validated)."""
    numbered, _ = _header(lines, source, _QUANTILE_ALL_COLUMNS)
    tables: dict[str, _LengthTable] = {}
    for line_no, line in numbered:
        model, client_text, start_text, field_name, *numbers = _cells(
            line, len(_QUANTILE_ALL_COLUMNS), source=source, line_no=line_no
        )
        if not model:
            raise TraceError(source, line_no, "column 'model' is empty")
        if not field_name:
            raise TraceError(source, line_no, "column 'field' is empty")
        client = _integer(client_text, source=source, line_no=line_no, column="client")
        start_s = _window_start(start_text, source=source, line_no=line_no, width_s=LENGTH_WINDOW_S)
        mean, p50, p90, p99, max_ = (
            _number(text, source=source, line_no=line_no, column=column)
            for text, column in zip(numbers, ("mean", "p50", "p90", "p99", "max"), strict=True)
        )
        for low_name, low, high_name, high in (
            ("p50", p50, "p90", p90),
            ("p90", p90, "p99", p99),
            ("p99", p99, "max", max_),
        ):
            if high < low:
                raise TraceError(
                    source,
                    line_no,
                    f"column {high_name!r}: {high:g} is below {low_name!r} ({low:g})",
                )
        # The mean is a check on the row: no law with these quantiles has a mean above its max.
        if mean > max_:
            raise TraceError(source, line_no, f"column 'mean': {mean:g} is above 'max' ({max_:g})")
        if model in models:
            laws = tables.setdefault(model, {}).setdefault((client, start_s), {})
            if field_name in laws:
                raise TraceError(
                    source,
                    line_no,
                    f"model {model!r} client {client} window {start_text} s: field "
                    f"{field_name!r} appears twice",
                )
            laws[field_name] = _Quantiles(_quantile_knots(p50, p90, p99, max_))
    return tables


def _distribution(value: object, *, source: str, line_no: int, key: str) -> _Empirical | None:
    """A `{value: probability}` object as a law; None for an empty one (an idle window)."""
    if not isinstance(value, dict):
        raise TraceError(
            source, line_no, f"key {key!r}: expected an object of value -> probability"
        )
    if not value:
        return None
    points: list[tuple[float, float]] = []
    for text, probability in value.items():
        try:
            point = float(text)
        except ValueError:
            raise TraceError(
                source, line_no, f"key {key!r}: value {text!r} is not a number"
            ) from None
        if not math.isfinite(point) or point < 0:
            raise TraceError(source, line_no, f"key {key!r}: value {text!r} is not >= 0")
        if (
            isinstance(probability, bool)
            or not isinstance(probability, int | float)
            or not 0 <= probability <= 1
        ):
            raise TraceError(
                source,
                line_no,
                f"key {key!r}: probability of {text!r} is {probability!r}, not in [0, 1]",
            )
        points.append((point, float(probability)))
    points.sort()
    probabilities = np.array([p for _, p in points])
    total = float(probabilities.sum())
    # Upstream probabilities are rounded floats; a sum off by more than this is not rounding.
    if not 0.99 <= total <= 1.01:
        raise TraceError(source, line_no, f"key {key!r}: probabilities sum to {total:.4f}, not 1")
    cdf = np.cumsum(probabilities) / total
    return _Empirical(np.array([v for v, _ in points]), cdf)


def _read_lengths_jsonl(lines: Iterable[str], *, source: str) -> _LengthTable:
    table: _LengthTable = {}
    for line_no, record in json_objects(lines, source=source):
        for key in ("client", "window_start_s"):
            value = record.get(key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise TraceError(
                    source, line_no, f"key {key!r}: {value!r} is not a non-negative integer"
                )
        client, start_s = int(record["client"]), float(record["window_start_s"])
        if start_s % LENGTH_WINDOW_S != 0:
            raise TraceError(
                source,
                line_no,
                f"key 'window_start_s': {record['window_start_s']} is not a multiple of the "
                f"{LENGTH_WINDOW_S:g} s window",
            )
        if (client, start_s) in table:
            raise TraceError(
                source,
                line_no,
                f"client {client} window {record['window_start_s']} s appears twice",
            )
        laws: dict[str, _Law] = {}
        for key, value in record.items():
            if key in ("client", "window_start_s"):
                continue
            law = _distribution(value, source=source, line_no=line_no, key=key)
            if law is not None:
                laws[key] = law
        if "output_tokens" in laws and (
            "input_tokens" in laws or any(p in laws for p in _INPUT_PARTS)
        ):
            table[(client, start_s)] = laws
        elif laws:
            raise TraceError(
                source,
                line_no,
                "needs 'output_tokens' and 'input_tokens' (or the per-modality "
                f"{', '.join(_INPUT_PARTS)})",
            )
    return table


def read_lengths(files: Mapping[str, Iterable[str]], *, models: Iterable[str]) -> ServegenLengths:
    """Length laws of `models` from the files given (name -> lines): every `lengths_*_<model>.jsonl`
    of those models, and `derived_length_quantiles.csv` for the models without one. Other files
    are an error."""
    wanted = set(models)
    by_model: dict[str, _LengthTable] = {}
    quantile_files: list[tuple[str, Iterable[str]]] = []
    for source, lines in files.items():
        model = lengths_model(source)
        if model is not None:
            if model in wanted:
                by_model[model] = _read_lengths_jsonl(lines, source=source)
        elif PurePath(source).name == QUANTILES_FILE:
            quantile_files.append((source, lines))
        else:
            raise ValueError(
                f"{source}: not a servegen lengths file (lengths_<category>_<model>.jsonl or "
                f"{QUANTILES_FILE})"
            )
    for source, lines in quantile_files:
        for model, table in _read_quantiles(
            lines, source=source, models=wanted - set(by_model)
        ).items():
            by_model.setdefault(model, table)
    return ServegenLengths(by_model)


def _draw_field(
    laws: Sequence[Mapping[str, _Law]],
    owner: npt.NDArray[np.intp],
    name: str,
    rng: np.random.Generator,
) -> npt.NDArray[np.float64]:
    """Field `name` for each arrival, from law set `laws[owner[i]]`; 0 where a set lacks it."""
    out = np.zeros(len(owner))
    uniforms = rng.random(len(owner))
    for index in np.unique(owner).tolist():
        law = laws[index].get(name)
        if law is not None:
            mask = owner == index
            out[mask] = law.draw(uniforms[mask])
    return out


def _draw_tokens(
    table: _LengthTable,
    clients: npt.NDArray[np.int64],
    times_s: npt.NDArray[np.float64],
    rng: np.random.Generator,
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """(tokens_in, tokens_out) per arrival from its client's law of its 6 h window.

    A client without a law in that window draws from one of its own windows, a client without any
    from one of the model's: picked uniformly per arrival, since the files give no request counts
    to weight the pool by.
    """
    keys = list(table)
    key_index = {key: i for i, key in enumerate(keys)}
    by_client: dict[int, list[int]] = {}
    for i, (client, _) in enumerate(keys):
        by_client.setdefault(client, []).append(i)
    windows = np.floor(times_s / LENGTH_WINDOW_S) * LENGTH_WINDOW_S
    owner = np.empty(len(times_s), dtype=np.intp)
    picks = rng.random(len(times_s))
    for i, (client, window) in enumerate(zip(clients.tolist(), windows.tolist(), strict=True)):
        exact = key_index.get((client, window))
        if exact is not None:
            owner[i] = exact
            continue
        pool = by_client.get(client)
        owner[i] = (
            pool[int(picks[i] * len(pool))] if pool is not None else int(picks[i] * len(keys))
        )
    laws = [table[key] for key in keys]
    tokens_out = _draw_field(laws, owner, "output_tokens", rng)
    tokens_in = _draw_field(laws, owner, "input_tokens", rng)
    for part in _INPUT_PARTS:
        # Modalities are drawn independently: the files give each one's marginal law only.
        tokens_in += _draw_field(laws, owner, part, rng)
    return tokens_in, tokens_out


# --------------------------------------------------------------------------------------------------
# The entry point


def _selected_rows(
    windows: ArrivalWindows,
    window_s: tuple[float, float] | None,
    clients: Sequence[int] | None,
    top_clients: int | None,
) -> npt.NDArray[np.intp]:
    """Busy rows overlapping the time window, of the chosen clients (top ones by requests there)."""
    keep = np.ones(len(windows.rate), dtype=np.bool_)
    if window_s is not None:
        start_s, end_s = window_s
        keep &= (windows.start_s < end_s) & (windows.start_s + WINDOW_S > start_s)
    if clients is not None:
        keep &= np.isin(windows.clients, np.asarray(clients, dtype=np.int64))
    rows = np.flatnonzero(keep)
    if top_clients is not None and len(rows):
        ids, inverse = np.unique(windows.clients[rows], return_inverse=True)
        requests = np.bincount(inverse, weights=windows.rate[rows])
        # Most requests first; equal totals by client id (np.unique sorted them), deterministic.
        top = ids[np.argsort(-requests, kind="stable")[:top_clients]]
        rows = rows[np.isin(windows.clients[rows], top)]
    return rows


def parse_servegen(
    arrivals: Mapping[str, Iterable[str]],
    lengths: Mapping[str, Iterable[str]] | None = None,
    *,
    rng: np.random.Generator,
    window_s: tuple[float, float] | None = None,
    clients: Sequence[int] | None = None,
    top_clients: int | None = None,
    load_scale: float = 1.0,
    load_scale_by_model: Mapping[str, float] | None = None,
    job_type: str | None = None,
    max_arrivals: int = DEFAULT_MAX_ARRIVALS,
) -> list[Arrival]:
    """Draw requests from ServeGen arrival statistics (file name -> lines), one model per file.

    - Job type: the model from `arrivals_<category>_<model>.csv`, or `job_type` (one file only).
      Tenant: `<model>/<client>` (client ids are upstream chunk numbers, per model).
    - `window_s=(start, end)` in trace seconds (0 = midnight of the first day, days of 86,400 s):
      only windows overlapping it are drawn, arrivals outside it dropped, times re-based so that
      `start` is 0. Without it the files' whole span is drawn and re-based to its first window.
    - `clients` keeps only those client ids (of every file); `top_clients=N` keeps each model's N
      clients with the most requests inside the window.
    - `load_scale` (times `load_scale_by_model[model]`, for the models it names) multiplies every
      rate: the arrival count scales, the time axis (and so the day's shape) stays.
    - Before drawing, the expected count (sum of rate x 600 over the kept windows) is checked
      against `max_arrivals`; above it nothing is drawn.
    - Lengths: from `lengths` (see `read_lengths`) when given and the model has laws there; else
      `tokens_in`/`tokens_out` stay None (the scenario's service model must then not need them).

    Draws come only from `rng` (files in the order given, times, then lengths), so a seed fixes
    the output.
    """
    if not arrivals:
        raise ValueError("servegen needs at least one arrivals file")
    if job_type is not None and (not job_type or len(arrivals) > 1):
        raise ValueError(
            "job_type renames the model of one arrivals file; with several files each model is "
            "its own job type"
        )
    if window_s is not None and not (
        math.isfinite(window_s[0]) and math.isfinite(window_s[1]) and 0 <= window_s[0] < window_s[1]
    ):
        raise ValueError(f"window_s needs finite 0 <= start < end, got {window_s}")
    if top_clients is not None and top_clients < 1:
        raise ValueError(f"top_clients must be >= 1, got {top_clients}")
    scales = dict(load_scale_by_model or {})
    for name, value in (("load_scale", load_scale), *scales.items()):
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"load scale of {name!r} must be finite and > 0, got {value}")
    # A model of load_scale_by_model without a file is allowed: one scenario may replay all of
    # its models or a few (the scenario checks that some queue serves each named model).
    models = {source: arrivals_model(source) for source in arrivals}

    parsed = [read_arrival_windows(lines, source=source) for source, lines in arrivals.items()]
    selections = [_selected_rows(w, window_s, clients, top_clients) for w in parsed]
    if clients is not None:
        found = set().union(
            *(set(w.clients[rows].tolist()) for w, rows in zip(parsed, selections, strict=True))
        )
        absent = sorted(set(clients) - found)
        if absent:
            raise ValueError(f"clients {absent} have no busy window in the window asked for")
    factors = [load_scale * scales.get(models[w.source], 1.0) for w in parsed]
    expected = sum(
        float(w.rate[rows].sum()) * WINDOW_S * factor
        for w, rows, factor in zip(parsed, selections, factors, strict=True)
    )
    if expected > max_arrivals:
        raise ValueError(
            f"the window asks for ~{expected:,.0f} arrivals, above the cap of {max_arrivals:,}: "
            "narrow window_s, lower load_scale, or keep fewer clients (top_clients)"
        )
    origin_s = window_s[0] if window_s is not None else min(w.span_s[0] for w in parsed)
    end_s = window_s[1] if window_s is not None else math.inf

    lengths_table = ServegenLengths()
    if lengths:
        lengths_table = read_lengths(lengths, models=set(models.values()))
    out: list[Arrival] = []
    for w, rows, factor in zip(parsed, selections, factors, strict=True):
        model = models[w.source]
        label = job_type or model
        times_s, owners = _draw_window_times(w, rows, factor, rng)
        inside = (times_s >= origin_s) & (times_s < end_s)
        times_s, owners = times_s[inside], owners[inside]
        client_of = w.clients[owners]
        length_laws = lengths_table.by_model.get(model)
        if length_laws:
            tokens_in, tokens_out = _draw_tokens(length_laws, client_of, times_s, rng)
            out.extend(
                Arrival(
                    t - origin_s,
                    label,
                    tokens_in=int(t_in),
                    tokens_out=int(t_out),
                    tenant=f"{model}/{c}",
                )
                for t, c, t_in, t_out in zip(
                    times_s.tolist(),
                    client_of.tolist(),
                    tokens_in.tolist(),
                    tokens_out.tolist(),
                    strict=True,
                )
            )
        else:
            out.extend(
                Arrival(t - origin_s, label, tenant=f"{model}/{c}")
                for t, c in zip(times_s.tolist(), client_of.tolist(), strict=True)
            )
    if not out:
        where = "" if window_s is None else f" in window [{window_s[0]:g}, {window_s[1]:g}) s"
        raise ValueError(f"no arrivals drawn{where} from {', '.join(arrivals)}")
    out.sort(key=lambda arrival: arrival.arrival_s)
    return out
