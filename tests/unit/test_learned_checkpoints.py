"""Checkpoint files: round trip, refusals with clear errors, the resolver, and `simulate --policy`."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

from policies.allocation import ProportionalAllocator
from policies.features import FEATURE_SCHEMA_VERSION
from policies.learned.allocator import LearnedAllocator
from policies.learned.forecast import FORECAST_FEATURE_NAMES, ForecasterConfig
from policies.learned.networks import AllocatorNetConfig
from policies.learned.policy import LearnedPolicy
from policies.learned.router import LearnedRouter
from policies.views import AllocationBounds, ClusterView, QueueView
from scheduler.checkpoints import (
    CheckpointError,
    default_checkpoint_path,
    load_checkpoint,
    read_metadata,
    resolve_allocator,
    resolve_router,
    save_checkpoint,
)

SCENARIO_YAML = """
name: tiny
queues:
  - {name: a, job_types: [a], service: {kind: exponential, mean_s: 0.5}, model_load_s: 2.0}
  - {name: b, job_types: [b], service: {kind: exponential, mean_s: 0.5}, model_load_s: 2.0}
allocation: {policy: proportional, tick_s: 1.0, budget: 6}
workload:
  generators:
    - {kind: poisson, rate_per_s: 6.0, mix: {a: 3, b: 1}}
