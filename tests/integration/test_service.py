"""The service end to end: CLI checks without Ray, then router + controller + WorkerPool +
ModelWorkers on a real local Ray and a real Redis."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from scheduler.cli import app
from scheduler.client import AsyncClient, Client, JobRequest
from scheduler.embedded_redis import EmbeddedRedis
from scheduler.errors import JobTimeout
from scheduler.settings import Settings
from tests.conftest import REPO_ROOT

DEMO_CONFIG = REPO_ROOT / "deploy" / "service.yaml"


def _write(tmp_path: Path, raw: dict[str, Any]) -> Path:
    path = tmp_path / "service.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def _demo_raw() -> dict[str, Any]:
    raw: dict[str, Any] = yaml.safe_load(DEMO_CONFIG.read_text(encoding="utf-8"))
    return raw


class TestServeChecks:
    """`bilevel serve` refuses a bad setup before it starts anything, naming what is wrong."""

    def test_demo_config_is_valid(self) -> None:
        """deploy/service.yaml loads and covers the three demo job types."""
        from scheduler.config import ServiceConfig

        config = ServiceConfig.load(DEMO_CONFIG)
        assert {t for q in config.queues for t in q.job_types} == {"embed", "classify", "generate"}

    def test_bad_field_exits_2_with_its_path(self, tmp_path: Path) -> None:
        """A max below the min is reported with the field path, and no traceback."""
        raw = _demo_raw()
        raw["queues"][1]["min_workers"] = 2
        raw["queues"][1]["max_workers"] = 1
        result = CliRunner().invoke(app, ["serve", "--config", str(_write(tmp_path, raw))])
        assert result.exit_code == 2
        assert "queues.1" in result.output
        assert "queues.1.max_workers: 1 is below min_workers (2)" in result.output
        assert "Traceback" not in result.output

    def test_unknown_policy_and_unusable_checkpoint_exit_2_naming_the_field(
        self, tmp_path: Path
    ) -> None:
        """--policy and --router take a policy name, 'learned' or a checkpoint; anything else,
        or a checkpoint of another feature schema, stops serve before Ray starts."""
        from policies.learned.policy import LearnedPolicy
        from scheduler.checkpoints import save_checkpoint

        config = str(_write(tmp_path, _demo_raw()))
        unknown = CliRunner().invoke(app, ["serve", "--config", config, "--policy", "nope"])
        assert unknown.exit_code == 2
        assert "allocation.policy: no checkpoint at nope" in unknown.output
        assert "known policy names: " in unknown.output
        _, meta_path = save_checkpoint(tmp_path / "old", LearnedPolicy.create(seed=0))
        meta = json.loads(meta_path.read_text())
        meta["feature_schema_version"] += 7
        meta_path.write_text(json.dumps(meta))
        ckpt = tmp_path / "old.pt"
        old = CliRunner().invoke(app, ["serve", "--config", config, "--router", str(ckpt)])
        assert old.exit_code == 2
        assert "routing.policy:" in old.output
        assert "schema" in old.output
        assert "Traceback" not in old.output

    def test_unknown_field_is_named(self, tmp_path: Path) -> None:
        """A misspelt key is reported with its path."""
        raw = _demo_raw()
        raw["allocation"]["tick"] = 1
        result = CliRunner().invoke(app, ["serve", "--config", str(_write(tmp_path, raw))])
        assert result.exit_code == 2
        assert "allocation.tick" in result.output

    def test_missing_handler_names_queue_index_and_job_type(self, tmp_path: Path) -> None:
        """A job type no handler module registers is named with its queue's index."""
        raw = _demo_raw()
        raw["queues"][2]["job_types"] = ["generate", "translate"]
        result = CliRunner().invoke(app, ["serve", "--config", str(_write(tmp_path, raw))])
        assert result.exit_code == 2
        assert "queues.2.job_types.1" in result.output
        assert "'translate'" in result.output

    def test_broken_handler_module_is_named(self, tmp_path: Path) -> None:
        """A handler module that cannot be imported is named."""
        raw = _demo_raw()
        raw["handlers"] = ["workers.demo_models", "no_such_module_here"]
        result = CliRunner().invoke(app, ["serve", "--config", str(_write(tmp_path, raw))])
        assert result.exit_code == 2
        assert "no_such_module_here" in result.output


