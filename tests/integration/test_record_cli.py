"""`bilevel record` against the real Redis: its trace loads with the generic trace loader and its
scenario with the scenario reader (and simulates), --config gives the layout, the window
options, and every bad input is one line on stderr with exit 2 (a bad option or output) or 1
(nothing recorded in the window), with nothing written."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner, Result

from policies.sim.scenario import parse_scenario, prepare
from policies.sim.traces import load_trace
from scheduler.cli import app
from scheduler.embedded_redis import EmbeddedRedis
from scheduler.models import ErrorInfo
from scheduler.settings import Settings
from scheduler.store import RunReport, Store
from tests.conftest import Runner, make_settings
from tests.integration.helpers import new_job, submit_to_queue

BOOM = ErrorInfo(type="RuntimeError", message="boom")


@pytest.fixture
def settings(redis_server: EmbeddedRedis, namespace: str) -> Settings:
    # The recording is off by default.
    return make_settings(redis_server, namespace, record=True)


RUN_S = {"embed": (0.010, 0.020, 0.030), "generate": (0.4, 0.5, 0.9)}


def bilevel(settings: Settings, *args: str) -> Result:
    target = ["--redis-url", settings.url() or "", "--namespace", settings.namespace]
    return CliRunner().invoke(app, ["record", *args, *target], env={"COLUMNS": "80"})


def one_error_line(result: Result, code: int, *fragments: str) -> None:
    """Exit `code` and one line on stderr naming each fragment, without a traceback."""
    assert result.exit_code == code, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert "Traceback" not in result.output


@pytest.fixture
def served(store: Store, run: Runner) -> Store:
    """On the real clock (the command's window is): 30 embed jobs on queue `small`, 30 generate
    jobs on `big` with tokens, one generate job dead on `big`, one cancelled; loads reported."""
    real = Store(store.redis, store.settings)

    async def make() -> None:
        for queue, job_type, n in (("small", "embed", 30), ("big", "generate", 30)):
            await submit_to_queue(
                real, queue, *(new_job(job_type, i, tenant="acme", priority=2) for i in range(n))
            )
            leases = await real.lease(queue, n)
            times = RUN_S[job_type]
            reports = [
                RunReport(times[i % 3], 100 + i, 10 + i if job_type == "generate" else None)
                for i in range(n)
            ]
            await real.complete([(x.job_id, x.token, None) for x in leases], reports=reports)
        [dead] = await submit_to_queue(real, "big", new_job("generate", max_retries=0))
        [lease] = await real.lease("big")
        await real.fail(dead, lease.token, BOOM, retryable=False, run_s=0.6)
        [cancelled] = await submit_to_queue(real, "small", new_job("embed"))
        await real.cancel(cancelled)
        await real.record_model_load("big", {"generate": 4.0})
        await real.record_model_load("big", {"generate": 6.0})
        await real.record_model_load("small", {"embed": 0.5})

    run(make())
    return real


class TestOutputs:
    def test_the_trace_loads_with_the_generic_loader_and_keeps_every_run(
        self, served: Store, tmp_path: Path
    ) -> None:
        """trace.csv loads with load_trace('generic_csv') as it is: one row per job that ran to
        an end on a queue (the cancelled one left out), measured service times and tokens."""
        out = tmp_path / "rec"
        result = bilevel(served.settings, "--out", str(out))
        assert result.exit_code == 0, result.stderr
        assert "recorded 61 jobs" in result.stdout
        text = (out / "trace.csv").read_text()
        arrivals = load_trace("generic_csv", text.splitlines(keepends=True), source="trace.csv")
        assert len(arrivals) == 61
        assert arrivals[0].arrival_s == 0.0
        by_type: dict[str, list[float]] = {}
        for a in arrivals:
            assert a.service_s is not None
            by_type.setdefault(a.job_type, []).append(a.service_s)
            assert (a.tenant, a.priority) == (("acme", 2) if a.tokens_in is not None else (None, 0))
        assert sorted(set(by_type["embed"])) == list(RUN_S["embed"])
        assert len(by_type["generate"]) == 31
        assert sum(a.tokens_out is not None for a in arrivals) == 30

    def test_the_scenario_reads_replays_the_trace_and_simulates(
        self, served: Store, tmp_path: Path
    ) -> None:
        """scenario.yaml is a valid scenario in the current layout: the recorded queues and job
        types, service models fitted to the run times, median model loads, the trace beside it
        as its workload; `bilevel simulate` runs it."""
        out = tmp_path / "rec"
        assert bilevel(served.settings, "--out", str(out)).exit_code == 0
        path = out / "scenario.yaml"
        scenario = parse_scenario(path.read_text(), source=str(path))
        queues = {q.name: q for q in scenario.queues}
        assert {n: q.job_types for n, q in queues.items()} == {
            "big": ("generate",),
            "small": ("embed",),
        }
        embed = queues["small"].service
        assert embed.kind == "lognormal"
        assert embed.mean_s == pytest.approx(statistics.fmean(RUN_S["embed"]), rel=1e-4)
        assert queues["big"].model_load_s == 5.0
        assert queues["small"].model_load_s == 0.5
        assert scenario.workload.trace is not None
        assert scenario.workload.trace.path == "trace.csv"
        lines = (out / "trace.csv").read_text().splitlines(keepends=True)
        assert len(prepare(scenario, 1, trace_lines=lines).jobs.arrivals) == 61
        sim = CliRunner().invoke(app, ["simulate", "--scenario", str(path), "--json"])
        assert sim.exit_code == 0, sim.output
        assert '"jobs": 61' in sim.stdout

    def test_a_config_gives_the_scenario_its_layout(self, served: Store, tmp_path: Path) -> None:
        """With --config, each recorded queue keeps the config's bounds and SLO, and routing and
        allocation are the config's (its initial allocation left out)."""
        config = tmp_path / "service.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "queues": [
                        {"name": "small", "job_types": ["embed"], "min_workers": 1, "slo_s": 0.5},
                        {"name": "big", "job_types": ["generate"], "max_workers": 3},
                        {"name": "idle", "job_types": ["classify"]},
                    ],
                    "routing": {"policy": "shortest_wait", "batch_size": 50},
                    "allocation": {
                        "policy": "proportional",
                        "budget": 4,
                        "tick_s": 2.0,
                        "initial": {"idle": 1},
                    },
                }
            )
        )
        out = tmp_path / "rec"
        result = bilevel(served.settings, "--out", str(out), "--config", str(config))
        assert result.exit_code == 0, result.stderr
        scenario = parse_scenario((out / "scenario.yaml").read_text())
        queues = {q.name: q for q in scenario.queues}
        assert set(queues) == {"small", "big"}
        assert (queues["small"].min_workers, queues["small"].slo_s) == (1, 0.5)
        assert queues["big"].max_workers == 3
        assert scenario.routing.policy == "shortest_wait"
        a = scenario.allocation
        assert (a.policy, a.budget, a.tick_s, a.initial) == ("proportional", 4, 2.0, None)

    def test_force_replaces_the_files_of_a_used_directory(
        self, served: Store, tmp_path: Path
    ) -> None:
        """A second record into the same directory needs --force, and then replaces both files,
        leaving other files alone and no temp files behind."""
        out = tmp_path / "rec"
        assert bilevel(served.settings, "--out", str(out)).exit_code == 0
        (out / "trace.csv").write_text("stale")
        (out / "notes.txt").write_text("mine")
        one_error_line(bilevel(served.settings, "--out", str(out)), 2, str(out), "--force")
        assert (out / "trace.csv").read_text() == "stale"
        assert bilevel(served.settings, "--out", str(out), "--force").exit_code == 0
        assert (out / "trace.csv").read_text().startswith("arrival_s,job_type")
        assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "scenario.yaml", "trace.csv"]