duration_s: 60.0
"""


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    policy = LearnedPolicy.create(AllocatorNetConfig(hidden=16), max_moves=3, seed=5)
    weights, _ = save_checkpoint(tmp_path / "ckpt", policy, {"scenarios": ["tiny"]})
    return weights


def _view() -> ClusterView:
    queues = tuple(
        QueueView(
            name=n, job_types=frozenset({n}), depth=d, workers_ready=r, arrival_rate_per_s=2.0
        )
        for n, d, r in (("a", 9, 1), ("b", 0, 3), ("c", 2, 1))
    )
    return ClusterView(now_s=5.0, tick_s=1.0, budget=6, queues=queues)


def test_round_trip_preserves_weights_shapes_and_metadata(checkpoint: Path) -> None:
    """Saved then loaded: same hyper-parameters, same weights, same decisions; metadata kept."""
    policy, meta = load_checkpoint(checkpoint)
    assert policy.allocator_net.config.hidden == 16
    assert policy.max_moves == 3
    assert meta["scenarios"] == ["tiny"]
    assert meta["feature_schema_version"] == FEATURE_SCHEMA_VERSION
    original = LearnedPolicy.create(AllocatorNetConfig(hidden=16), max_moves=3, seed=5)
    for key, value in original.state_dict().items():
        torch.testing.assert_close(policy.state_dict()[key], value)
    assert policy.allocator().allocate(_view()) == original.allocator().allocate(_view())
    # Either file of the pair, or the bare stem, names the checkpoint.
    assert load_checkpoint(checkpoint.with_suffix(".json"))[1] == meta
    assert load_checkpoint(checkpoint.with_suffix(""))[1] == meta


def test_forecaster_round_trips_and_a_policy_without_one_still_loads(tmp_path: Path) -> None:
    """A policy with a rate forecaster keeps its config and weights through a checkpoint; its
    allocator plans with the forecast. Metadata written before forecasters existed (no
    "forecaster" entry) loads as a policy without one, and weights of a forecaster the metadata
    does not describe are refused, naming the file."""
    config = ForecasterConfig(window_loads=3.0, hidden=8)
    policy = LearnedPolicy.create(
        AllocatorNetConfig.residual([("switch_aware", {})], hidden=16),
        forecaster_config=config,
        seed=2,
    )
    assert policy.forecaster_net is not None
    with torch.no_grad():
        policy.forecaster_net.head.bias.copy_(torch.tensor([0.0, 0.0, 3.0]))
    weights, meta_path = save_checkpoint(tmp_path / "fc", policy, {})
    loaded, _ = load_checkpoint(weights)
    assert loaded.forecaster_net is not None
    assert loaded.forecaster_net.config == config
    for key, value in policy.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value)
    views = [_view(), _view()]
    views[1] = ClusterView(
        now_s=60.0,
        tick_s=1.0,
        budget=6,
        queues=tuple(dataclasses.replace(q, arrival_rate_per_s=9.0) for q in views[0].queues),
    )
    ours, theirs = loaded.allocator(), policy.allocator()
    assert [ours.allocate(v) for v in views] == [theirs.allocate(v) for v in views]
    assert ours.forecaster is not None
    # Weighted to the slow average, the forecast after a jump stays well below the new rate.
    planned = ours.forecaster.forecast_view(views[1])
    assert all(q.arrival_rate_per_s < 5.0 for q in planned.queues)

    meta = json.loads(meta_path.read_text())
    del meta["hyperparameters"]["forecaster"]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="forecaster") as info:
        load_checkpoint(weights)
    assert str(weights) in str(info.value)
    # A forecaster saved before its features were configurable read every feature.
    every = LearnedPolicy.create(
        forecaster_config=ForecasterConfig(hidden=8, features=FORECAST_FEATURE_NAMES), seed=2
    )
    every_weights, every_meta = save_checkpoint(tmp_path / "every", every, {})
    meta = json.loads(every_meta.read_text())
    del meta["hyperparameters"]["forecaster"]["features"]
    every_meta.write_text(json.dumps(meta))
    reloaded = load_checkpoint(every_weights)[0].forecaster_net
    assert reloaded is not None
    assert reloaded.config.features == FORECAST_FEATURE_NAMES

    plain = LearnedPolicy.create(AllocatorNetConfig(hidden=16), seed=2)
    old_weights, old_meta = save_checkpoint(tmp_path / "old", plain, {})
    meta = json.loads(old_meta.read_text())
    del meta["hyperparameters"]["forecaster"]
    old_meta.write_text(json.dumps(meta))
    assert load_checkpoint(old_weights)[0].forecaster_net is None


def test_mismatched_feature_schema_is_refused_naming_both_versions(checkpoint: Path) -> None:
    meta_path = checkpoint.with_suffix(".json")
    meta = json.loads(meta_path.read_text())
    meta["feature_schema_version"] = FEATURE_SCHEMA_VERSION + 7
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError) as info:
        resolve_allocator(str(checkpoint))
    message = str(info.value)
    assert f"version {FEATURE_SCHEMA_VERSION + 7}" in message
    assert f"version {FEATURE_SCHEMA_VERSION}" in message
    assert str(checkpoint) in message


def test_corrupt_or_missing_files_name_the_path(checkpoint: Path, tmp_path: Path) -> None:
    checkpoint.write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="corrupt") as info:
        load_checkpoint(checkpoint)
    assert str(checkpoint) in str(info.value)
    checkpoint.with_suffix(".json").write_text("{broken")
    with pytest.raises(CheckpointError, match="unreadable"):
        load_checkpoint(checkpoint)
    missing = tmp_path / "nowhere.pt"
    with pytest.raises(CheckpointError, match=r"nowhere\.pt"):
        resolve_allocator(str(missing))


def test_resolver_maps_names_paths_and_learned(checkpoint: Path) -> None:
    """Registry names give heuristics (with params), paths and "learned" give learned policies."""
    heuristic = resolve_allocator("proportional", beta=0.5)
    assert isinstance(heuristic, ProportionalAllocator)
    assert heuristic.beta == 0.5
    learned = resolve_allocator(checkpoint, bounds=AllocationBounds(default_min=1), max_moves=2)
    assert isinstance(learned, LearnedAllocator)
    assert learned.max_moves == 2
    assert isinstance(resolve_router(checkpoint), LearnedRouter)
    with pytest.raises(ValueError, match="maxweight"):
        resolve_allocator("nonesuch")
    with pytest.raises(ValueError, match="bad parameters"):
        resolve_allocator(checkpoint, beta=1.0)


def test_shipped_default_checkpoint_loads_and_is_small() -> None:
    """`learned` is the packaged checkpoint: current schema, under 1 MB, a working allocator."""
    path = default_checkpoint_path()
    assert path.stat().st_size < 1_000_000
    assert read_metadata(path)["feature_schema_version"] == FEATURE_SCHEMA_VERSION
    allocator = resolve_allocator("learned")
    allocation = allocator.allocate(_view())
    assert sum(allocation.values()) <= 6
    assert isinstance(resolve_router("learned"), LearnedRouter)


@pytest.fixture
def app() -> typer.Typer:
    from scheduler.cli import app as cli_app

    return cli_app


def test_simulate_runs_a_checkpoint_and_learned(
    app: typer.Typer, checkpoint: Path, tmp_path: Path
) -> None:
    """`bilevel simulate --policy PATH` and `--policy learned --router learned` print results."""
    scenario = tmp_path / "tiny.yaml"
    scenario.write_text(SCENARIO_YAML)
    for policy, router in ((str(checkpoint), "rule"), ("learned", "learned")):
        result = CliRunner().invoke(
            app,
            ["simulate", "--scenario", str(scenario), "--policy", policy, "--router", router,
             "--json"],
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        out = json.loads(result.output)
        assert out["jobs"] > 0
        assert out["policy"] == policy
        assert np.isfinite(out["mean_jct_s"])


def test_simulate_refuses_a_bad_checkpoint_clearly(
    app: typer.Typer, checkpoint: Path, tmp_path: Path
) -> None:
    scenario = tmp_path / "tiny.yaml"
    scenario.write_text(SCENARIO_YAML)
    checkpoint.write_bytes(b"garbage")
    result = CliRunner().invoke(
        app, ["simulate", "--scenario", str(scenario), "--policy", str(checkpoint)]
    )
    assert result.exit_code == 2
    assert "corrupt" in result.output
    assert "Traceback" not in result.output
