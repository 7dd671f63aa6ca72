"""From live traffic to a deployed policy: serve the demo models with load on a real local Ray,
`bilevel record` what was served, `bilevel train` on the recorded scenario, then serve with
`--policy` that checkpoint and see jobs complete."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from policies.sim.scenario import parse_scenario
from policies.sim.traces import load_trace
from scheduler.cli import app
from scheduler.client import AsyncClient, JobRequest
from scheduler.commands.serve import with_policies
from scheduler.config import ServiceConfig
from scheduler.errors import JobTimeout
from scheduler.settings import Settings

QUEUES: list[dict[str, Any]] = [
    {"name": "embeddings", "job_types": ["embed"], "min_workers": 1},
    {"name": "classifier", "job_types": ["classify"], "min_workers": 1},
    {"name": "generator", "job_types": ["generate"], "min_workers": 1},
]
LOAD = (
    [JobRequest("embed", {"text": f"document {i}"}) for i in range(40)]
    + [JobRequest("classify", {"text": f"is {i} a question?"}) for i in range(20)]
    + [JobRequest("generate", {"prompt": f"once {i}", "max_tokens": 4}) for i in range(6)]
)
# As short as training goes: one PPO iteration, validated on one seed, serially, without the
# forecast fit or the teachers' tuning.
TINY_TRAINING = [
    "--workers", "0", "--iterations", "1", "--eval-every", "1", "--eval-seeds", "1",
    "--no-forecast", "--imitation-coef", "0",
]  # fmt: skip


def _raw(settings: Settings) -> dict[str, Any]:
    return {
        "store": {
            **settings.model_dump(),
            "redis_url": settings.url(),
            "lease_s": 2.0,
            "record": True,
        },
        "queues": QUEUES,
        "routing": {"policy": "rule"},
        "allocation": {"policy": "proportional", "budget": 3, "tick_s": 0.3},
    }


@pytest.fixture
def services(ray_local: None) -> Iterator[list[Any]]:
    """Service handles a test starts; all stopped at the end, whatever happened."""
    started: list[Any] = []
    yield started
    for handle in started:
        handle.stop(timeout_s=20.0)


def _serve(services: list[Any], config: ServiceConfig) -> Any:
    from scheduler.service.runner import start_service

    handle = start_service(config, leader_ttl_s=1.0, wait_s=30.0)
    services.append(handle)
    assert handle.wait_leading(20.0)
    return handle


async def _drive(settings: Settings, rounds: int) -> list[Any]:
    """The load, `rounds` times, a round's jobs submitted together and awaited."""
    results: list[Any] = []
    async with AsyncClient(settings=settings) as client:
        for _ in range(rounds):
            handles = await client.submit_many(LOAD)
            results += await client.gather(handles, timeout=120)
    return results


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_record_train_and_serve_the_trained_policy(
    services: list[Any], settings: Settings, tmp_path: Path, run: Any
) -> None:
    """What the service served becomes a trace and a scenario (its queues, measured service and
    model-load times); a policy trained on it serves the same service, and every job completes."""
    config_path = tmp_path / "service.yaml"
    config_path.write_text(yaml.safe_dump(_raw(settings)))
    config = ServiceConfig.load(config_path)
    first = _serve(services, config)
    assert len(run(_drive(settings, 2))) == 2 * len(LOAD)
    first.stop(timeout_s=20.0)
    services.remove(first)

    out = tmp_path / "recorded"
    target = ["--redis-url", settings.url() or "", "--namespace", settings.namespace]
    recorded = CliRunner().invoke(
        app, ["record", "--out", str(out), "--config", str(config_path), *target]
    )
    assert recorded.exit_code == 0, recorded.output
    scenario_path = out / "scenario.yaml"
    scenario = parse_scenario(scenario_path.read_text(), source=str(scenario_path))
    queues = {q.name: q for q in scenario.queues}
    assert {n: q.job_types for n, q in queues.items()} == {
        q["name"]: tuple(q["job_types"]) for q in QUEUES
    }
    # Every queue's models were loaded by a worker and timed; the generator's GRU is the biggest.
    assert all(q.model_load_s > 0 for q in queues.values())
    assert all(q.service.nominal_mean_s > 0 for q in queues.values())
    assert scenario.allocation.budget == 3
    trace_lines = (out / "trace.csv").read_text().splitlines(keepends=True)
    arrivals = load_trace("generic_csv", trace_lines, source="trace.csv")
    assert len(arrivals) == 2 * len(LOAD)
    assert all(a.service_s is not None for a in arrivals)

    checkpoint = tmp_path / "ckpt" / "recorded"
    trained = CliRunner().invoke(
        app,
        ["train", "--scenario", str(scenario_path), "--out", str(checkpoint), *TINY_TRAINING],
    )
    assert trained.exit_code == 0, trained.output
    weights = checkpoint.with_suffix(".pt")
    assert weights.is_file()

    handle = _serve(services, with_policies(config, str(weights), None))

    async def jobs() -> list[Any]:
        async with AsyncClient(settings=settings) as client:
            handles = await client.submit_many(LOAD[::4])
            try:
                # Fresh workers load every model first, on a machine other work may share.
                return await client.gather(handles, timeout=240)
            except JobTimeout:
                infos = [await h.info() for h in handles]
                late = [(j.id, j.status, j.queue) for j in infos if not j.status.finished]
                state = (late[:3], handle.status(), handle.pool_view())
                raise AssertionError(f"jobs unfinished: {state}") from None

    results = run(jobs())
    assert len(results) == len(LOAD[::4])
    assert all(r is not None for r in results)
    shown = CliRunner().invoke(app, ["status", *target, "--json", "--window", "0"])
    assert shown.exit_code == 0, shown.output
    assert str(weights) in shown.output or "learned" in shown.output
    assert sum(handle.status()["controller"]["target"].values()) <= 3