class TestWindow:
    def test_since_and_duration_keep_the_jobs_submitted_in_the_window(
        self, store: Store, run: Runner, tmp_path: Path
    ) -> None:
        """--since 1h keeps what was submitted in the last hour; a window that ended before it
        (--since an ISO time, --duration) holds nothing: exit 1, and no directory is made."""
        real = Store(store.redis, store.settings)

        async def make() -> None:
            await submit_to_queue(real, "q", new_job())
            [lease] = await real.lease("q")
            await real.complete([(lease.job_id, lease.token, None)], reports=[RunReport(0.1)])

        run(make())
        out = tmp_path / "rec"
        assert bilevel(store.settings, "--out", str(out), "--since", "1h").exit_code == 0
        past = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 7200))
        empty = tmp_path / "empty"
        result = bilevel(store.settings, "--out", str(empty), "--since", past, "--duration", "30m")
        one_error_line(result, 1, "nothing recorded", store.settings.namespace)
        assert not empty.exists()


class TestErrors:
    def test_an_empty_recording_exits_1_and_writes_nothing(
        self, store: Store, tmp_path: Path
    ) -> None:
        """Nothing recorded: one line saying so, exit 1, no output directory."""
        out = tmp_path / "rec"
        one_error_line(bilevel(store.settings, "--out", str(out)), 1, "nothing recorded")
        assert not out.exists()

    @pytest.mark.parametrize(
        ("args", "fragments"),
        [
            (["--since", "yesterday"], ["--since", "not a duration"]),
            (["--since", "2026-13-45T00:00:00"], ["--since", "ISO 8601"]),
            (["--since", "2999-01-01T00:00:00Z"], ["--since", "future"]),
            (["--duration", "10m"], ["--duration needs --since"]),
            (["--since", "1h", "--duration", "0s"], ["--duration", "longer than 0"]),
        ],
    )
    def test_bad_window_options_exit_2(
        self, store: Store, tmp_path: Path, args: list[str], fragments: list[str]
    ) -> None:
        """A malformed --since or --duration is named, before anything is read."""
        result = bilevel(store.settings, "--out", str(tmp_path / "rec"), *args)
        one_error_line(result, 2, *fragments)

    def test_an_out_that_is_a_file_exits_2(self, store: Store, tmp_path: Path) -> None:
        """--out naming a file is refused before anything is read."""
        target = tmp_path / "file"
        target.write_text("x")
        one_error_line(bilevel(store.settings, "--out", str(target)), 2, "--out", "not a directory")

    def test_no_redis_url_exits_2(self, tmp_path: Path) -> None:
        """Without a Redis URL there is nothing to read: exit 2, saying how to give one."""
        result = CliRunner().invoke(app, ["record", "--out", str(tmp_path / "rec")], env={})
        one_error_line(result, 2, "no Redis URL")
