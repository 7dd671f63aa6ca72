"""Operability on a real Redis: the finish path's histograms, SLO outcomes, tenant usage and
counters; the controller's kept decisions and `status --decisions`; /metrics and /api/state
against the store, also scraped while a live service on Ray runs a load."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from typer.testing import CliRunner

from policies.views import Allocation, ClusterView
from scheduler.cli import app
from scheduler.config import ConfigError, MetricsConfig
from scheduler.connection import client_from_url
from scheduler.keys import DECISIONS_LEN, TIMING_BUCKETS_MS
from scheduler.models import ErrorInfo
from scheduler.service.controller_loop import ControllerLoop
from scheduler.service.decisions import read_decisions
from scheduler.service.observe import ObserveServer
from scheduler.settings import Settings
from scheduler.store import Store
from scheduler.timings import bucket_of, read_timings, record_model_load, write_slos
from tests.conftest import ManualClock, Runner
from tests.integration.helpers import new_job, submit_to_queue
from tests.integration.observe_helpers import (
    Load,
    api_state,
    scrape,
    store_totals,
)
from tests.integration.service_helpers import Broken, Greedy, PoolDouble, service_config


class TestFinishPathCounts:
    """complete.lua counts what each succeeded job took, in the queue's timing hash."""

    def test_completion_time_wait_slo_and_tenant_are_counted_exactly(
        self, store: Store, clock: ManualClock, run: Runner
    ) -> None:
        """Submitted at t, leased 0.5 s later, completed 1.5 s after submit: each of three jobs
        lands in the 2.5 s completion bucket and the 0.5 s wait bucket; the one whose own 1 s
        deadline passed misses, the two judged by the queue's 2 s SLO meet it; the tenant's
        usage counts its job and its 1 s on the lease."""

        async def scenario() -> Any:
            await write_slos(store.redis, store.keys, {"q": 2.0})
            await submit_to_queue(
                store, "q", new_job(), new_job(deadline_s=1.0), new_job(tenant="acme")
            )
            clock.advance(0.5)
            leases = await store.lease("q", 10)
            clock.advance(1.0)
            await store.complete([(lease.job_id, lease.token, None) for lease in leases])
            timings = (await read_timings(store.redis, store.keys, ["q"]))["q"]
            tenants = await store.redis.hgetall(store.keys.tenant_usage)
            return timings, tenants

        t, tenants = run(scenario())
        jct_bucket, wait_bucket = bucket_of(1500), bucket_of(500)
        assert TIMING_BUCKETS_MS[jct_bucket - 1] == 2500
        assert TIMING_BUCKETS_MS[wait_bucket - 1] == 500
        assert t.jct.counts[jct_bucket - 1] == 3
        assert t.jct.count == 3
        assert t.jct.sum_s == pytest.approx(4.5)
        assert t.wait.counts[wait_bucket - 1] == 3
        assert t.wait.sum_s == pytest.approx(1.5)
        assert (t.slo_judged, t.slo_met, t.slo_s) == (3, 2, 2.0)
        assert t.slo_attainment == pytest.approx(2 / 3)
        assert tenants == {"c:acme": "1", "s:acme": "1000"}

    def test_a_queue_without_slo_judges_only_jobs_with_deadlines(
        self, store: Store, clock: ManualClock, run: Runner
    ) -> None:
        """No SLO for the queue: a job without a deadline is counted but not judged."""

        async def scenario() -> Any:
            await write_slos(store.redis, store.keys, {"q": None})
            await submit_to_queue(store, "q", new_job(), new_job(deadline_s=5.0))
            leases = await store.lease("q", 10)
            clock.advance(0.01)
            await store.complete([(lease.job_id, lease.token, None) for lease in leases])
            return (await read_timings(store.redis, store.keys, ["q"]))["q"]

        t = run(scenario())
        assert t.jct.count == 2
        assert (t.slo_judged, t.slo_met, t.slo_s) == (1, 1, None)

    def test_tenants_with_quotes_and_tags_like_keys_are_told_apart(
        self, store: Store, run: Runner
    ) -> None:
        """A tenant holding quotes or a backslash, and a tag that spells a tenant key, count
        under the right tenant."""

        async def scenario() -> Any:
            await submit_to_queue(
                store,
                "q",
                new_job(tenant='a"b\\c'),
                new_job(tenant="plain", tags=['"n":"fake']),
                new_job(tags=['"n":"fake']),
            )
            leases = await store.lease("q", 10)
            await store.complete([(lease.job_id, lease.token, None) for lease in leases])
            return await store.redis.hgetall(store.keys.tenant_usage)

        usage = run(scenario())
        assert {k: v for k, v in usage.items() if k.startswith("c:")} == {
            'c:a"b\\c': "1",
            "c:plain": "1",
        }

    def test_a_record_without_its_submit_time_completes_uncounted(
        self, store: Store, run: Runner
    ) -> None:
        """created_ms is read only for the counting: a record that lost it still succeeds."""

        async def scenario() -> Any:
            (job_id,) = await submit_to_queue(store, "q", new_job())
            (lease,) = await store.lease("q", 1)
            await store.redis.hdel(store.keys.job(job_id), "created_ms")
            codes = await store.complete([(lease.job_id, lease.token, None)])
            return codes, (await read_timings(store.redis, store.keys, ["q"]))["q"]

        codes, t = run(scenario())
        assert [int(c) for c in codes] == [0]
        assert t.jct.count == 0

    def test_a_second_completion_counts_nothing(self, store: Store, run: Runner) -> None:
        """A refused (repeated) completion adds no observation."""

        async def scenario() -> Any:
            await submit_to_queue(store, "q", new_job())
            (lease,) = await store.lease("q", 1)
            await store.complete([(lease.job_id, lease.token, None)])
            await store.complete([(lease.job_id, lease.token, None)])
            return (await read_timings(store.redis, store.keys, ["q"]))["q"]

        assert run(scenario()).jct.count == 1

    def test_retries_dead_letters_and_model_loads_are_counted(
        self, store: Store, run: Runner
    ) -> None:
        """A retried attempt counts in 'retried', a job out of retries in 'dead'; a model load of
        1.2 s lands in the 2.5 s load bucket."""
        error = ErrorInfo(type="ValueError", message="bad input")

        async def scenario() -> Any:
            await submit_to_queue(store, "q", new_job(max_retries=1))
            (lease,) = await store.lease("q", 1)
            await store.fail(lease.job_id, lease.token, error, backoff_s=0.0)
            await store.promote_due()
            (lease,) = await store.lease("q", 1)
            await store.fail(lease.job_id, lease.token, error, backoff_s=0.0)
            await record_model_load(store.redis, store.keys, "q", 1.2)
            counts = await store.redis.hgetall(store.keys.counts("q"))
            return counts, (await read_timings(store.redis, store.keys, ["q"]))["q"]

        counts, t = run(scenario())
        assert counts["retried"] == "1"
        assert counts["dead"] == "1"
        assert counts["failed"] == "2"
        assert t.model_load.counts[bucket_of(1200) - 1] == 1
        assert t.model_load.sum_s == pytest.approx(1.2)

    def test_a_timing_key_of_the_wrong_type_is_moved_aside_and_completion_goes_on(
        self, store: Store, run: Runner
    ) -> None:
        """Garbage where a timing hash belongs never stops a completion: the key is set aside and
        counting starts afresh."""

        async def scenario() -> Any:
            await store.redis.set(store.keys.timing("q"), "garbage")
            await submit_to_queue(store, "q", new_job())
            (lease,) = await store.lease("q", 1)
            codes = await store.complete([(lease.job_id, lease.token, None)])
            return codes, (await read_timings(store.redis, store.keys, ["q"]))["q"]

        codes, t = run(scenario())
        assert [int(c) for c in codes] == [0]
        assert t.jct.count == 1


