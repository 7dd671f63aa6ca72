"""`bilevel replay` end to end: a small scenario's jobs through the live service (real Redis, local
Ray, synthetic sleeping handlers) and the simulator, and the overhead probe."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from policies.sim.scenario import parse_scenario, prepare
from policies.sim.timescale import cut
from scheduler.cli import app
from scheduler.embedded_redis import EmbeddedRedis

SMALL: dict[str, Any] = {
    "name": "small_replay",
    "queues": [
        {"name": "fast", "job_types": ["fast"], "service": {"kind": "exponential", "mean_s": 0.2},
         "model_load_s": 1.0, "slo_s": 2.0, "min_workers": 1},
        {"name": "slow", "job_types": ["slow"], "service": {"kind": "constant", "mean_s": 0.5},
         "model_load_s": 2.0, "slo_s": 4.0, "min_workers": 1},
    ],
    "allocation": {"policy": "proportional", "tick_s": 1.0, "budget": 2},
    "workload": {"generators": [{"kind": "poisson", "rate_per_s": 2.0,
                                 "mix": {"fast": 3, "slow": 1}}]},
    "duration_s": 60.0,
}  # fmt: skip


def _replay(
    raw: dict[str, Any], tmp_path: Path, redis_url: str, *, seed: int, duration_s: float
) -> tuple[int, dict[str, Any]]:
    """`bilevel replay --json` of scenario `raw` at 10x on `redis_url`: the number of jobs the
    simulator draws for it, and the JSON it printed (it must exit 0)."""
    path = tmp_path / f"{raw['name']}.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    expected = len(cut(prepare(parse_scenario(raw), seed=seed), duration_s).jobs.arrivals)
    result = CliRunner().invoke(
        app,
        ["replay", "--scenario", str(path), "--speed", "10", "--duration-s", str(duration_s),
         "--seed", str(seed), "--json", "--redis-url", redis_url],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    out: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return expected, out


@pytest.mark.slow
def test_replay_counts_every_job_live_and_reports_the_prediction(
    ray_local: None, redis_server: EmbeddedRedis, tmp_path: Path
) -> None:
    """Every submitted job is in the live JSON, finished; the simulator ran the same jobs; the
    errors name every compared metric; the service it started is gone afterwards."""
    expected, out = _replay(SMALL, tmp_path, redis_server.url, seed=4, duration_s=30.0)
    live, sim = out["live"], out["sim"]
    assert expected > 10
    assert live["submitted"] == expected
    assert live["jobs"] == expected
    assert live["arrived"] == expected
    assert live["unfinished"] == 0
    assert live["failed"] == 0
    assert sim["jobs"] == expected
    assert sim["mean_jct_s"] > 0
    assert out["jobs"] == live["jobs"]
    assert set(out["error"]) >= {"mean_jct_s", "p50_jct_s", "p99_jct_s", "slo_attainment"}
    assert out["error"]["mean_jct_s"] is not None
    assert out["speed"] == 10.0
    # Live JCTs are in scenario seconds: no job finishes faster than it slept.
    assert live["p50_jct_s"] > 0.05
    import ray

    assert not [a for a in ray.util.list_named_actors(all_namespaces=True) if "replay" in str(a)]


@pytest.mark.slow
def test_replay_runs_a_queue_on_a_real_torch_model(
    ray_local: None, redis_server: EmbeddedRedis, tmp_path: Path
) -> None:
    """A queue whose scenario names a live_model is served by workers that load that demo model
    and compute with it: every job finishes, the load was timed here and given to the simulator
    (uncompressed: a real load takes its own time at any speed)."""
    raw = {
        **SMALL,
        "name": "torch_replay",
        "queues": [{**SMALL["queues"][0], "live_model": "embed"}, SMALL["queues"][1]],
    }
    expected, out = _replay(raw, tmp_path, redis_server.url, seed=2, duration_s=20.0)
    live = out["live"]
    assert expected > 5
    assert (live["jobs"], live["unfinished"], live["failed"]) == (expected, 0, 0)
    assert set(out["model_loads_s"]) == {"fast"}
    # Building the embedding table and a warm-up pass: real work, far from the 0.1 s the
    # scenario's 1 s load would sleep at 10x.
    assert out["model_loads_s"]["fast"] > 0.05
    assert out["sim"]["jobs"] == expected


@pytest.mark.slow
def test_overhead_probe_measures_every_overhead(ray_local: None) -> None:
    """The probe returns samples of dispatch, job overhead and switch, all non-negative means
    that fit a Calibration."""
    from scheduler.service.overheads import measure_overheads

    overheads = measure_overheads(isolated=10, burst=40, switches=2)
    report = overheads.to_dict()
    assert report["dispatch"]["n"] == 10
    assert report["job_overhead"]["n"] == 39
    assert report["switch"]["n"] >= 1
    calibration = overheads.calibration()
    assert calibration.dispatch_s >= 0
    assert calibration.job_overhead_s >= 0
