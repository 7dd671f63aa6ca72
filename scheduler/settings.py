"""Typed settings, from keyword arguments, environment variables (BILEVEL_*) or a URL."""

from __future__ import annotations

from typing import Any, Literal, Self

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from scheduler.keys import validate_name

MIB = 1024 * 1024

# Redis's appendfsync policies that keep what they promise ("no" leaves it to the OS: unbounded).
Appendfsync = Literal["everysec", "always"]


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
    # Log lines as JSON, as console text, or JSON unless standard error is a terminal.
    log_format: Literal["auto", "json", "console"] = "auto"
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("namespace")
    @classmethod
    def _valid_namespace(cls, value: str) -> str:
        return validate_name("namespace", value)

    @classmethod
    def from_url(cls, url: str, **overrides: Any) -> Self:
        """Settings for the Redis server at `url`, other fields from the environment or overrides."""
        return cls(redis_url=SecretStr(url), **overrides)

    def url(self) -> str | None:
        return self.redis_url.get_secret_value() if self.redis_url is not None else None
