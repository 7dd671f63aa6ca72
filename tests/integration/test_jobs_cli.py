"""`bilevel jobs` and `bilevel dlq` against the real Redis: what each command prints (text and
JSON), and that every bad input is one line on stderr with exit 2 (a malformed option) or 1 (what
the store says: an unknown job or queue, a job not dead, a refused replay)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from scheduler.cli import app
from scheduler.models import ErrorInfo, JobStatus
from scheduler.settings import Settings
from scheduler.store import Store
from tests.conftest import Runner
from tests.integration.helpers import new_job, submit_to_queue

WIDTH = 80
BOOM = ErrorInfo(type="ValueError", message="bad input", traceback="Traceback:\nValueError: bad")


def bilevel(settings: Settings, *args: str) -> Result:
    target = ["--redis-url", settings.url() or "", "--namespace", settings.namespace]
    return CliRunner().invoke(app, [*args, *target], env={"COLUMNS": str(WIDTH)})


def one_error_line(result: Result, code: int, *fragments: str) -> None:
    """Exit `code` and one line on stderr naming each fragment, without a traceback."""
    assert result.exit_code == code, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert "Traceback" not in result.output


async def dead_jobs(store: Store, queue: str, n: int) -> list[str]:
    ids = await submit_to_queue(store, queue, *[new_job(payload=i, max_retries=0,
                                                        tenant="acme") for i in range(n)])  # fmt: skip
    for lease in await store.lease(queue, n):
        await store.fail(lease.job_id, lease.token, BOOM, retryable=False)
    return ids


@pytest.fixture
def jobs(store: Store, run: Runner) -> dict[str, Any]:
    """Two dead jobs in queue embed, one queued, one succeeded with a large result, and a
    dead-letter entry (dead long ago) whose record is not a hash. On the real clock, which the
    commands' own clients read."""
    real = Store(store.redis, store.settings)

    async def make() -> dict[str, Any]:
        dead = await dead_jobs(real, "embed", 2)
        [first, waiting] = await submit_to_queue(real, "embed", new_job(priority=5), new_job())
        [lease] = await real.lease("embed", 1)
        assert lease.job_id == first  # priority first
        await real.complete([(first, lease.token, {"vector": [0.5] * 100})])
        await real.redis.set(real.keys.job("garbage1"), "not a record")
        await real.redis.zadd(real.keys.dead("embed"), {"garbage1": 1})
        return {"dead": dead, "succeeded": first, "queued": waiting}

    return run(make())


