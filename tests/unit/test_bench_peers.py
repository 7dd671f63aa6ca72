"""bench_e2e's peer side: the parsing and bookkeeping that turn raw outputs into its figures."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from benchmarks.bench_e2e import targets
from benchmarks.peers import procstat
from benchmarks.peers.base import Load, RoundResult
from benchmarks.peers.bullmq import installed_versions, parse_producer_output
from benchmarks.peers.harness import check_results, percentiles_ms
from benchmarks.peers.procstat import ProcStat, cpu_core_fraction, parse_stat, tree
from benchmarks.peers.runner import PEER_MODULES, parse_peer_names, parse_runner_output
from benchmarks.peers.summary import median_of_rounds, metrics_of, ratio_table
from benchmarks.targets import target


def _stat_line(pid: int, comm: str, ppid: int, utime: int, stime: int, start: int) -> str:
    # Fields 3.. of proc(5): state, ppid, then zeros up to utime (14), stime (15), ... starttime (22).
    fields = ["S", str(ppid)] + ["0"] * 9 + [str(utime), str(stime)] + ["0"] * 6 + [str(start)]
    return f"{pid} ({comm}) " + " ".join(fields + ["0"] * 30)


def _stat(pid: int, ppid: int = 1, ticks: int = 0, start: int = 100) -> ProcStat:
    return ProcStat(pid=pid, comm="x", ppid=ppid, cpu_ticks=ticks, start_ticks=start)


# --- /proc/<pid>/stat -------------------------------------------------------------------------


def test_stat_line_with_spaces_and_parentheses_in_the_command_name() -> None:
    """Fields are counted from the last ')', so a title like Ray's actor names parses."""
    line = _stat_line(4242, "ray::ServeReplica:noop (x)) y", 17, 30, 12, 987654)
    stat = parse_stat(line)
    assert stat == ProcStat(4242, "ray::ServeReplica:noop (x)) y", 17, 42, 987654)


def test_own_stat_names_this_process_and_its_parent() -> None:
    """The live /proc entry of the test process reads back its pid and parent pid."""
    stat = procstat.read_stat(os.getpid())
    assert stat is not None
    assert (stat.pid, stat.ppid) == (os.getpid(), os.getppid())


@pytest.mark.parametrize("line", ["", "12 no parentheses S 1", "12 (short) S 1 2 3"])
def test_malformed_stat_line_is_refused(line: str) -> None:
    """A line that is not a full stat line raises an error saying what it lacks."""
    with pytest.raises(ValueError, match="stat"):
        parse_stat(line)


def test_a_process_gone_reads_as_none() -> None:
    """A pid with no /proc entry is reported gone, not an error."""
    assert procstat.read_stat(2**22 + 1) is None


def test_tree_holds_roots_and_all_descendants_only() -> None:
    """Children and grandchildren of the roots are in the tree; a stranger is not."""
    stats = [_stat(10), _stat(11, ppid=10), _stat(12, ppid=11), _stat(20), _stat(21, ppid=20)]
    assert [s.pid for s in tree([10], stats)] == [10, 11, 12]
    assert [s.pid for s in tree([10, 99], stats)] == [10, 11, 12]


def test_cpu_fraction_sums_deltas_of_processes_in_both_snapshots() -> None:
    """Ticks are summed over processes seen before and after; a pid reused by another process
    (different start time) and a process that vanished are left out."""
    ticks_s = procstat.TICKS_PER_S
    before = [_stat(1, ticks=100), _stat(2, ticks=50), _stat(3, ticks=0)]
    after = [_stat(1, ticks=100 + ticks_s), _stat(2, ticks=50 + ticks_s, start=999)]
    assert cpu_core_fraction(before, after, 2.0) == pytest.approx(0.5)


def test_cpu_fraction_refuses_an_empty_window() -> None:
    """A window of no length cannot give a rate."""
    with pytest.raises(ValueError, match="window_s"):
        cpu_core_fraction([], [], 0.0)


# --- rounds -----------------------------------------------------------------------------------


def test_percentiles_use_bench_e2e_rule() -> None:
    """p50 is the median; p99 the sample at one-based rank floor(0.99 n), as for bilevel."""
    samples = [i / 1000 for i in range(1, 301)]  # 1..300 ms, shuffled order irrelevant
    assert percentiles_ms(list(reversed(samples))) == (150.5, 297.0)


def test_percentiles_of_nothing_is_an_error() -> None:
    """No samples raises rather than reporting a made-up figure."""
    with pytest.raises(ValueError, match="no round-trip samples"):
        percentiles_ms([])


