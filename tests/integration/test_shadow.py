"""Shadow mode on a real Redis: the shadow decides beside the acting policy every tick, both are
logged and published, the estimate replays the window, and promotion (by `bilevel promote`, or
automatic when configured) switches the acting policy at the next tick."""

from __future__ import annotations

import json
from typing import Any

import pytest
import structlog
from structlog.testing import CapturingLogger
from typer.testing import CliRunner

from scheduler.cli import app
from scheduler.config import ConfigError
from scheduler.service.controller_loop import ControllerLoop, TickReport
from scheduler.service.policies import configured_shadow, load_policies
from scheduler.service.views import PublishedState
from scheduler.settings import Settings
from scheduler.store import Store
from tests.conftest import ManualClock, Runner
from tests.integration.helpers import new_job, submit_to_queue
from tests.integration.service_helpers import PoolDouble, service_config


def _loop(
    store: Store, settings: Settings, clock: ManualClock, **allocation: Any
) -> tuple[ControllerLoop, CapturingLogger]:
    """Static acts, proportional shadows it, over the demo's three queues."""
    config = service_config(
        settings,
        allocation={
            "budget": 3,
            "tick_s": 1.0,
            "policy": "static",
            "shadow": "proportional",
            **allocation,
        },
    )
    captured = CapturingLogger()
    loop = ControllerLoop(
        store,
        config,
        PoolDouble(service_time_s=0.5, model_load_s=1.0),
        clock=clock,
        logger=structlog.wrap_logger(captured, processors=[]),
    )
    return loop, captured


async def _ticks(loop: ControllerLoop, store: Store, clock: ManualClock, n: int) -> list[Any]:
    """`n` ticks a second apart, four embedding jobs arriving before each."""
    reports = []
    for _ in range(n):
        await submit_to_queue(store, "embeddings", *[new_job("embed") for _ in range(4)])
        clock.advance(1.0)
        reports.append(await loop.tick())
    return reports


def _published(run: Runner, store: Store) -> PublishedState:
    raw = run(store.redis.get(store.keys.allocation))
    assert raw is not None
    return PublishedState.from_json(str(raw))


def _cli(settings: Settings, *args: str) -> Any:
    url = settings.url()
    assert url is not None
    target = ["--redis-url", url, "--namespace", settings.namespace]
    return CliRunner().invoke(app, [*args, *target])


