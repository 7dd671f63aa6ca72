"""Parse throughput of the trace adapters on synthetic traces; prints one JSON object.

Synthetic so it runs anywhere: an Azure Functions invocations file (1,000 functions x 1,440 minutes,
heavy-tailed per-function rates like the real sample) replayed for one hour, and 100,000-row
generic CSV and Mooncake traces.

Run `python -m benchmarks.bench_traces [--seed N]`.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import numpy as np

from policies.sim.arrivals import Arrival
from policies.sim.traces import parse_azure_functions, parse_generic_csv, parse_mooncake

FUNCTIONS = 1_000
MINUTES = 1_440
ROWS = 100_000


def _azure_functions_files(rng: np.random.Generator) -> tuple[list[str], list[str]]:
    # Per-minute rates span five decades across functions, as in the real trace.
    rates = np.exp(rng.normal(0.0, 2.5, size=FUNCTIONS))
    counts = rng.poisson(rates[:, None], size=(FUNCTIONS, MINUTES))
    ids = [f"{i:064x}" for i in range(FUNCTIONS)]
    header = "HashFunction,HashApp,HashOwner," + ",".join(f"minute_{m + 1}" for m in range(MINUTES))
    inv = [header] + [
        f"{h},{h},{h}," + ",".join(map(str, row))
        for h, row in zip(ids, counts.tolist(), strict=True)
    ]
    percentiles = ("0", "1", "25", "50", "75", "99", "100")
    run = [
        "HashFunction,HashApp,HashOwner," + ",".join(f"percentile_Average_{p}" for p in percentiles)
    ]
    for h in ids:
        values_ms = np.sort(rng.lognormal(5.0, 1.5, size=len(percentiles)))
        run.append(f"{h},{h},{h}," + ",".join(f"{v:.1f}" for v in values_ms))
    return inv, run


def _timed(parse: Callable[[], list[Arrival]]) -> dict[str, float]:
    start = time.perf_counter()
    arrivals = parse()
    wall_s = time.perf_counter() - start
    return {
        "arrivals": len(arrivals),
        "wall_s": round(wall_s, 3),
        "arrivals_per_s": round(len(arrivals) / wall_s),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)

    inv, run = _azure_functions_files(rng)
    times_s = np.sort(rng.uniform(0, 3600, size=ROWS))
    generic = ["arrival_s,job_type,service_s"] + [
        f"{t:.6f},t{i % 4},{0.5:.3f}" for i, t in enumerate(times_s)
    ]
    mooncake = [
        json.dumps(
            {
                "timestamp": int(t * 1000),
                "input_length": 1000,
                "output_length": 100,
                "hash_ids": [0, i],
            }
        )
        for i, t in enumerate(times_s)
    ]
    result = {
        "azure_functions_1h": _timed(
            lambda: parse_azure_functions(
                inv,
                run,
                rng=np.random.default_rng(args.seed),
                minutes=(0, 60),
                job_type_by="function",
            )
        ),
        "generic_csv": _timed(lambda: parse_generic_csv(generic)),
        "mooncake": _timed(lambda: parse_mooncake(mooncake)),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
