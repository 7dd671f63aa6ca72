"""Role health: progress marks, and the state a reader derives from a published record."""

from __future__ import annotations

import pytest

from scheduler.service.health import GONE_AFTER_PUBLISHES, PUBLISH_EVERY_S, Progress, RoleHealth
from tests.conftest import ManualClock


def record(clock: ManualClock, **overrides: object) -> RoleHealth:
    values: dict[str, object] = {
        "role": "router",
        "name": "bilevel:ns:control/router",
        "process": "node-1:4242",
        "leading": True,
        "published_s": clock(),
        "last_progress_s": clock(),
        "election_progress_s": clock(),
        "stall_after_s": 15.0,
        **overrides,
    }
    return RoleHealth(**values)  # type: ignore[arg-type]


class TestProgress:
    def test_a_new_loop_has_a_grace_period(self, clock: ManualClock) -> None:
        """A loop that just started is not stalled: it has not had time to make progress."""
        progress = Progress(clock=clock)
        clock.advance(14.9)
        assert not progress.stalled(15.0)
        clock.advance(0.2)
        assert progress.stalled(15.0)

    def test_a_failing_loop_is_not_stalled(self, clock: ManualClock) -> None:
        """A loop whose steps keep failing is failing (Redis away), which a restart cannot fix."""
        progress = Progress(clock=clock)
        for _ in range(30):
            clock.advance(1.0)
            progress.failed(ConnectionError("Connection closed by server."))
        assert not progress.stalled(15.0)
        assert progress.failures == 30
        assert progress.last_error == "ConnectionError: Connection closed by server."

    def test_a_loop_stuck_after_an_error_is_stalled(self, clock: ManualClock) -> None:
        """Neither a completed nor a failed step for the threshold: stuck, whatever came before."""
        progress = Progress(clock=clock)
        progress.failed(TimeoutError("read"))
        clock.advance(16.0)
        assert progress.stalled(15.0)

    def test_a_mark_clears_the_failures(self, clock: ManualClock) -> None:
        """One completed step ends a failing streak; the total is kept."""
        progress = Progress(clock=clock)
        progress.failed(OSError("x"))
        progress.mark()
        assert (progress.failures, progress.failures_total, progress.steps) == (0, 1, 1)

    def test_a_restart_gives_a_fresh_grace_period(self, clock: ManualClock) -> None:
        """After the watchdog restarts a loop, it is judged from the restart on."""
        progress = Progress(clock=clock)
        clock.advance(20.0)
        assert progress.stalled(15.0)
        progress.restarted()
        assert not progress.stalled(15.0)


class TestRoleState:
    def test_leading_and_standby(self, clock: ManualClock) -> None:
        """A fresh record says whether the host leads."""
        assert record(clock).state(clock()) == "leading"
        assert record(clock, leading=False).state(clock()) == "standby"

    def test_alive_but_not_progressing_is_stalled(self, clock: ManualClock) -> None:
        """Publishing (alive) while the loop's last progress is old is the stalled state."""
        r = record(clock, last_progress_s=clock() - 20.0)
        assert r.state(clock()) == "stalled"

    def test_a_stuck_election_is_stalled_too(self, clock: ManualClock) -> None:
        """A lock keeper that stopped stepping counts: the role could never lead again."""
        r = record(clock, election_progress_s=clock() - 20.0)
        assert r.state(clock()) == "stalled"

    def test_recent_failures_are_failing(self, clock: ManualClock) -> None:
        """Steps failing right now (Redis away) read as failing, with the error."""
        r = record(
            clock,
            last_progress_s=clock() - 20.0,
            failures=12,
            last_error="ConnectionError: Error 111",
            last_error_s=clock() - 0.5,
        )
        assert r.state(clock()) == "failing"

    def test_an_old_record_is_gone(self, clock: ManualClock) -> None:
        """A host that stopped publishing (dead, or its event loop blocked) is gone."""
        r = record(clock)
        clock.advance(PUBLISH_EVERY_S * GONE_AFTER_PUBLISHES + 0.1)
        assert r.state(clock()) == "gone"

    def test_json_round_trip(self, clock: ManualClock) -> None:
        """What a host publishes is what a reader gets back."""
        r = record(clock, figures={"lag_jobs": 3.0, "lag_s": 0.25}, restarts=2, last_error="x")
        assert RoleHealth.from_json(r.to_json()) == r

    @pytest.mark.parametrize("text", ["", "[]", '{"role": "router"}', "[" * 100_000, "null"])
    def test_garbage_is_refused_with_a_value_error(self, text: str) -> None:
        """Anything this module did not write is a ValueError, never another exception."""
        with pytest.raises(ValueError, match="not a role health record"):
            RoleHealth.from_json(text)