# A scenario over the demo's job types: two replicas of the embedding model share its traffic.
DEMO_SCENARIO: dict[str, Any] = {
    "name": "demo_replicas",
    "queues": [
        {"name": "embed_a", "job_types": ["embed"], "min_workers": 1, "slo_s": 1.0,
         "service": {"kind": "exponential", "mean_s": 0.01}, "model_load_s": 1.0},
        {"name": "embed_b", "job_types": ["embed"], "min_workers": 1, "slo_s": 1.0,
         "service": {"kind": "exponential", "mean_s": 0.01}, "model_load_s": 1.0},
        {"name": "classify", "job_types": ["classify"], "min_workers": 1,
         "service": {"kind": "exponential", "mean_s": 0.02}, "model_load_s": 1.0},
    ],
    "routing": {"policy": "shortest_wait"},
    "allocation": {"policy": "proportional", "tick_s": 0.3, "budget": 3},
    "workload": {"generators": [{"kind": "poisson", "rate_per_s": 5.0, "mix": {"embed": 1}}]},
    "duration_s": 60.0,
}  # fmt: skip


class TestServeAScenario:
    """`bilevel serve --scenario`: the scenario's layout, service settings from --config."""

    def test_a_scenario_names_no_handlers_so_serve_says_where_they_go(self) -> None:
        """A shipped scenario's job types have no handler: exit 2 naming the queue and --config."""
        scenario = REPO_ROOT / "policies" / "scenarios" / "bursty_switch.yaml"
        result = CliRunner().invoke(app, ["serve", "--scenario", str(scenario)])
        assert result.exit_code == 2
        assert "queues.0.job_types.0: no handler is registered for job type 'small'" in (
            result.output
        )
        assert "give --config FILE listing handler modules" in result.output
        assert "Traceback" not in result.output

    def test_the_config_beside_a_scenario_may_not_repeat_its_layout(self, tmp_path: Path) -> None:
        """A --config with queues or a budget beside --scenario is refused naming the key."""
        scenario = tmp_path / "scenario.yaml"
        scenario.write_text(yaml.safe_dump(DEMO_SCENARIO), encoding="utf-8")
        result = CliRunner().invoke(
            app, ["serve", "--scenario", str(scenario), "--config", str(DEMO_CONFIG)]
        )
        assert result.exit_code == 2
        assert "queues: the scenario gives the queues: leave them out" in result.output
        assert "allocation.budget: the scenario gives allocation.budget" in result.output
        assert str(DEMO_CONFIG) in result.output

    def test_serve_needs_a_config_or_a_scenario(self) -> None:
        """Neither option: exit 2 saying both ways to start."""
        result = CliRunner().invoke(app, ["serve"])
        assert result.exit_code == 2
        assert "give --config FILE, or --scenario FILE" in result.output


class TestSubmitAndStatusCli:
    def test_submit_without_redis_url_is_refused(self) -> None:
        """With no URL anywhere, submit says how to give one instead of starting an empty Redis."""
        result = CliRunner().invoke(app, ["submit", "embed", '{"text": "x"}'])
        assert result.exit_code == 2
        assert "--redis-url" in result.output

    def test_submit_to_the_default_namespace_of_a_served_redis_names_the_served_one(
        self, redis_server: EmbeddedRedis, namespace: str
    ) -> None:
        """`submit --redis-url URL` without --namespace, where a service serves another namespace:
        exit 1 at once, naming the namespace that is served, nothing written (not a timeout)."""
        import asyncio

        from scheduler.connection import client_from_url
        from scheduler.keys import Keys

        async def plant(present: bool) -> None:
            redis = client_from_url(redis_server.url)
            keys = Keys(namespace)
            record = keys.health("router", "serve/router#0")
            if present:
                await redis.set(record, "{}", px=30_000)
                await redis.sadd(keys.health_index, record)
            else:
                await redis.delete(record, keys.health_index)
            await redis.aclose()

        asyncio.run(plant(True))
        try:
            args = ["submit", "embed", '{"text": "x"}', "--wait", "--redis-url", redis_server.url]
            result = CliRunner().invoke(app, args)
        finally:
            asyncio.run(plant(False))
        assert result.exit_code == 1, result.output
        assert "no bilevel service serves namespace 'default'" in result.output
        assert f"served there: {namespace}" in result.output
        assert "Traceback" not in result.output

    def test_submit_bad_payload_json(self) -> None:
        """PAYLOAD_JSON must be JSON."""
        result = CliRunner().invoke(app, ["submit", "embed", "{text", "--redis-url", "redis://x"])
        assert result.exit_code == 2
        assert "not valid JSON" in result.output

    def test_status_of_an_idle_namespace(self, redis_server: EmbeddedRedis, namespace: str) -> None:
        """status works on a namespace no service runs: queues from the config, no leaders."""
        args = ["status", "--redis-url", redis_server.url, "--namespace", namespace]
        result = CliRunner().invoke(app, [*args, "--window", "0", "--json"])
        assert result.exit_code == 0, result.output
        out = json.loads(result.output)
        assert out["leaders"] == {"router": False, "controller": False}
        assert out["namespace"] == namespace