def test_a_result_that_is_not_its_payload_is_caught() -> None:
    """Every job must come back with its own payload, and each job must have one result."""
    check_results([1, 2, 3], [1, 2, 3])
    with pytest.raises(RuntimeError, match="payload 2 returned 3"):
        check_results([1, 3, 2], [1, 2, 3])
    with pytest.raises(RuntimeError, match="2 results for 3 jobs"):
        check_results([1, 2], [1, 2, 3])


def test_load_refuses_sizes_that_cannot_run() -> None:
    """Non-positive sizes and a job count that does not split over the clients are refused."""
    with pytest.raises(ValueError, match="round_trips"):
        Load(round_trips=0)
    with pytest.raises(ValueError, match="split evenly"):
        Load(individual_jobs=1000, clients=16)


def test_median_of_rounds_in_bench_e2e_shape() -> None:
    """Each figure's median over the rounds, with the rounds kept beside it."""
    rounds = [
        RoundResult(100, 50, 1.0, 5.0),
        RoundResult(300, 10, 2.0, 9.0),
        RoundResult(200, 30, 3.0, 1.0),
    ]
    summary = median_of_rounds(rounds)
    assert summary["batched_jobs_per_s"] == 200
    assert summary["individual_jobs_per_s"] == 30
    assert summary["round_trip"] == {"p50_ms": 2.0, "p99_ms": 5.0}
    assert len(summary["rounds"]) == 3


# --- ratios -----------------------------------------------------------------------------------


def _result(batched: float, individual: float, p50: float, p99: float, idle: float) -> dict:
    return {
        "batched_jobs_per_s": batched,
        "individual_jobs_per_s": individual,
        "round_trip": {"p50_ms": p50, "p99_ms": p99},
        "idle_cpu_core_fraction": idle,
    }


def test_metrics_of_a_skipped_peer_are_none() -> None:
    """A skipped or failed row contributes no metric."""
    assert metrics_of({"skipped": "node not found"}) == {}
    assert metrics_of(_result(1, 2, 3, 4, 0.5))["round_trip_p99_ms"] == 4.0


def test_best_peer_is_highest_throughput_and_lowest_latency() -> None:
    """Throughput compares with the fastest peer, latency and idle CPU with the lowest; ratios
    are bilevel over peer in both directions."""
    bilevel = _result(20_000, 8_000, 1.5, 3.0, 0.02)
    peers = {
        "a": _result(4_000, 4_000, 1.0, 6.0, 0.0),
        "b": _result(5_000, 2_000, 3.0, 2.0, 0.01),
    }
    table = ratio_table(bilevel, peers)
    assert table["batched_jobs_per_s"]["best_peer"] == "b"
    assert table["batched_jobs_per_s"]["bilevel_over_best"] == 4.0
    assert table["individual_jobs_per_s"]["best_peer"] == "a"
    assert table["round_trip_p50_ms"]["best_peer"] == "a"
    assert table["round_trip_p50_ms"]["bilevel_over_best"] == 1.5
    assert table["round_trip_p99_ms"]["bilevel_over_each"] == {"a": 0.5, "b": 1.5}
    # The idle best is 0.0: no ratio rather than a division by zero.
    assert table["idle_cpu_core_fraction"]["best_peer"] == "a"
    assert table["idle_cpu_core_fraction"]["bilevel_over_best"] is None
    assert table["idle_cpu_core_fraction"]["better"] == "lower"


def test_no_measured_peer_gives_an_empty_table() -> None:
    """With every peer skipped there is nothing to compare with."""
    assert ratio_table(_result(1, 1, 1, 1, 1), {"bullmq": {"skipped": "node not found"}}) == {}


# --- outputs of child processes ---------------------------------------------------------------


def test_producer_output_gives_the_round() -> None:
    """BullMQ's producer line: rates rounded, percentiles from its raw samples by our rule."""
    samples = [i / 1000 for i in range(1, 301)]
    stdout = "warming up\n" + json.dumps(
        {
            "batched_jobs_per_s": 3714.6,
            "individual_jobs_per_s": 3696.2,
            "round_trip_samples_s": samples,
        }
    )
    assert parse_producer_output(stdout) == RoundResult(3715, 3696, 150.5, 297.0)