class TestDecisions:
    """The controller keeps the decisions that changed something or that a guardrail shaped."""

    def test_a_bound_and_the_move_cap_are_named_with_what_they_changed(
        self, store: Store, settings: Settings, clock: ManualClock, run: Runner
    ) -> None:
        """A greedy policy asks for all 3 workers for embeddings; its max of 2 and the cap of one
        move per tick are named, with the counts they changed, and the inputs the policy saw."""
        queues = [
            {"name": "embeddings", "job_types": ["embed"], "max_workers": 2},
            {"name": "classifier", "job_types": ["classify"]},
        ]
        config = service_config(
            settings,
            queues=queues,
            allocation={"budget": 3, "policy": "proportional", "max_moves_per_tick": 1},
        )
        loop = ControllerLoop(
            store, config, PoolDouble(), allocator=Greedy("embeddings"), clock=clock
        )

        async def scenario() -> Any:
            await submit_to_queue(store, "embeddings", *[new_job("embed") for _ in range(4)])
            await loop.tick()
            clock.advance(1.0)
            await loop.tick()
            clock.advance(1.0)
            await loop.tick()  # at the bound: held there, nothing changes
            return await read_decisions(store.redis, store.keys), await store.redis.hgetall(
                store.keys.decision_totals
            )

        kept, totals = run(scenario())
        newest, middle, first = kept
        assert [i.guardrail for i in first.interventions] == ["bounds", "move_cap"]
        assert first.interventions[0].changes == {"embeddings": (3, 2)}
        assert first.interventions[1].changes == {"embeddings": (2, 1)}
        assert first.moves() == "embeddings 0->1"
        assert "bounds: embeddings 3->2" in first.reasons()
        seen = {q.queue: q for q in first.queues}
        assert seen["embeddings"].depth == 4
        assert (seen["embeddings"].proposed, seen["embeddings"].target) == (3, 1)
        assert middle.moves() == "embeddings 1->2"
        assert not newest.changed
        assert [i.guardrail for i in newest.interventions] == ["bounds"]
        assert totals == {
            "ticks": "3",
            "changes": "2",
            "guardrail:bounds": "3",
            "guardrail:move_cap": "1",
        }

    def test_a_fallback_is_kept_with_its_reason_and_status_shows_it(
        self, store: Store, settings: Settings, clock: ManualClock, run: Runner
    ) -> None:
        """A policy that raises: the decision names the fallback and why; `status --decisions`
        prints it, and its JSON carries the records."""
        config = service_config(settings, allocation={"budget": 3, "policy": "proportional"})
        loop = ControllerLoop(store, config, PoolDouble(), allocator=Broken(), clock=clock)
        run(submit_to_queue(store, "embeddings", new_job("embed")))
        run(loop.tick())
        (decision,) = run(read_decisions(store.redis, store.keys))
        assert decision.fallback == "broken: raised RuntimeError: checkpoint has the wrong shape"
        args = ["status", "--redis-url", settings.url() or "", "--namespace", settings.namespace]
        text = CliRunner().invoke(
            app, [*args, "--window", "0", "--decisions", "5"], env={"COLUMNS": "200"}
        )
        assert text.exit_code == 0, text.output
        assert "level-2 decisions" in text.output
        assert "fallback: broken: raised RuntimeError" in text.output
        shown = CliRunner().invoke(app, [*args, "--window", "0", "--decisions", "5", "--json"])
        out = json.loads(shown.output)
        assert out["decisions"][0]["fallback"] == decision.fallback
        assert out["decisions"][0]["reasons"][0].startswith("fallback: broken")

    def test_the_list_keeps_the_newest_fifty(
        self, store: Store, settings: Settings, clock: ManualClock, run: Runner
    ) -> None:
        """Sixty decisions that each change the allocation: the newest fifty are kept."""
        config = service_config(settings, allocation={"budget": 3, "policy": "proportional"})

        class Flip:
            name = "flip"
            n = 0

            def allocate(self, view: ClusterView) -> Allocation:
                self.n += 1
                first = self.n % 2
                return {q.name: (first if i == 0 else 1 - first) for i, q in enumerate(view.queues)}

        loop = ControllerLoop(store, config, PoolDouble(), allocator=Flip(), clock=clock)

        async def scenario() -> Any:
            for _ in range(60):
                clock.advance(1.0)
                await loop.tick()
            return await read_decisions(store.redis, store.keys, 100)

        kept = run(scenario())
        assert len(kept) == DECISIONS_LEN
        assert kept[0].t_s == clock.now_s
        assert kept[-1].t_s == clock.now_s - DECISIONS_LEN + 1

    def test_status_refuses_more_decisions_than_are_kept(self, settings: Settings) -> None:
        """--decisions above the list's length is an error naming the option."""
        args = ["status", "--redis-url", settings.url() or "", "--namespace", settings.namespace]
        out = CliRunner().invoke(app, [*args, "--decisions", "51"])
        assert out.exit_code == 2
        assert "--decisions" in out.output