class TestBothDecisions:
    def test_every_tick_records_the_acting_and_the_shadow_decision(
        self, store: Store, settings: Settings, clock: ManualClock, run: Runner
    ) -> None:
        """Each tick's report, log event and published state carry both targets; only the
        acting one reaches the pool."""
        loop, captured = _loop(store, settings, clock)
        reports: list[TickReport] = run(_ticks(loop, store, clock, 4))
        for report in reports:
            assert report.policy == "static"
            assert report.shadow is not None
            assert report.shadow.policy == "proportional"
            assert report.shadow.target is not None
            assert sum(report.shadow.target.values()) <= 3
        # Proportional follows the embedding load; static does not.
        last = reports[-1]
        assert last.shadow is not None
        assert last.shadow.target is not None
        assert last.shadow.target["embeddings"] > last.target["embeddings"]
        assert loop.pool.applied[-1] == last.target  # type: ignore[attr-defined]
        events = [c.kwargs for c in captured.calls if c.kwargs.get("event") == "allocation_tick"]
        assert len(events) == 4
        for event, report in zip(events, reports, strict=True):
            assert event["policy"] == "static"
            assert event["shadow_policy"] == "proportional"
            assert report.shadow is not None
            assert report.shadow.target is not None
            assert event["shadow"] == " ".join(f"{q}={n}" for q, n in report.shadow.target.items())
            assert event["shadow_agrees"] == (report.shadow.target == report.target)
        published = _published(run, store)
        assert published.policy == "static"
        assert published.shadow is not None
        assert published.shadow.policy == "proportional"
        assert published.shadow.workers == last.shadow.target
        assert published.shadow.acting_role == "configured"
        assert published.shadow.auto_promote is None

    def test_the_estimate_replays_the_window_and_status_shows_it(
        self, store: Store, settings: Settings, clock: ManualClock, run: Runner
    ) -> None:
        """After enough ticks the estimate is published (proportional faster than static on a
        load static ignores) and `bilevel status` prints and returns it."""
        loop, captured = _loop(store, settings, clock)
        assert loop.shadow is not None
        reports = run(_ticks(loop, store, clock, loop.shadow.every_ticks))
        estimates = [r.estimate for r in reports if r.estimate is not None]
        assert len(estimates) == 1
        estimate = estimates[0]
        assert estimate.jobs >= 4 * (loop.shadow.every_ticks - 1)
        assert estimate.shadow_mean_jct_s < estimate.acting_mean_jct_s
        logged = [c.kwargs for c in captured.calls if c.kwargs.get("event") == "shadow_estimate"]
        assert logged
        assert logged[0]["gain"] == round(estimate.gain, 4)
        published = _published(run, store)
        assert published.shadow is not None
        assert published.shadow.estimate is not None
        assert published.shadow.estimate["jobs"] == estimate.jobs
        assert published.shadow.estimate["difference_s"] < 0

        shown = _cli(settings, "status", "--json", "--window", "0")
        assert shown.exit_code == 0, shown.output
        out = json.loads(shown.output)
        assert out["policy"] == "static"
        assert out["shadow"]["policy"] == "proportional"
        assert out["shadow"]["estimate"]["jobs"] == estimate.jobs
        text = _cli(settings, "status", "--window", "0")
        assert text.exit_code == 0, text.output
        assert "shadow proportional (acting static) would allocate: embeddings=" in text.output
        assert "faster) over the last" in text.output
        assert "promotion: manual: `bilevel promote`" in text.output


