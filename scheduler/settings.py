"""Typed settings, from keyword arguments, environment variables (BILEVEL_*) or a URL."""

from __future__ import annotations

from typing import Any, Literal, Self
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from scheduler.errors import BilevelError
from scheduler.keys import validate_name

MIB = 1024 * 1024

# Redis's appendfsync policies that keep what they promise ("no" leaves it to the OS: unbounded).
Appendfsync = Literal["everysec", "always"]


class SettingsConflict(BilevelError):
    """Two settings that contradict each other (the message says which); never quotes a URL."""


class Settings(BaseSettings):
    """Where Redis is and how the job store behaves. Environment variables are BILEVEL_<FIELD>."""

    model_config = SettingsConfigDict(env_prefix="BILEVEL_", extra="forbid", frozen=True)

    # redis://, rediss:// or unix:// URL, or redis+sentinel:// / rediss+sentinel:// (see
    # scheduler.connection), with user and password if any. None: start an embedded private
    # Redis server. A secret, so it never shows in reprs or logs.
    redis_url: SecretStr | None = None
    # When the embedded server fsyncs its append-only file. "everysec": once a second, so a crash
    # of the machine loses up to about a second of acknowledged writes (a crash of redis-server
    # alone, none). "always": before every reply, so no acknowledged write is lost, at a cost in
    # write throughput. A server at redis_url keeps its own configuration.
    appendfsync: Appendfsync = "everysec"
    # Replicas that must hold a submit before it is acknowledged (Redis WAIT): with 1, a Sentinel
    # failover cannot lose an acknowledged job (replication is otherwise asynchronous). A submit
    # the replicas do not confirm within replica_ack_timeout_s is retried like an outage. 0: off.
    replica_acks: int = Field(default=0, ge=0, le=16)
    replica_ack_timeout_s: float = Field(default=1.0, gt=0)
    # Every key lives under this namespace; deployments sharing a Redis use different ones.
    namespace: str = "default"
    # How long a finished job's record and result are kept.
    result_ttl_s: float = Field(default=24 * 3600.0, gt=0)
    # How long dead-lettered jobs are kept for inspection.
    dead_ttl_s: float = Field(default=7 * 24 * 3600.0, gt=0)
    # How long an idempotency key maps to its job.
    idempotency_ttl_s: float = Field(default=24 * 3600.0, gt=0)
    # Largest encoded job (payload included) a client may submit.
    max_payload_bytes: int = Field(default=MIB, gt=0)
    # A worker's lease on a job; renewed by heartbeat, so it only bounds how long a dead worker's
    # job waits before it runs again.
    lease_s: float = Field(default=30.0, gt=0)
    # Retry backoff: retry_backoff_s * 2**(attempt-1), capped, times a random factor in
    # [1 - retry_jitter, 1 + retry_jitter] so retries of a failed batch do not arrive together.
    retry_backoff_s: float = Field(default=1.0, ge=0)
    retry_backoff_max_s: float = Field(default=300.0, ge=0)
    retry_jitter: float = Field(default=0.5, ge=0, le=1)
    # Retries a job gets when neither its submit nor its handler's registration says: written
    # into the record by the submitting client (precedence: the job's own max_retries, then its
    # handler's, then this).
    max_retries: int = Field(default=3, ge=0, le=100)
    # Refuse submits and result waits (NoService) when no router serves the namespace on this
    # Redis, instead of queueing jobs nobody will run. False to queue for a service started later.
    require_service: bool = True
    # How long a client keeps retrying a submit or a read while Redis is unreachable (a restart, a
    # failover) before it raises RedisUnavailable; 0 fails at the first connection error. Retried
    # submits never create a second job: the retry resends the same job ids.
    outage_retry_s: float = Field(default=10.0, ge=0, le=3600)
    # The cap of a streaming job's stream (Keys.stream): about this many entries are kept (Redis
    # trims whole nodes of up to 100 entries, oldest first), so with stream_max_chunk_bytes it
    # bounds one stream's memory: at most (stream_max_len + 100) x stream_max_chunk_bytes, ~20 MiB
    # by default (a 10,000-token LLM stream of short tokens holds well under 1 MiB). A reader that
    # falls further behind than the cap, or starts late, is told it missed chunks (StreamTruncated).
    stream_max_len: int = Field(default=10_000, ge=100, le=1_000_000)
    # Largest chunk (its JSON text) a streaming handler may yield; a bigger one fails the job.
    stream_max_chunk_bytes: int = Field(default=2048, gt=0, le=MIB)
    # Record every job that finishes (succeeded, dead, or cancelled while running) in a capped
    # stream of the namespace (Keys.record), for `bilevel record` to turn into a trace and a
    # scenario: one XADD inside the script that finishes the job. Off by default: measured end
    # to end it cost more than 5% (docs/recording.md has the figures).
    record: bool = False
    # About this many finished jobs are kept in the recording, oldest trimmed first (Redis trims
    # whole nodes of up to 100 entries). An entry takes about 185 bytes (docs/recording.md), so
    # the default holds ~18 MiB per namespace: half an hour of traffic at 50 jobs/s.
    record_max_len: int = Field(default=100_000, ge=1_000, le=10_000_000)
    # Log lines as JSON, as console text, or JSON unless standard error is a terminal.
    log_format: Literal["auto", "json", "console"] = "auto"
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("namespace")
    @classmethod
    def _valid_namespace(cls, value: str) -> str:
        return validate_name("namespace", value)

    @model_validator(mode="before")
    @classmethod
    def _namespace_from_url(cls, values: Any) -> Any:
        """A URL may name the namespace (`redis://host:6379/0?namespace=demo`): taken out of the
        URL (Redis does not know it) into `namespace`; a different namespace given beside it is
        refused rather than silently overridden."""
        if not isinstance(values, dict) or values.get("redis_url") is None:
            return values
        raw = values["redis_url"]
        url = raw.get_secret_value() if isinstance(raw, SecretStr) else str(raw)
        url, from_url = split_namespace(url)
        if from_url is None:
            return values
        given = values.get("namespace")
        if given is not None and given != "default" and given != from_url:
            # Not a ValueError: pydantic would quote the input, URL and password included.
            raise SettingsConflict(
                f"namespace {given!r} conflicts with the namespace {from_url!r} in the Redis URL"
            )
        return {**values, "redis_url": SecretStr(url), "namespace": from_url}

    @classmethod
    def from_url(cls, url: str, **overrides: Any) -> Self:
        """Settings for the Redis server at `url`, other fields from the environment or overrides."""
        return cls(redis_url=SecretStr(url), **overrides)

    def url(self) -> str | None:
        return self.redis_url.get_secret_value() if self.redis_url is not None else None


def split_namespace(url: str) -> tuple[str, str | None]:
    """(the URL without its `namespace` query parameter, that namespace or None)."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    named = [v for k, v in query if k == "namespace"]
    if not named:
        return url, None
    rest = urlencode([(k, v) for k, v in query if k != "namespace"])
    return urlunsplit(parts._replace(query=rest)), named[-1]