# -- on Ray ----------------------------------------------------------------------------------------


def _ray_config(settings: Settings, **allocation: Any) -> Any:
    from scheduler.config import ServiceConfig

    raw = _demo_raw()
    # Short leases and locks, so failover completes within a test.
    raw["store"] = {**settings.model_dump(), "redis_url": settings.url(), "lease_s": 2.0}
    raw["allocation"] = {**raw["allocation"], "tick_s": 0.3, **allocation}
    return ServiceConfig.from_mapping(raw)


@pytest.fixture
def services(ray_local: None) -> Iterator[list[Any]]:
    """Service handles a test starts; all stopped at the end, whatever happened."""
    started: list[Any] = []
    yield started
    for handle in started:
        handle.stop(timeout_s=20.0)


def _start(services: list[Any], config: Any) -> Any:
    from scheduler.service.runner import start_service

    handle = start_service(config, leader_ttl_s=1.0, wait_s=30.0)
    services.append(handle)
    return handle


DEMO_JOBS = [
    JobRequest("embed", {"text": "the quick brown fox"}),
    JobRequest("classify", {"text": "is this a question?"}),
    JobRequest("generate", {"prompt": "once upon", "max_tokens": 8}),
]


@pytest.mark.slow
class TestServiceOnRay:
    def test_every_demo_job_type_sync_and_async(
        self, services: list[Any], settings: Settings, run: Any
    ) -> None:
        """Each demo job type comes back with a result, through the sync and the async client."""
        config = _ray_config(settings, budget=3, policy="proportional")
        config = config.model_copy(
            update={"queues": tuple(q.model_copy(update={"min_workers": 1}) for q in config.queues)}
        )
        handle = _start(services, config)
        assert handle.wait_leading(20.0)
        with Client(settings=settings) as client:
            embed, classify, generate = client.submit_many(DEMO_JOBS)
            try:
                vector = embed.result(timeout=30)
            except JobTimeout:
                info = (embed.info(), client.stats(), handle.status(), handle.pool_view())
                raise AssertionError(f"no result: {info}") from None
            assert isinstance(vector, list)
            assert len(vector) == 128
            assert "label" in classify.result(timeout=30)
            assert isinstance(generate.result(timeout=30), str)

        async def many() -> list[Any]:
            async with AsyncClient(settings=settings) as client:
                handles = await client.submit_many(DEMO_JOBS * 10)
                return await asyncio.gather(*(h.result(timeout=30) for h in handles))

        results = run(many())
        assert len(results) == 30
        assert all(r is not None for r in results)
        status = handle.status()
        assert status["router"]["routed"] >= 33
        assert status["controller"]["leading"]
        args = ["status", "--redis-url", handle.redis_url, "--namespace", handle.namespace]
        shown = CliRunner().invoke(app, [*args, "--json", "--window", "0.2"])
        assert shown.exit_code == 0, shown.output
        out = json.loads(shown.output)
        assert out["leaders"] == {"router": True, "controller": True}
        assert {q["queue"]: q["workers"] for q in out["queues"]} == status["controller"]["target"]

    def test_a_scenario_serves_live(
        self, services: list[Any], settings: Settings, tmp_path: Path
    ) -> None:
        """A scenario's queues, routing and allocation, served with the demo handlers: every job
        completes, the embeddings spread over both replicas, and the controller keeps the
        scenario's budget and minimums (one worker each, the whole budget of three)."""
        from policies.sim.scenario import parse_scenario
        from scheduler.config import ServiceConfig

        scenario = parse_scenario(DEMO_SCENARIO)
        config = ServiceConfig.from_scenario(
            scenario,
            store={**settings.model_dump(), "redis_url": settings.url(), "lease_s": 2.0},
            handlers=["workers.demo_models"],
        )
        handle = _start(services, config)
        assert handle.wait_leading(20.0)
        with Client(settings=settings) as client:
            handles = client.submit_many(
                [JobRequest("embed", {"text": f"doc {i}"}) for i in range(40)]
                + [JobRequest("classify", {"text": "a cat?"})] * 5
            )
            results = client.gather(handles, timeout=60)
            queues = {h.info().queue for h in handles[:40]}
        assert len(results) == 45
        assert queues == {"embed_a", "embed_b"}
        target = handle.status()["controller"]["target"]
        assert set(target) == {"embed_a", "embed_b", "classify"}
        assert target == {"embed_a": 1, "embed_b": 1, "classify": 1}

    def test_the_learned_policies_serve_live(
        self, services: list[Any], settings: Settings, run: Any
    ) -> None:
        """With allocation.policy and routing.policy "learned" (the shipped checkpoint), the
        controller allocates with the network inside the guardrails and every job completes."""
        config = _ray_config(settings, budget=3, policy="learned", params={})
        config = config.model_copy(
            update={"routing": config.routing.model_copy(update={"policy": "learned"})}
        )
        handle = _start(services, config)
        assert handle.wait_leading(20.0)

        async def jobs() -> list[Any]:
            async with AsyncClient(settings=settings) as client:
                handles = await client.submit_many(DEMO_JOBS * 4)
                return await asyncio.gather(*(h.result(timeout=60) for h in handles))

        assert all(r is not None for r in run(jobs()))
        target = handle.status()["controller"]["target"]
        assert sum(target.values()) <= 3
        shown = CliRunner().invoke(
            app,
            ["status", "--redis-url", handle.redis_url, "--namespace", handle.namespace, "--json",
             "--window", "0"],
        )  # fmt: skip
        assert "learned" in json.loads(shown.output)["policy"]

    def test_load_shift_moves_workers_and_pays_the_model_load(
        self, services: list[Any], settings: Settings, run: Any
    ) -> None:
        """Load on embeddings then on generator: the controller moves workers to the generator,
        the history records it and the pool view reports the generator's model-load time."""
        config = _ray_config(settings, budget=2, policy="proportional", max_moves_per_tick=2)
        handle = _start(services, config)

        async def phase(job: JobRequest, n: int) -> list[Any]:
            async with AsyncClient(settings=settings) as client:
                handles = await client.submit_many([job] * n)
                # One at a time: each waiter holds a connection while it blocks.
                return [await h.result(timeout=40) for h in handles]

        assert len(run(phase(JobRequest("embed", {"text": "load"}), 200))) == 200
        assert len(run(phase(JobRequest("generate", {"prompt": "x", "max_tokens": 40}), 40))) == 40

        async def history() -> list[dict[str, Any]]:
            async with AsyncClient(settings=settings) as client:
                raw = await client.store.redis.lrange(client.store.keys.allocation_history, 0, -1)
                return [json.loads(e) for e in raw]

        changes = run(history())
        gen_workers = [c["workers"]["generator"] for c in changes]
        emb_workers = [c["workers"]["embeddings"] for c in changes]
        assert max(emb_workers) >= 1
        first_emb = emb_workers.index(max(emb_workers))
        assert max(gen_workers[first_emb:]) >= 1, changes
        deadline = time.monotonic() + 10
        view = handle.pool_view()
        while (view is None or not view["queues"].get("generator")) and time.monotonic() < deadline:
            time.sleep(0.2)
            view = handle.pool_view()
        assert view is not None
        assert view["queues"]["generator"]["model_load_s"] > 0.0

    def test_killed_controller_fails_over_and_no_job_is_lost(
        self, services: list[Any], settings: Settings, run: Any
    ) -> None:
        """Kill the leading control plane (router and controller) mid-load: the standby's roles
        lead, its workers take the jobs the dead workers held (after their leases lapse), and
        every job finishes exactly once."""
        import ray

        config = _ray_config(settings, budget=2, policy="proportional")
        leader = _start(services, config)
        standby = _start(services, config)
        assert not standby.leading()["controller"]

        async def scenario() -> tuple[list[Any], int]:
            async with AsyncClient(settings=settings) as client:
                jobs = [
                    JobRequest("generate", {"prompt": f"p{i}", "max_tokens": 20}) for i in range(24)
                ]
                handles = await client.submit_many(jobs)
                # Let the leader's workers start on them, then kill its controller (and so its pool).
                while (await client.stats(["generator"])).queues.get("generator") is None or (
                    (await client.stats(["generator"])).queues["generator"].in_flight == 0
                ):
                    await asyncio.sleep(0.05)
                ray.kill(leader.actor, no_restart=True)
                results = await asyncio.gather(*(h.result(timeout=60) for h in handles))
                stats = await client.stats(["generator"])
                return results, stats.queues["generator"].completed_total

        results, completed = run(scenario())
        assert len(results) == 24
        assert all(isinstance(r, str) for r in results)
        assert completed == 24
        assert standby.leading() == {"router": True, "controller": True}


