"""Service configuration: Redis, queues and their handlers, both levels' policies, tick, guardrails.

The queues, routing and allocation are the layout a scenario describes too (policies.schema),
validated by the same code; the store, handlers, worker and health sections, each queue's
required_tags, routing.batch_size and allocation.idle_tick_s are the service's own. Read from a
YAML file and BILEVEL_* environment variables (environment wins), validated by pydantic; any bad
field fails at start with its path, e.g. "queues.1.max_workers: ...". A file in the old layout is
translated with a warning (policies.legacy_layout). `ServiceConfig.from_scenario` serves a
scenario's queues.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from policies.legacy_layout import LayoutDeprecationWarning, upgrade_service
from policies.schema import (
    AllocationSection,
    Layout,
    Problem,
    QueueSection,
    RoutingSection,
    format_problems,
    layout_fields,
    validation_problems,
)
from scheduler.errors import BilevelError
from scheduler.settings import Settings


class ConfigError(BilevelError, ValueError):
    """The service configuration is invalid; the message names the file and each bad field
    (`problems` holds them as (field path, message) when they came from validation)."""

    def __init__(self, message: str, problems: list[Problem] | None = None) -> None:
        super().__init__(message)
        self.problems: list[Problem] = list(problems or [])


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class QueueConfig(QueueSection):
    """One task queue of the layout (policies.schema), and the tags it requires of its jobs."""

    # A job must carry all of these tags for the rule router to send it here. Service-only: the
    # simulator's jobs carry no tags.
    required_tags: tuple[str, ...] = ()


class AllocationConfig(AllocationSection):
    """Level 2 as the layout describes it (policies.schema), and how the service idles."""

    # While nothing is queued, running, arriving or loading, the full tick (pool calls, decision,
    # log line, published state) runs only this often; Redis is still checked every tick_s, and
    # any activity brings the full tick back at once. Kept under the published state's 30 s TTL.
    idle_tick_s: float = Field(default=10.0, gt=0, le=25.0)


class WorkerConfig(_Strict):
    """How model workers lease and report jobs."""

    # Most jobs a worker leases at once (a handler's own max_batch may be lower).
    max_batch: int = Field(default=16, ge=1)
    # Heartbeat period; must be well inside the store's lease (Settings.lease_s).
    heartbeat_s: float = Field(default=2.0, gt=0)
    # CPUs each worker actor reserves in Ray (a handler's own resource needs take precedence).
    num_cpus: float = Field(default=0.5, ge=0)


class HealthConfig(_Strict):
    """How the service tells a stuck role from a working one (scheduler.service.health)."""

    # A role loop that neither completed nor failed a step for this long is stalled: status says
    # so, and the watchdog restarts it. (A controller's is at least five ticks.)
    stall_after_s: float = Field(default=15.0, gt=0)
    # Restart stalled loops automatically (off: only report them).
    watchdog: bool = True


class RouterConfig(RoutingSection):
    """Level 1 as the layout describes it, and how many ingress jobs it routes per round trip."""

    batch_size: int = Field(default=500, ge=1)


class ServiceConfig(BaseSettings, Layout):
    """The whole service. YAML keys are these field names; BILEVEL_* variables override them.

    The queues, routing and allocation are a `policies.schema.Layout`, checked there.
    """

    model_config = SettingsConfigDict(
        env_prefix="BILEVEL_", env_nested_delimiter="__", extra="forbid", frozen=True
    )

    # Store settings (Redis URL, namespace, TTLs, lease): see scheduler.settings.Settings.
    store: Settings = Field(default_factory=Settings)
    # Python modules imported at start; importing them registers their handlers.
    handlers: tuple[str, ...] = ("workers.demo_models",)
    queues: tuple[QueueConfig, ...] = Field(min_length=1)
    routing: RouterConfig = Field(default_factory=RouterConfig)
    allocation: AllocationConfig
    worker: WorkerConfig = Field(default_factory=WorkerConfig)
    health: HealthConfig = Field(default_factory=HealthConfig)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The environment wins over the file, key by key, so that a deployment can override one
        # setting of a shared file (BILEVEL_ALLOCATION__BUDGET=24) without copying it.
        return env_settings, init_settings, dotenv_settings, file_secret_settings

    def queue(self, name: str) -> QueueConfig:
        for q in self.queues:
            if q.name == name:
                return q
        raise KeyError(name)

    @classmethod
    def load(cls, path: str | Path, **overrides: Any) -> ServiceConfig:
        """Read and validate a YAML file; ConfigError names the file and every bad field."""
        raw = read_mapping(path)
        return cls.from_mapping({**raw, **overrides}, source=str(path))

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any], *, source: str = "<config>") -> ServiceConfig:
        """Validate a mapping of settings (a file in the old layout is translated, with a
        LayoutDeprecationWarning); ConfigError names `source` and every bad field."""
        upgrade = upgrade_service(raw, budget_elsewhere=_env_sets("allocation", "budget"))
        if upgrade.notes:
            warnings.warn(upgrade.message(source), LayoutDeprecationWarning, stacklevel=2)
        raw = upgrade.raw
        try:
            store = raw.get("store")
            if isinstance(store, dict) and isinstance(store.get("redis_url"), str):
                raw = {**raw, "store": {**store, "redis_url": SecretStr(store["redis_url"])}}
            return cls(**raw)
        except ValidationError as exc:
            problems = validation_problems(exc, renamed=upgrade.renamed)
            raise ConfigError(
                f"{source}: invalid configuration\n" + format_problems(problems), problems
            ) from None

    @classmethod
    def from_scenario(
        cls, scenario: Layout, *, source: str = "<config>", **service_only: Any
    ) -> ServiceConfig:
        """The service that serves `scenario`'s queues, routing policy and allocation with its
        guardrails, exactly as the scenario states them (its service-time and model-load models,
        workload and SLO tables stay behind: the service measures what it runs).

        `service_only` holds what a scenario does not describe, as in a config file: `store`,
        `handlers`, `worker`, `health`, and the service's own keys of `routing` (batch_size) and
        `allocation` (idle_tick_s); `queues`, or any layout key of routing or allocation, is
        refused, since the scenario gives them. ConfigError names `source` and the bad field.
        """
        layout = scenario.model_dump(include={"queues", "routing", "allocation"})
        raw: dict[str, Any] = {
            "queues": [
                {k: v for k, v in q.items() if k in QueueSection.model_fields}
                for q in layout["queues"]
            ],
            "routing": layout["routing"],
            "allocation": layout["allocation"],
        }
        problems: list[Problem] = []
        for key, value in service_only.items():
            if key == "queues":
                problems.append(("queues", "the scenario gives the queues: leave them out"))
            elif key in _SERVICE_KEYS_OF:
                own = _SERVICE_KEYS_OF[key]
                if not isinstance(value, Mapping):
                    problems.append((key, f"must be a mapping of {', '.join(own)}"))
                    continue
                for name, item in value.items():
                    if name in own:
                        raw[key] = {**raw[key], name: item}
                    else:
                        problems.append(
                            (
                                f"{key}.{name}",
                                f"the scenario gives {key}.{name}: leave it out (the service's "
                                f"own keys of {key} are {', '.join(own)})",
                            )
                        )
            else:
                raw[key] = value
        if problems:
            raise ConfigError(
                f"{source}: invalid configuration\n" + format_problems(problems), problems
            )
        return cls.from_mapping(raw, source=source)


# The keys of routing and allocation that only the service has (a scenario gives the rest).
_SERVICE_KEYS_OF: dict[str, tuple[str, ...]] = {
    "routing": layout_fields(RouterConfig, RoutingSection),
    "allocation": layout_fields(AllocationConfig, AllocationSection),
}


def read_mapping(path: str | Path) -> dict[str, Any]:
    """The YAML mapping in `path` ({} for an empty file); ConfigError names the file."""
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
    return raw


def _env_sets(*path: str) -> bool:
    """Whether a BILEVEL_* variable sets this config key (pydantic-settings reads them case-blind)."""
    name = "BILEVEL_" + "__".join(path)
    return any(key.upper() == name.upper() for key in os.environ)
