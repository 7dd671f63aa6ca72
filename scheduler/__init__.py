"""Control plane: settings, job models, the Redis job store, the client, and the service loops.

The names below are the public API for users who submit jobs; everything else is internal.
"""

from scheduler.client import AsyncClient, AsyncJobHandle, Client, JobHandle, JobRequest
from scheduler.errors import (
    BilevelError,
    InvalidJob,
    JobCancelled,
    JobFailed,
    JobNotFound,
    JobTimeout,
    RedisUnavailable,
    StreamTruncated,
)
from scheduler.models import ErrorInfo, Job, JobStatus
from scheduler.settings import Settings
from scheduler.streams import StreamRestart

__all__ = [
    "AsyncClient",
    "AsyncJobHandle",
    "BilevelError",
    "Client",
    "ErrorInfo",
    "InvalidJob",
    "Job",
    "JobCancelled",
    "JobFailed",
    "JobHandle",
    "JobNotFound",
    "JobRequest",
    "JobStatus",
    "JobTimeout",
    "RedisUnavailable",
    "Settings",
    "StreamRestart",
    "StreamTruncated",
]