class TestJobs:
    def test_get_prints_the_whole_record(
        self, settings: Settings, jobs: dict[str, Any], store: Store, run: Runner
    ) -> None:
        """get: status, queue, attempts against the budget, times, error, traceback, history;
        a large result by its size in text, whole in JSON."""
        dead = jobs["dead"][0]
        shown = bilevel(settings, "jobs", "get", dead)
        assert shown.exit_code == 0, shown.stderr
        pairs = [line.split(None, 1) for line in shown.stdout.splitlines() if line[0] != " "]
        fields = dict(pair for pair in pairs if len(pair) == 2)
        assert fields["status"] == "dead"
        assert fields["queue"] == "embed"
        assert fields["tenant"] == "acme"
        assert fields["attempts"] == "1 (1 counted against max_retries 0)"
        assert fields["error"] == "ValueError: bad input"
        assert "1. attempt 1 failed at" in shown.stdout
        assert "  ValueError: bad" in shown.stdout  # the traceback
        as_json = json.loads(bilevel(settings, "jobs", "get", jobs["succeeded"], "--json").stdout)
        assert as_json["result"] == {"vector": [0.5] * 100}
        assert as_json["status"] == "succeeded"
        size = as_json["result_bytes"]
        assert size > 200
        done = bilevel(settings, "jobs", "get", jobs["succeeded"])
        assert f"result    {size} bytes of JSON (--json prints it)" in done.stdout

    def test_get_an_unknown_job(self, settings: Settings, jobs: dict[str, Any]) -> None:
        """An unknown id: exit 1, one line naming it."""
        one_error_line(bilevel(settings, "jobs", "get", "nope"), 1, "job nope not found")

    def test_cancel_several(
        self, settings: Settings, jobs: dict[str, Any], store: Store, run: Runner
    ) -> None:
        """cancel: one line per job; an unknown one is an error line and exit 1."""
        result = bilevel(settings, "jobs", "cancel", jobs["queued"], jobs["succeeded"], "nope")
        assert result.exit_code == 1
        assert result.stdout.splitlines() == [
            f"{jobs['queued']}: cancelled",
            f"{jobs['succeeded']}: had finished already; nothing changed",
        ]
        assert result.stderr.strip().splitlines() == [
            "error: job nope: not found (never submitted, purged, or its record expired)"
        ]
        assert run(store.get(jobs["queued"])).status is JobStatus.CANCELLED

    def test_list_pages_with_a_cursor(self, settings: Settings, jobs: dict[str, Any]) -> None:
        """list --json pages with the cursor it prints until the cursor is null; the pages hold
        every job once; the table fits 80 columns with whole ids."""
        seen: list[str] = []
        cursor: list[str] = []
        for _ in range(10):
            listed = bilevel(settings, "jobs", "list", "--limit", "2", "--json", *cursor)
            assert listed.exit_code == 0, (listed.stderr, repr(listed.exception))
            page = json.loads(listed.stdout)
            seen += [j["id"] for j in page["jobs"]]
            if page["cursor"] is None:
                break
            cursor = ["--cursor", page["cursor"]]
        expected = [*jobs["dead"], jobs["succeeded"], jobs["queued"], "garbage1"]
        assert sorted(seen) == sorted(expected)
        table = bilevel(settings, "jobs", "list", "--status", "dead")
        assert table.exit_code == 0, table.stderr
        lines = table.stdout.splitlines()
        assert max(len(line) for line in lines) <= WIDTH
        for job_id in jobs["dead"]:
            assert any(line.startswith(job_id) for line in lines)
        assert lines[-1] == "no more jobs"
        first = bilevel(settings, "jobs", "list", "--limit", "1")
        assert first.stdout.splitlines()[-1].startswith("next page: --cursor ")

    @pytest.mark.parametrize(
        ("args", "code", "fragments"),
        [
            (["--status", "done"], 2, ["status 'done' is not a status", "succeeded"]),
            (["--queue", "no such"], 2, ["queue 'no such' is invalid"]),
            (["--queue", "nope"], 1, ["queue 'nope' is not a known queue", "embed"]),
            (["--limit", "0"], 2, ["--limit 0 is out of range 1..500"]),
            (["--cursor", "xyz"], 2, ["cursor 'xyz' is not a cursor a listing handed out"]),
        ],
    )
    def test_list_refuses_bad_options(
        self, settings: Settings, jobs: dict[str, Any], args: list[str], code: int,
        fragments: list[str],
    ) -> None:  # fmt: skip
        """Each bad option of list is one line naming it, with its exit code."""
        one_error_line(bilevel(settings, "jobs", "list", *args), code, *fragments)