class TestPromotion:
    def test_promote_switches_the_acting_policy_at_the_next_tick_and_back(
        self, store: Store, settings: Settings, clock: ManualClock, run: Runner
    ) -> None:
        """`bilevel promote` makes the shadow act from the next tick on, the former acting
        policy shadows it, and a second promote switches back."""
        loop, captured = _loop(store, settings, clock)
        run(_ticks(loop, store, clock, 2))
        promoted = _cli(settings, "promote")
        assert promoted.exit_code == 0, promoted.output
        assert "promoted proportional to acting (static becomes the shadow)" in promoted.output
        assert "config file is unchanged" in promoted.output
        [after] = run(_ticks(loop, store, clock, 1))
        assert after.policy == "proportional"
        assert after.shadow is not None
        assert after.shadow.policy == "static"
        assert loop.pool.applied[-1] == after.target  # type: ignore[attr-defined]
        published = _published(run, store)
        assert (published.policy, published.shadow and published.shadow.acting_role) == (
            "proportional",
            "shadow",
        )
        events = [
            c.kwargs
            for c in captured.calls
            if c.kwargs.get("event") == "allocation_policy_promoted"
        ]
        assert events == [
            {
                "event": "allocation_policy_promoted",
                "acting": "proportional",
                "shadow": "static",
                "previously_acting": "static",
                "role": "shadow",
                "by": "manual",
            }
        ]
        back = _cli(settings, "promote", "--json")
        assert back.exit_code == 0, back.output
        assert json.loads(back.output)["acting"] == "static"
        [again] = run(_ticks(loop, store, clock, 1))
        assert again.policy == "static"

    def test_a_restarted_controller_keeps_the_promotion(
        self, store: Store, settings: Settings, clock: ManualClock, run: Runner
    ) -> None:
        """The acting role lives in Redis: a new controller acts with the promoted policy."""
        loop, _ = _loop(store, settings, clock)
        run(_ticks(loop, store, clock, 1))
        assert _cli(settings, "promote").exit_code == 0
        fresh, _ = _loop(store, settings, clock)
        [report] = run(_ticks(fresh, store, clock, 1))
        assert report.policy == "proportional"

    def test_promote_without_a_shadow_or_a_controller_says_why(
        self, store: Store, settings: Settings, clock: ManualClock, run: Runner
    ) -> None:
        """No published state, or one without a shadow: exit 1 and one line naming the cause."""
        nothing = _cli(settings, "promote")
        assert nothing.exit_code == 1
        assert "no controller has published its state" in nothing.output
        plain = ControllerLoop(store, service_config(settings), PoolDouble(), clock=clock)
        run(plain.tick())
        none = _cli(settings, "promote")
        assert none.exit_code == 1
        assert "runs no shadow policy; set allocation.shadow" in none.output

    def test_automatic_promotion_only_when_configured_and_earned(
        self, store: Store, settings: Settings, clock: ManualClock, run: Runner
    ) -> None:
        """With shadow_promote, estimates that keep showing the gain for after_s promote the
        shadow (written to Redis, applied at the next tick); without it nothing is promoted."""
        loop, _captured = _loop(
            store, settings, clock, shadow_promote={"after_s": 4.0, "min_gain": 0.01}
        )
        assert loop.shadow is not None
        loop.shadow.every_ticks = 3
        reports = run(_ticks(loop, store, clock, 16))
        estimates = [r for r in reports if r.estimate is not None]
        assert len(estimates) >= 3
        policies = [r.policy for r in reports]
        assert policies[0] == "static"
        assert policies[-1] == "proportional"
        switch = policies.index("proportional")
        assert all(p == "static" for p in policies[:switch])
        assert all(p == "proportional" for p in policies[switch:])
        record = json.loads(str(run(store.redis.get(store.keys.acting_policy))))
        assert (record["role"], record["by"]) == ("shadow", "auto")

        manual_only, _ = _loop(store, settings, clock)
        assert manual_only.shadow is not None
        manual_only.shadow.every_ticks = 3
        run(store.redis.delete(store.keys.acting_policy))
        reports = run(_ticks(manual_only, store, clock, 16))
        assert {r.policy for r in reports} == {"static"}
        assert run(store.redis.get(store.keys.acting_policy)) is None


class TestShadowConfig:
    def test_a_bad_shadow_fails_the_start_naming_its_field(self, settings: Settings) -> None:
        """An unknown shadow, or parameters it does not take, are refused before anything runs."""
        unknown = service_config(
            settings, allocation={"budget": 3, "policy": "static", "shadow": "nope"}
        )
        with pytest.raises(ConfigError, match=r"allocation\.shadow: no checkpoint at nope"):
            load_policies(unknown)
        bad = service_config(
            settings,
            allocation={"budget": 3, "shadow": "switch_aware", "shadow_params": {"horizon": 1}},
        )
        with pytest.raises(ConfigError, match=r"allocation\.shadow_params: bad parameters"):
            load_policies(bad)

    def test_the_learned_shadow_is_the_shipped_checkpoint(self, settings: Settings) -> None:
        """allocation.shadow: learned loads the shipped checkpoint as the shadow allocator."""
        config = service_config(
            settings, allocation={"budget": 3, "policy": "proportional", "shadow": "learned"}
        )
        shadow = configured_shadow(config, load_policies(config))
        assert shadow is not None
        assert shadow.name == "learned"


# -- on Ray ----------------------------------------------------------------------------------------


@pytest.fixture
def services(ray_local: None) -> Any:
    """Service handles a test starts; all stopped at the end, whatever happened."""
    started: list[Any] = []
    yield started
    for handle in started:
        handle.stop(timeout_s=20.0)