@pytest.fixture
def observer(settings: Settings) -> Iterator[ObserveServer]:
    config = service_config(settings, metrics={"port": 0})
    url = settings.url()
    assert url is not None
    server = ObserveServer(config, url).start()
    yield server
    server.stop()


class TestMetricsAgainstTheStore:
    """/metrics and /api/state say what the store says."""

    def test_counters_gauges_and_histograms_match_the_store(
        self, observer: ObserveServer, store: Store, clock: ManualClock, run: Runner
    ) -> None:
        """Depth, arrivals, completions, the JCT histogram and tenant usage, read back."""

        async def scenario() -> None:
            await write_slos(store.redis, store.keys, {"embeddings": 0.5})
            await submit_to_queue(store, "embeddings", *[new_job("embed") for _ in range(5)])
            await submit_to_queue(store, "embeddings", new_job("embed", tenant="acme"))
            leases = await store.lease("embeddings", 4)
            clock.advance(0.2)
            await store.complete([(lease.job_id, lease.token, None) for lease in leases])

        run(scenario())
        m = scrape(observer.url)
        q = (("queue", "embeddings"),)
        assert m[("bilevel_up", ())] == 1.0
        assert m[("bilevel_queue_depth", q)] == 2
        assert m[("bilevel_jobs_arrived_total", q)] == 6
        assert m[("bilevel_jobs_completed_total", q)] == 4
        assert m[("bilevel_jct_seconds_count", q)] == 4
        assert m[("bilevel_jct_seconds_sum", q)] == pytest.approx(0.8)
        assert m[("bilevel_jct_seconds_bucket", (("le", "0.25"), *q))] == 4
        assert m[("bilevel_jct_seconds_bucket", (("le", "0.1"), *q))] == 0
        assert m[("bilevel_slo_met_total", q)] == 4
        assert m[("bilevel_slo_attainment_ratio", q)] == 1.0
        assert m[("bilevel_jobs_rejected_total", q)] == 0
        assert m[("bilevel_leader", (("role", "controller"),))] == 0
        state = api_state(observer.url)
        (emb,) = [x for x in state["queues"] if x["name"] == "embeddings"]
        assert (emb["depth"], emb["completed_total"], emb["jct"]["count"]) == (2, 4, 4)

    def test_a_rejected_count_in_the_counts_hash_is_exported(
        self, observer: ObserveServer, store: Store, run: Runner
    ) -> None:
        """Admission's per-queue 'rejected' field is what bilevel_jobs_rejected_total reads."""
        run(store.redis.hset(store.keys.counts("classifier"), "rejected", "7"))
        m = scrape(observer.url)
        assert m[("bilevel_jobs_rejected_total", (("queue", "classifier"),))] == 7

    def test_names_cannot_break_out_of_the_pages_script(
        self, observer: ObserveServer, store: Store, run: Runner
    ) -> None:
        """A tenant named like markup is inlined escaped; the page still carries its usage."""
        evil = "</script><script>alert(1)</script><!--"
        run(store.redis.hset(store.keys.tenant_usage, f"c:{evil}", "1"))
        page = urllib.request.urlopen(f"{observer.url}/", timeout=30).read().decode()
        assert evil not in page
        assert page.count("</script>") == 1
        assert "\\u003c/script>\\u003cscript>alert(1)" in page

    def test_redis_away_is_up_zero_not_an_error(self, settings: Settings) -> None:
        """A scrape that cannot read Redis answers bilevel_up 0; /api/state answers 503."""
        config = service_config(settings, metrics={"port": 0})
        server = ObserveServer(config, "redis://127.0.0.1:1/0").start()
        try:
            m = scrape(server.url)
            assert m == {("bilevel_up", ()): 0.0}
            with pytest.raises(urllib.error.HTTPError) as caught:
                urllib.request.urlopen(f"{server.url}/api/state", timeout=30)
            assert caught.value.code == 503
            assert "cannot read Redis" in json.loads(caught.value.read())["error"]
        finally:
            server.stop()

    def test_bad_requests_are_named(self, observer: ObserveServer) -> None:
        """An unknown path is a 404 listing the real ones; a bad ?decisions= a 400 naming it."""
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(f"{observer.url}/nope", timeout=30)
        assert missing.value.code == 404
        assert "/metrics" in missing.value.read().decode()
        with pytest.raises(urllib.error.HTTPError) as bad:
            urllib.request.urlopen(f"{observer.url}/api/state?decisions=x", timeout=30)
        assert bad.value.code == 400
        assert "decisions must be" in json.loads(bad.value.read())["error"]

    def test_a_taken_port_is_served_elsewhere_until_it_is_free(
        self, observer: ObserveServer, settings: Settings
    ) -> None:
        """A second server whose port is taken (a standby in a rolling upgrade) serves on a free
        port, and takes its own once the first lets go of it."""
        port = int(observer.url.rsplit(":", 1)[1])
        # model_copy: the tests' BILEVEL_METRICS__PORT=0 would win over a port in the mapping.
        config = service_config(settings).model_copy(update={"metrics": MetricsConfig(port=port)})
        second = ObserveServer(config, settings.url() or "", claim_every_s=0.05).start()
        try:
            assert second.port_taken
            assert not second.url.endswith(f":{port}")
            assert scrape(second.url)[("bilevel_up", ())] == 1.0
            observer.stop()
            for _ in range(600):
                if not second.port_taken:
                    break
                time.sleep(0.05)
            assert second.url.endswith(f":{port}")
            assert scrape(second.url)[("bilevel_up", ())] == 1.0
        finally:
            second.stop()

    def test_a_host_it_cannot_listen_on_is_named(self, settings: Settings) -> None:
        """An address that is not this machine's fails the start naming metrics.host."""
        config = service_config(settings).model_copy(
            update={"metrics": MetricsConfig(host="192.0.2.1", port=0)}
        )
        with pytest.raises(ConfigError, match=r"metrics.host: cannot listen on 192.0.2.1:0"):
            ObserveServer(config, settings.url() or "").start()