class TestDlq:
    def test_list_shows_dead_and_unreadable_records(
        self, settings: Settings, jobs: dict[str, Any]
    ) -> None:
        """dlq list: the dead jobs with their error, and the record that is not a hash with its
        reason."""
        page = json.loads(bilevel(settings, "dlq", "list", "--json").stdout)
        by_id = {j["id"]: j for j in page["jobs"]}
        assert sorted(by_id) == sorted([*jobs["dead"], "garbage1"])
        assert by_id[jobs["dead"][0]]["error"]["type"] == "ValueError"
        assert by_id["garbage1"]["unreadable"] == "job record is a string, not a hash"
        assert by_id["garbage1"]["status"] is None
        table = bilevel(settings, "dlq", "list", "--queue", "embed")
        assert "unreadable" in table.stdout
        assert "ValueError:" in table.stdout

    def test_show_only_dead_jobs(self, settings: Settings, jobs: dict[str, Any]) -> None:
        """show: a dead job's record; a job that is not dead is exit 1 saying its status."""
        shown = bilevel(settings, "dlq", "show", jobs["dead"][0])
        assert shown.exit_code == 0
        assert "status    dead" in shown.stdout
        one_error_line(
            bilevel(settings, "dlq", "show", jobs["queued"]), 1,
            f"job {jobs['queued']} is queued, not in the dead-letter set",
        )  # fmt: skip

    def test_replay_by_id_and_all(
        self, settings: Settings, jobs: dict[str, Any], store: Store, run: Runner
    ) -> None:
        """replay ID: queued again with its budget reset; --all replays the rest and refuses
        the unreadable record (exit 1, one line saying to purge it)."""
        first, second = jobs["dead"]
        result = bilevel(settings, "dlq", "replay", first)
        assert (result.exit_code, result.stdout) == (0, "replayed 1 job(s) (retry budget reset)\n")
        assert run(store.get(first)).status is JobStatus.QUEUED
        result = bilevel(settings, "dlq", "replay", "--all", "--keep-budget", "--json")
        assert result.exit_code == 1
        out = json.loads(result.stdout)
        assert out["replayed"] == [second]
        assert [r["job_id"] for r in out["refused"]] == ["garbage1"]
        assert result.stderr.strip() == (
            "error: job garbage1: cannot be replayed: job record is a string, not a hash "
            "(purge it instead)"
        )
        assert run(store.get(second)).charged_attempts == 1

    @pytest.mark.parametrize(
        ("args", "code", "fragments"),
        [
            ([], 2, ["give the ids of dead-lettered jobs, or --all"]),
            (["x", "--all"], 2, ["give job ids or --all, not both"]),
            (["x", "--queue", "embed"], 2, ["--queue goes with --all"]),
            (["--all", "--to", "nowhere"], 1, ["queue 'nowhere' is not a known queue"]),
            (["--all", "--queue", "nope"], 1, ["queue 'nope' is not a known queue"]),
            (["nope"], 1, ["job nope: no such job"]),
        ],
    )
    def test_replay_refuses_bad_input(
        self, settings: Settings, jobs: dict[str, Any], args: list[str], code: int,
        fragments: list[str],
    ) -> None:  # fmt: skip
        """Each bad input of replay is one line naming it, with its exit code."""
        one_error_line(bilevel(settings, "dlq", "replay", *args), code, *fragments)

    def test_replay_of_a_job_not_dead(self, settings: Settings, jobs: dict[str, Any]) -> None:
        """A job that is not dead is refused, naming its status."""
        one_error_line(
            bilevel(settings, "dlq", "replay", jobs["queued"]), 1,
            f"job {jobs['queued']}: the job is queued, not in the dead-letter set",
        )  # fmt: skip

    def test_purge_by_id_all_and_older_than(
        self, settings: Settings, jobs: dict[str, Any], store: Store, run: Runner
    ) -> None:
        """purge ID deletes it; --all --older-than keeps what died more recently; --all deletes
        the rest, the unreadable record included."""
        first, second = jobs["dead"]
        assert bilevel(settings, "dlq", "purge", first).stdout == "purged 1 job(s)\n"
        assert not run(store.redis.exists(store.keys.job(first)))
        kept = bilevel(settings, "dlq", "purge", "--all", "--older-than", "1h", "--json")
        assert json.loads(kept.stdout) == {"purged": 1, "dropped": 0, "refused": []}  # garbage1
        assert run(store.dead_ids("embed")) == [second]
        assert bilevel(settings, "dlq", "purge", "--all").stdout == "purged 1 job(s)\n"
        assert run(store.dead_ids("embed")) == []

    @pytest.mark.parametrize(
        ("args", "code", "fragments"),
        [
            (["--all", "--older-than", "7x"], 2, ["--older-than '7x' is not a duration", "7d"]),
            (["x", "--older-than", "7d"], 2, ["--older-than goes with --all"]),
            (["--all", "--queue", "~nope"], 2, ["--queue: queue '~nope' is invalid"]),
            (["nope"], 1, ["job nope: no such job"]),
        ],
    )
    def test_purge_refuses_bad_input(
        self, settings: Settings, jobs: dict[str, Any], args: list[str], code: int,
        fragments: list[str],
    ) -> None:  # fmt: skip
        """Each bad input of purge is one line naming it, with its exit code."""
        one_error_line(bilevel(settings, "dlq", "purge", *args), code, *fragments)

    def test_purge_of_a_job_not_dead(
        self, settings: Settings, jobs: dict[str, Any], store: Store, run: Runner
    ) -> None:
        """A job that is not dead is refused and left alone."""
        one_error_line(
            bilevel(settings, "dlq", "purge", jobs["queued"]), 1,
            "the job is queued, not in the dead-letter set",
        )  # fmt: skip
        assert run(store.get(jobs["queued"])).status is JobStatus.QUEUED