def _wait_published(
    settings: Settings, run: Runner, until: Any, timeout_s: float = 60.0
) -> PublishedState:
    """The published state once `until(state)` holds (polled every 0.2 s, bounded)."""
    import time

    from scheduler.client import AsyncClient

    async def read() -> PublishedState | None:
        async with AsyncClient(settings=settings) as client:
            raw = await client.store.redis.get(client.store.keys.allocation)
            return None if raw is None else PublishedState.from_json(str(raw))

    deadline = time.monotonic() + timeout_s
    state = None
    while time.monotonic() < deadline:
        state = run(read())
        if state is not None and until(state):
            return state
        time.sleep(0.2)
    raise AssertionError(f"published state never got there: {state}")


@pytest.mark.slow
class TestShadowOnRay:
    def test_a_live_service_runs_a_shadow_estimates_it_and_promotes_it(
        self, services: list[Any], settings: Settings, run: Runner
    ) -> None:
        """The service on a local Ray with the learned allocator in shadow: both decisions are
        published every tick, the estimate appears, `bilevel status` shows them, and `bilevel
        promote` makes the learned allocator act while jobs keep completing."""
        from scheduler.client import Client, JobRequest
        from scheduler.config import ServiceConfig
        from scheduler.service.runner import start_service
        from tests.integration.service_helpers import DEMO_QUEUES

        config = ServiceConfig.from_mapping(
            {
                "store": {**settings.model_dump(), "redis_url": settings.url(), "lease_s": 2.0},
                "handlers": ["workers.demo_models"],
                "queues": [{**q, "min_workers": 1} for q in DEMO_QUEUES],
                "allocation": {
                    "budget": 4,
                    "tick_s": 0.3,
                    "policy": "proportional",
                    "shadow": "learned",
                },
            }
        )
        handle = start_service(config, leader_ttl_s=1.0, wait_s=30.0)
        services.append(handle)
        assert handle.wait_leading(20.0)
        jobs = [JobRequest("embed", {"text": f"doc {i}"}) for i in range(60)]
        jobs += [JobRequest("classify", {"text": "a cat?"})] * 20
        with Client(settings=settings) as client:
            assert len(client.gather(client.submit_many(jobs), timeout=60)) == 80
            # Ticks keep going while this load is served; each published state has both.
            handles = client.submit_many(jobs)
            first = _wait_published(settings, run, lambda s: s.shadow is not None)
            assert first.policy == "proportional"
            assert first.shadow is not None
            assert first.shadow.policy == "learned"
            assert set(first.shadow.workers) == {q["name"] for q in DEMO_QUEUES}
            later = _wait_published(settings, run, lambda s: s.t_s > first.t_s)
            assert later.shadow is not None
            assert set(later.shadow.workers) == {q["name"] for q in DEMO_QUEUES}
            estimated = _wait_published(
                settings, run, lambda s: s.shadow is not None and s.shadow.estimate is not None
            )
            assert estimated.shadow is not None
            assert estimated.shadow.estimate is not None
            assert estimated.shadow.estimate["jobs"] > 0
            assert estimated.shadow.estimate["wall_ms"] > 0
            assert len(client.gather(handles, timeout=60)) == 80

            target = ["--redis-url", handle.redis_url, "--namespace", handle.namespace]
            shown = CliRunner().invoke(app, ["status", *target, "--json", "--window", "0"])
            assert shown.exit_code == 0, shown.output
            out = json.loads(shown.output)
            assert out["policy"] == "proportional"
            assert out["shadow"]["policy"] == "learned"
            text = CliRunner().invoke(app, ["status", *target, "--window", "0"])
            assert "shadow learned (acting proportional) would allocate:" in text.output
            assert "estimate: mean JCT" in text.output

            promoted = CliRunner().invoke(app, ["promote", *target])
            assert promoted.exit_code == 0, promoted.output
            after = _wait_published(settings, run, lambda s: s.policy == "learned")
            assert after.shadow is not None
            assert after.shadow.policy == "proportional"
            assert after.shadow.acting_role == "shadow"
            assert len(client.gather(client.submit_many(jobs), timeout=60)) == 80
        assert handle.status()["controller"]["leading"]
