"""Control plane: settings, job models, the Redis job store, the client, and the service loops.

The names below are the public API for users who submit jobs; everything else is internal.
"""

from scheduler.client import AsyncClient, AsyncJobHandle, Client, JobHandle, JobRequest
from scheduler.errors import (
    BilevelError,
    InvalidCursor,
    InvalidJob,
    JobCancelled,
    JobFailed,
    JobNotFound,
    JobTimeout,
    NoService,
    RedisUnavailable,
    Rejected,
    StreamTruncated,
    UnknownQueue,
)
from scheduler.listing import JobPage, JobSummary, ListOrder
from scheduler.models import ErrorInfo, Job, JobEvent, JobStatus
from scheduler.operations import (
    Cancellation,
    CancelOutcome,
    PurgeReport,
    Refusal,
    ReplayReport,
)
from scheduler.settings import Settings
from scheduler.streams import StreamRestart

__all__ = [
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
]
