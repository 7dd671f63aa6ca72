"""Service configuration: Redis, queues and their handlers, both levels' policies, tick, guardrails.

Read from a YAML file and BILEVEL_* environment variables (environment wins), validated by pydantic;
any bad field fails at start with its path, e.g. "queues.1.max_workers: ...".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Self

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from scheduler.errors import BilevelError
from scheduler.keys import validate_name
from scheduler.settings import Settings


class ConfigError(BilevelError, ValueError):
    """The service configuration is invalid; the message names the file and each bad field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class QueueConfig(_Strict):
    """One task queue: which job types it serves and how many workers it may have."""

    name: str
    job_types: tuple[str, ...] = Field(min_length=1)
    # A job must carry all of these tags for the rule router to send it here.
    required_tags: tuple[str, ...] = ()
    min_workers: int = Field(default=0, ge=0)
    max_workers: int | None = Field(default=None, ge=0)
    # Target job completion time, used by SLO-aware policies and reported by status.
    slo_s: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _check(self) -> Self:
        validate_name("queue name", self.name)
        if self.max_workers is not None and self.max_workers < self.min_workers:
            raise ValueError(f"max_workers {self.max_workers} < min_workers {self.min_workers}")
        return self


class PolicyConfig(_Strict):
    """A policy by registry name (policies.registry) and its keyword parameters."""

    policy: str
    params: dict[str, Any] = Field(default_factory=dict)


class AllocationConfig(_Strict):
    """Level 2: the allocator, how often it runs, and the guardrails around it."""

    policy: str = "switch_aware"
    params: dict[str, Any] = Field(default_factory=dict)
    # The allocator runs once per tick.
    tick_s: float = Field(default=1.0, gt=0)
    # While nothing is queued, running, arriving or loading, the full tick (pool calls, decision,
    # log line, published state) runs only this often; Redis is still checked every tick_s, and
    # any activity brings the full tick back at once. Kept under the published state's 30 s TTL.
    idle_tick_s: float = Field(default=10.0, gt=0, le=25.0)
    # Total workers the allocation may place across all queues.
    budget: int = Field(default=2, ge=1)
    max_moves_per_tick: int | None = Field(default=None, ge=0)
    hysteresis_workers: int = Field(default=1, ge=0)
    # Used when the allocator raises, returns something invalid, or its checkpoint is missing.
    fallback: str = "proportional"


class WorkerConfig(_Strict):
    """How model workers lease and report jobs."""

    # Most jobs a worker leases at once (a handler's own max_batch may be lower).
    max_batch: int = Field(default=16, ge=1)
    # Heartbeat period; must be well inside the store's lease (Settings.lease_s).
    heartbeat_s: float = Field(default=2.0, gt=0)
    # CPUs each worker actor reserves in Ray (a handler's own resource needs take precedence).
    num_cpus: float = Field(default=0.5, ge=0)
    # A streaming job's chunks go to Redis at most once per this many ms, each append carrying
    # every chunk yielded since the last: a slow stream's chunk leaves at once (one round trip of
    # latency), a fast one costs one round trip per interval instead of one per chunk.
    stream_flush_ms: float = Field(default=5.0, ge=0, le=1000)
    # Most chunks per append (one script call), so a burst does not hold Redis for long.
    stream_batch_max: int = Field(default=512, ge=1, le=10_000)


class HealthConfig(_Strict):
    """How the service tells a stuck role from a working one (scheduler.service.health)."""

    # A role loop that neither completed nor failed a step for this long is stalled: status says
    # so, and the watchdog restarts it. (A controller's is at least five ticks.)
    stall_after_s: float = Field(default=15.0, gt=0)
    # Restart stalled loops automatically (off: only report them).
    watchdog: bool = True


class RouterConfig(PolicyConfig):
    """Level 1: the routing policy and how many ingress jobs it routes per round trip."""

    policy: str = "rule"
    batch_size: int = Field(default=500, ge=1)


class ServiceConfig(BaseSettings):
    """The whole service. YAML keys are these field names; BILEVEL_* variables override them."""

    model_config = SettingsConfigDict(
        env_prefix="BILEVEL_", env_nested_delimiter="__", extra="forbid", frozen=True
    )

    # Store settings (Redis URL, namespace, TTLs, lease): see scheduler.settings.Settings.
    store: Settings = Field(default_factory=Settings)
    # Python modules imported at start; importing them registers their handlers.
    handlers: tuple[str, ...] = ("workers.demo_models",)
    queues: tuple[QueueConfig, ...] = Field(min_length=1)
    routing: RouterConfig = Field(default_factory=RouterConfig)
    allocation: AllocationConfig = Field(default_factory=AllocationConfig)
    worker: WorkerConfig = Field(default_factory=WorkerConfig)
    health: HealthConfig = Field(default_factory=HealthConfig)

    @model_validator(mode="after")
    def _check(self) -> Self:
        names = [q.name for q in self.queues]
        for i, name in enumerate(names):
            if name in names[:i]:
                raise ValueError(f"queues.{i}.name: duplicate queue name {name!r}")
        minimum = sum(q.min_workers for q in self.queues)
        if minimum > self.allocation.budget:
            raise ValueError(
                f"allocation.budget: {self.allocation.budget} is below the sum of the queues' "
                f"min_workers ({minimum})"
            )
        return self

    def queue(self, name: str) -> QueueConfig:
        for q in self.queues:
            if q.name == name:
                return q
        raise KeyError(name)

    @classmethod
    def load(cls, path: str | Path, **overrides: Any) -> ServiceConfig:
        """Read and validate a YAML file; ConfigError names the file and every bad field."""
        path = Path(path)
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of settings")
        return cls.from_mapping({**raw, **overrides}, source=str(path))

    @classmethod
    def from_mapping(cls, raw: dict[str, Any], *, source: str = "<config>") -> ServiceConfig:
        try:
            store = raw.get("store")
            if isinstance(store, dict) and isinstance(store.get("redis_url"), str):
                raw = {**raw, "store": {**store, "redis_url": SecretStr(store["redis_url"])}}
            return cls(**raw)
        except ValidationError as exc:
            lines = [
                f"  {'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg']}"
                for e in exc.errors()
            ]
            raise ConfigError(f"{source}: invalid configuration\n" + "\n".join(lines)) from None