@pytest.mark.slow
class TestServeTwice:
    def test_a_second_service_of_a_namespace_says_it_stands_by(
        self, services: list[Any], settings: Settings
    ) -> None:
        """A second service on the same Redis and namespace knows, at start, whom it stands by
        for (from the first one's health records), and says so."""
        from scheduler.commands.serve import _mode_lines

        config = _ray_config(settings, budget=1, policy="proportional")
        first = _start(services, config)
        assert first.wait_leading(20.0)
        assert first.standby_of == ()
        second = _start(services, config)
        assert set(second.standby_of) == {f"{first.name}/router", f"{first.name}/controller"}
        line, metrics = _mode_lines(second)
        assert line.startswith(f"standing by for {first.name}/")
        assert metrics.startswith(f"metrics: {second.metrics_url}/metrics; dashboard: ")
        assert not any(second.leading().values())


class TestServeMessages:
    def test_an_embedded_redis_says_it_is_a_deployment_of_its_own(self) -> None:
        """serve without a Redis URL says its clients need the URL, and that it is not a
        standby of anything."""
        from scheduler.commands.serve import _mode_lines
        from scheduler.config import ServiceConfig
        from scheduler.embedded_redis import EmbeddedRedis
        from scheduler.service.runner import ServiceHandle

        config = ServiceConfig.load(DEMO_CONFIG)
        embedded = EmbeddedRedis()  # never started: only its presence matters here
        try:
            handle = ServiceHandle(config, "redis://127.0.0.1:6390/0", None, "x", embedded)
            [line] = _mode_lines(handle)
        finally:
            embedded.stop()
        assert "BILEVEL_REDIS_URL=redis://127.0.0.1:6390/0 BILEVEL_NAMESPACE=demo" in line
        assert "a deployment of its own" in line
        assert "--redis-url" in line

    def test_an_unreachable_redis_is_said_once_and_its_return_too(self) -> None:
        """When every role fails on Redis, serve says so once (naming the server), and says when
        it is back."""
        import io

        from rich.console import Console

        from scheduler.commands.serve import _warn_if_redis_gone
        from scheduler.service.runner import ServiceHandle

        out = io.StringIO()
        console = Console(file=out, width=300)
        handle = ServiceHandle(None, "redis://:pw@10.0.0.7:6390/0", None, "x")  # type: ignore[arg-type]
        failing = {
            "router": {"state": "failing", "health": {"last_error": "ConnectionError: Error 111"}},
            "controller": {"state": "failing", "health": {}},
        }
        since = _warn_if_redis_gone(console, handle, failing, None)  # type: ignore[arg-type]
        assert since is not None
        assert _warn_if_redis_gone(console, handle, failing, since) == since  # type: ignore[arg-type]
        healthy = {"router": {"state": "leading"}, "controller": {"state": "leading"}}
        assert _warn_if_redis_gone(console, handle, healthy, since) is None  # type: ignore[arg-type]
        text = out.getvalue()
        assert text.count("unreachable") == 1
        assert "10.0.0.7:6390" in text
        assert "pw" not in text
        assert "ConnectionError: Error 111" in text
        assert "reachable again" in text