@pytest.mark.parametrize(
    ("stdout", "message"),
    [
        ("", "printed nothing"),
        ("Error: connect ECONNREFUSED", "not JSON"),
        ('{"batched_jobs_per_s": 1}', "lacks individual_jobs_per_s, round_trip_samples_s"),
    ],
)
def test_bad_producer_output_is_refused(stdout: str, message: str) -> None:
    """Output without the round's figures raises an error naming what is missing."""
    with pytest.raises(ValueError, match=message):
        parse_producer_output(stdout)


def test_installed_versions_read_from_node_modules(tmp_path: Path) -> None:
    """The versions npm resolved are read from each package's manifest."""
    for name, version in [("bullmq", "6.7.0"), ("ioredis", "5.9.3")]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "package.json").write_text(json.dumps({"version": version}))
    assert installed_versions(tmp_path) == {"bullmq": "6.7.0", "ioredis": "5.9.3"}


def test_runner_output_is_its_last_json_line() -> None:
    """Log lines a library prints to stdout before the result do not hide it."""
    stdout = 'INFO starting\n{"peer": "rq", "batched_jobs_per_s": 80}\n'
    assert parse_runner_output(stdout) == {"peer": "rq", "batched_jobs_per_s": 80}
    with pytest.raises(ValueError, match="no JSON object"):
        parse_runner_output("Traceback (most recent call last):\n")


def test_peer_names_are_checked() -> None:
    """--peers takes a known subset (in its order, once each); 'all' means every peer, 'none'
    none."""
    assert parse_peer_names("rq, celery,rq") == ["rq", "celery"]
    assert parse_peer_names("all") == list(PEER_MODULES)
    assert parse_peer_names("none") == []
    with pytest.raises(ValueError, match="unknown peer\\(s\\) sidekiq"):
        parse_peer_names("celery,sidekiq")


def test_bullmq_without_node_is_a_loud_skip(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no node on PATH, BullMQ's row says so instead of silently vanishing."""
    from benchmarks.peers.bullmq import PEER
    from benchmarks.peers.runner import run_peer

    monkeypatch.setenv("PATH", str(tmp_path))
    row = run_peer(PEER, "redis://127.0.0.1:1/0", None, rounds=1)
    assert row["skipped"] == "node not found"
    assert "workers" in row["settings"]


# --- issue 19's targets ----------------------------------------------------------------------


def test_a_target_row_is_met_only_within_its_bound() -> None:
    """An upper bound is met at or below it, a lower bound at or above it."""
    assert target(15.0, 15.0)["met"]
    assert not target(15.0, 15.1)["met"]
    assert target(2.0, 2.5, at_most=False)["met"]
    assert not target(2.0, 1.9, at_most=False)["met"]


def test_an_unmeasured_target_is_not_met() -> None:
    """No figure (a peer that did not run) or no limit (BullMQ's p50 missing) is never met."""
    assert not target(3.0, None)["met"]
    assert not target(None, 1.0, note="BullMQ did not run")["met"]


def test_e2e_targets_compare_with_the_peers_of_the_same_run() -> None:
    """The p50 target is BullMQ's p50 of this run; the throughput targets are ratios to the best
    peer; without peers they are unmeasured."""
    ours = {
        "batched_jobs_per_s": 14_000,
        "individual_jobs_per_s": 5_000,
        "round_trip": {"p50_ms": 1.0, "p99_ms": 2.0},
        "redis_cpu_us_per_job": {"batched": 20.0, "individual": 50.0},
        "idle_cpu_core_fraction": 0.01,
    }
    bullmq = {
        "batched_jobs_per_s": 7_000,
        "individual_jobs_per_s": 4_000,
        "round_trip": {"p50_ms": 1.1, "p99_ms": 2.5},
    }
    out = targets(ours, {"bullmq": bullmq}, ratio_table(ours, {"bullmq": bullmq}))
    assert out["round_trip_p50_ms_vs_bullmq"] == {
        "target": 1.1,
        "measured": 1.0,
        "met": True,
        "bound": "at_most",
        "note": "target: BullMQ's p50 in this run",
    }
    assert out["batched_jobs_per_s_over_best_peer"]["met"]
    assert not out["individual_jobs_per_s_over_best_peer"]["met"]
    assert not out["redis_cpu_us_per_job_batched"]["met"]
    assert out["redis_cpu_us_per_job_individual"]["met"]
    assert not out["idle_cpu_core_fraction"]["met"]
    alone = targets(ours, {}, {})
    assert alone["round_trip_p50_ms_vs_bullmq"]["measured"] == 1.0
    assert not alone["round_trip_p50_ms_vs_bullmq"]["met"]
    assert alone["batched_jobs_per_s_over_best_peer"]["measured"] is None
