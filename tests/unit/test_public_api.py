"""The client-facing API: what `scheduler` exports, and that its annotated usage type-checks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import scheduler

EXPECTED = {
    "AsyncClient",
    "AsyncJobHandle",
    "BilevelError",
    "CancelOutcome",
    "Cancellation",
    "Client",
    "ErrorInfo",
    "InvalidCursor",
    "InvalidJob",
    "Job",
    "JobCancelled",
    "JobEvent",
    "JobFailed",
    "JobHandle",
    "JobNotFound",
    "JobPage",
    "JobRequest",
    "JobStatus",
    "JobSummary",
    "JobTimeout",
    "ListOrder",
    "NoService",
    "PurgeReport",
    "RedisUnavailable",
    "Refusal",
    "Rejected",
    "ReplayReport",
    "Settings",
    "StreamRestart",
    "StreamTruncated",
    "UnknownQueue",
}


def test_exported_members() -> None:
    """`scheduler.__all__` is exactly the documented client API, and every name resolves."""
    assert set(scheduler.__all__) == EXPECTED
    for name in scheduler.__all__:
        assert getattr(scheduler, name) is not None


def test_job_status_members_are_the_documented_states() -> None:
    """The eight statuses, as their string values."""
    assert [s.value for s in scheduler.JobStatus] == [
        "pending", "queued", "delayed", "running", "succeeded", "retrying", "dead", "cancelled",
    ]  # fmt: skip


def test_typing_examples_pass_mypy() -> None:
    """tests/typing_examples.py (correct uses of the client) is clean under mypy --strict."""
    example = Path(__file__).resolve().parent.parent / "typing_examples.py"
    out = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", str(example)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stdout