# -- a live service on Ray -------------------------------------------------------------------------


@pytest.mark.slow
class TestScrapedDuringLoad:
    def test_scrapes_during_a_load_agree_with_the_store(
        self, live_service: Any, settings: Settings
    ) -> None:
        """While jobs flow, every scrape's completions lie between the store's totals read just
        before and just after it; once the load is done, every number equals the store's and the
        job records': completions, the JCT histogram of every job, SLO outcomes, tenant usage,
        workers and leaders."""
        url = live_service.metrics_url
        assert url is not None
        scrapes = 0
        with Load(settings, seconds=4.0) as load:
            while load.thread.is_alive() and scrapes < 30:
                before = store_totals(settings)
                m = scrape(url)
                after = store_totals(settings)
                for name in before:
                    seen = m[("bilevel_jobs_completed_total", (("queue", name),))]
                    assert before[name] <= seen <= after[name]
                    jcts = m[("bilevel_jct_seconds_count", (("queue", name),))]
                    assert before[name] <= jcts <= after[name]
                scrapes += 1
                time.sleep(0.2)
        assert load.error is None, load.error
        assert scrapes >= 3
        assert len(load.results) == load.submitted

        async def records() -> list[Any]:
            url_ = settings.url()
            assert url_ is not None
            store = Store(client_from_url(url_), settings)
            try:
                ids = await store.redis.lrange(store.keys.finished("echo"), 0, -1)
                ids += await store.redis.lrange(store.keys.finished("batch"), 0, -1)
                return [j for j in await store.get_many([str(i) for i in ids]) if j is not None]
            finally:
                await store.close()

        jobs = run_sync(records())
        m = scrape(url)
        for name in ("echo", "batch"):
            q = (("queue", name),)
            mine = [j for j in jobs if j.queue == name]
            assert m[("bilevel_jobs_completed_total", q)] == len(mine)
            assert m[("bilevel_jct_seconds_count", q)] == len(mine)
            jct_ms = [round((j.finished_s - j.created_s) * 1000) for j in mine if j.finished_s]
            for i, bound in enumerate(TIMING_BUCKETS_MS, start=1):
                expected = sum(1 for ms in jct_ms if bucket_of(ms) <= i)
                le = repr(bound / 1000)
                assert m[("bilevel_jct_seconds_bucket", (("le", le), *q))] == expected, bound
            assert m[("bilevel_jct_seconds_sum", q)] == pytest.approx(sum(jct_ms) / 1000)
            met = sum(1 for ms in jct_ms if ms <= (5000 if name == "echo" else 1))
            assert m[("bilevel_slo_judged_total", q)] == len(mine)
            assert m[("bilevel_slo_met_total", q)] == met
            # Each queue's minimum of one worker is the whole budget of two.
            assert m[("bilevel_workers_target", q)] == 1
            states = {k[1][1][1] for k in m if k[0] == "bilevel_workers" and k[1][0] == q[0]}
            assert states == {"ready", "busy", "loading", "draining"}
            assert m[("bilevel_model_load_seconds_count", q)] >= 1
        acme = sum(1 for j in jobs if j.spec.options.tenant == "acme")
        assert m[("bilevel_tenant_jobs_completed_total", (("tenant", "acme"),))] == acme
        assert m[("bilevel_leader", (("role", "router"),))] == 1
        assert m[("bilevel_leader", (("role", "controller"),))] == 1
        assert m[("bilevel_controller_ticks_total", ())] >= 1
        controllers = [k for k in m if k[0] == "bilevel_role_tick_seconds"]
        assert controllers


def run_sync(coro: Any) -> Any:
    return asyncio.run(coro)
