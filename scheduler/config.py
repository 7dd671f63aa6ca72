"""Service configuration: Redis, queues and their handlers, both levels' policies, tick, guardrails,
and the runtime environment Ray gives the service's processes.

The queues, routing and allocation are the layout a scenario describes too (policies.schema),
validated by the same code; the store, handlers, worker and health sections, each queue's
required_tags, routing.batch_size and allocation.idle_tick_s are the service's own. Read from a
YAML file and BILEVEL_* environment variables (environment wins), validated by pydantic; any bad
field fails at start with its path, e.g. "queues.1.max_workers: ...". A file in the old layout is
translated with a warning (policies.legacy_layout). `ServiceConfig.from_scenario` serves a
scenario's queues.
Relative paths in a file (handler files, runtime_env paths) are relative to its directory; `load`
makes them absolute, so the config means the same whichever directory it is used from.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import yaml
from packaging.requirements import InvalidRequirement, Requirement
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from policies.fairshare import TenantShare
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
from scheduler.admission import AdmissionConfig
from scheduler.errors import BilevelError
from scheduler.models import MAX_TENANT_LEN
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


class MetricsConfig(_Strict):
    """The loopback HTTP server `bilevel serve` runs beside the service: Prometheus metrics at
    /metrics, the dashboard at /, its data at /api/state (scheduler.service.observe)."""

    enabled: bool = True
    # Loopback by default: the page and the metrics carry queue names and tenants, not secrets,
    # but nothing here is meant for the open network; bind 0.0.0.0 only behind a firewall.
    host: str = Field(default="127.0.0.1", min_length=1)
    # 0: a free port, picked at start (serve prints the URL).
    port: int = Field(default=9470, ge=0, le=65535)


# Left out of every directory Ray uploads for the service (on top of Ray's own defaults and the
# directory's .gitignore and .rayignore): environments, caches and VCS data, which can be large and
# are never handler code.
DEFAULT_EXCLUDES: tuple[str, ...] = (
    ".git",
    ".venv",
    "venv",
    "__pycache__",
    "*.pyc",
    ".cache",
    ".mypy_cache",
    ".pytest_cache",
    ".ruff_cache",
    "node_modules",
)

_MODULE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def is_handler_file(entry: str) -> bool:
    """Whether a `handlers:` entry names a .py file (otherwise it is a module name)."""
    return entry.endswith(".py")


def is_uri(value: str) -> bool:
    """Whether a runtime_env location is a URI (s3://, gs://, https://, gcs://, ...), not a path."""
    return "://" in value


def absolute_path(base_dir: Path, value: str) -> str:
    """`value` (a path, ~ allowed) made absolute against `base_dir`, normalised."""
    return os.path.normpath(base_dir / Path(value).expanduser())


def _check_handler_entry(entry: str) -> str:
    if is_handler_file(entry):
        stem = Path(entry).stem
        if not _MODULE_NAME.fullmatch(stem) or "." in stem:
            raise ValueError(
                f"{entry!r}: the file name must be a Python identifier to be imported "
                f"(e.g. {re.sub(r'[^A-Za-z0-9_]', '_', stem) or 'handlers'}.py)"
            )
    elif not _MODULE_NAME.fullmatch(entry):
        raise ValueError(
            f"{entry!r} is neither a module name (dotted identifiers, e.g. my_handlers) nor the "
            "path of a .py file (e.g. ./my_handlers.py)"
        )
    return entry


def _check_pip(pip: tuple[str, ...] | str | None) -> tuple[str, ...] | str | None:
    """Requirement specifiers (PEP 508) are checked here; pip options (--index-url ...), paths and
    URLs go to pip as they are, and pip judges them when Ray sets the environment up. A string is
    the path of a requirements file."""
    if pip is None or isinstance(pip, str):
        if pip is not None and not pip.strip():
            raise ValueError("the requirements file path is empty")
        return pip
    for i, entry in enumerate(pip):
        if not entry.strip() or "\n" in entry:
            raise ValueError(f"entry {i}: one non-empty requirement per entry")
        if entry.startswith(("-", ".")) or "/" in entry or "\\" in entry:
            continue
        try:
            Requirement(entry)
        except InvalidRequirement as exc:
            reason = str(exc).splitlines()[0]
            raise ValueError(
                f"entry {i}: {entry!r} is not a valid requirement ({reason})"
            ) from None
    return tuple(e.strip() for e in pip)


def _env_value(value: Any) -> Any:
    # YAML reads `OMP_NUM_THREADS: 1` as a number; an environment variable is text. Booleans are
    # refused (by the str type) rather than guessed as "True", "1" or "true".
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return value


def _check_env_name(name: str) -> str:
    if not _ENV_NAME.fullmatch(name):
        raise ValueError(f"{name!r} is not an environment variable name")
    return name


HandlerEntry = Annotated[str, AfterValidator(_check_handler_entry)]
PipSpec = Annotated[tuple[str, ...] | str | None, AfterValidator(_check_pip)]
EnvName = Annotated[str, AfterValidator(_check_env_name)]
EnvValue = Annotated[str, BeforeValidator(_env_value)]
NonEmpty = Annotated[str, Field(min_length=1)]


class RuntimeEnvConfig(_Strict):
    """What Ray installs for the service's processes on every node (Ray's runtime_env): handler
    code and what it needs. `bilevel serve` passes it to `ray.init`, so it is the Ray job's
    environment: the control plane and every model worker run in it (Ray's inheritance), on any
    node. Relative paths are relative to the config file.

    When neither working_dir nor py_modules is given and some handler module is not installed (it
    is found only in the directory serve starts in, or named by file), that module's directory is
    the working_dir (scheduler/service/handler_code.py).
    """

    # A local directory, which Ray uploads at start (every worker runs in, and imports from, its
    # node's copy), or a URI of a zip file (s3://, gs://, https://: nothing is uploaded).
    working_dir: NonEmpty | None = None
    # Python modules importable on every node: local .py files, package directories or wheels
    # (uploaded at start), or URIs of zip or wheel files.
    py_modules: tuple[NonEmpty, ...] = ()
    # Installed with pip into a virtualenv on each node (on top of what is installed there):
    # requirement specifiers, or the path of a requirements file.
    pip: PipSpec = None
    env_vars: dict[EnvName, EnvValue] = Field(default_factory=dict)
    # gitignore-style patterns left out of working_dir and py_modules, besides DEFAULT_EXCLUDES
    # and the directory's .gitignore and .rayignore files.
    excludes: tuple[NonEmpty, ...] = ()
    # The longest one node may take to set the environment up (Ray's setup_timeout_seconds; a pip
    # install is most of it). serve waits this long, and a minute more, before it gives up.
    setup_timeout_s: int = Field(default=600, gt=0)

    @property
    def empty(self) -> bool:
        """Nothing for Ray to install."""
        return not (self.working_dir or self.py_modules or self.pip is not None or self.env_vars)

    @property
    def names_code(self) -> bool:
        """Whether it says itself where the code comes from (working_dir or py_modules)."""
        return bool(self.working_dir or self.py_modules)

    def resolved(self, base_dir: Path) -> RuntimeEnvConfig:
        """Relative paths made absolute against `base_dir` (URIs are left alone)."""

        def absolute(value: str) -> str:
            return value if is_uri(value) else absolute_path(base_dir, value)

        update: dict[str, Any] = {"py_modules": tuple(absolute(m) for m in self.py_modules)}
        if self.working_dir is not None:
            update["working_dir"] = absolute(self.working_dir)
        if isinstance(self.pip, str):
            update["pip"] = absolute(self.pip)
        return self.model_copy(update=update)

    def to_ray(self) -> dict[str, Any]:
        """The runtime_env dict Ray takes; {} when there is nothing to install."""
        env: dict[str, Any] = {}
        if self.working_dir is not None:
            env["working_dir"] = self.working_dir
        if self.py_modules:
            env["py_modules"] = list(self.py_modules)
        if self.pip is not None:
            env["pip"] = self.pip if isinstance(self.pip, str) else list(self.pip)
        if self.env_vars:
            env["env_vars"] = dict(self.env_vars)
        if not env:
            return env
        if self.names_code:
            env["excludes"] = [*DEFAULT_EXCLUDES, *self.excludes]
        env["config"] = {"setup_timeout_seconds": self.setup_timeout_s}
        return env


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
    # Imported at start, in this process and in every worker; importing one registers its handlers.
    # Each is a module name (from the Python path, else from the directory serve starts in) or the
    # path of a .py file (relative to the config file). See docs/handlers.md.
    handlers: tuple[HandlerEntry, ...] = ("workers.demo_models",)
    queues: tuple[QueueConfig, ...] = Field(min_length=1)
    routing: RouterConfig = Field(default_factory=RouterConfig)
    allocation: AllocationConfig
    worker: WorkerConfig = Field(default_factory=WorkerConfig)
    health: HealthConfig = Field(default_factory=HealthConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    # What Ray installs for the service on every node: handler code and its dependencies.
    runtime_env: RuntimeEnvConfig = Field(default_factory=RuntimeEnvConfig)
    # Caps on queued jobs, checked at submit (scheduler.admission, docs/admission-and-tenants.md).
    admission: AdmissionConfig = Field(default_factory=AdmissionConfig)
    # Tenants by name ("*": every other tenant, and jobs without one): weights for fair share
    # inside a queue's priority bands, quotas (max_in_flight) and caps (max_queued). Empty: jobs
    # are served in arrival order within a band, as without tenants.
    tenants: dict[str, TenantShare] = Field(default_factory=dict)

    def problems(self) -> list[Problem]:
        """The layout's problems, and admission caps of queues that do not exist."""
        problems = super().problems()
        names = [q.name for q in self.queues]
        for name in self.admission.queues:
            if name not in names:
                problems.append((f"admission.queues.{name}", f"unknown queue; queues are {names}"))
        for tenant in self.tenants:
            if not tenant or len(tenant) > MAX_TENANT_LEN:
                problems.append(
                    (f"tenants.{tenant}", f"a tenant name has 1 to {MAX_TENANT_LEN} characters")
                )
        return problems

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

    def with_paths_resolved(self, base_dir: Path) -> ServiceConfig:
        """Handler files and runtime_env paths made absolute against `base_dir`."""
        handlers = tuple(
            absolute_path(base_dir, h) if is_handler_file(h) else h for h in self.handlers
        )
        return self.model_copy(
            update={"handlers": handlers, "runtime_env": self.runtime_env.resolved(base_dir)}
        )

    def queue(self, name: str) -> QueueConfig:
        for q in self.queues:
            if q.name == name:
                return q
        raise KeyError(name)

    @classmethod
    def load(cls, path: str | Path, **overrides: Any) -> ServiceConfig:
        """Read and validate a YAML file; ConfigError names the file and every bad field."""
        path = Path(path)
        raw = read_mapping(path)
        return cls.from_mapping(
            {**raw, **overrides}, source=str(path), base_dir=path.absolute().parent
        )

    @classmethod
    def from_mapping(
        cls, raw: Mapping[str, Any], *, source: str = "<config>", base_dir: Path | None = None
    ) -> ServiceConfig:
        """Validate a mapping of settings (a file in the old layout is translated, with a
        LayoutDeprecationWarning); relative paths in it are made absolute against `base_dir` (the
        config file's directory; default: the current directory). ConfigError names `source` and
        every bad field."""
        upgrade = upgrade_service(raw, budget_elsewhere=_env_sets("allocation", "budget"))
        if upgrade.notes:
            warnings.warn(upgrade.message(source), LayoutDeprecationWarning, stacklevel=2)
        raw = upgrade.raw
        try:
            store = raw.get("store")
            if isinstance(store, dict) and isinstance(store.get("redis_url"), str):
                raw = {**raw, "store": {**store, "redis_url": SecretStr(store["redis_url"])}}
            return cls(**raw).with_paths_resolved((base_dir or Path.cwd()).absolute())
        except ValidationError as exc:
            problems = validation_problems(exc, renamed=upgrade.renamed)
            raise ConfigError(
                f"{source}: invalid configuration\n" + format_problems(problems), problems
            ) from None

    @classmethod
    def from_scenario(
        cls,
        scenario: Layout,
        *,
        source: str = "<config>",
        base_dir: Path | None = None,
        **service_only: Any,
    ) -> ServiceConfig:
        """The service that serves `scenario`'s queues, routing policy and allocation with its
        guardrails, exactly as the scenario states them (its service-time and model-load models,
        workload and SLO tables stay behind: the service measures what it runs).

        `service_only` holds what a scenario does not describe, as in a config file: `store`,
        `handlers`, `worker`, `health`, and the service's own keys of `routing` (batch_size) and
        `allocation` (idle_tick_s); `queues`, or any layout key of routing or allocation, is
        refused, since the scenario gives them. Relative paths in it are relative to `base_dir`
        (the config file's directory). ConfigError names `source` and the bad field.
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
        return cls.from_mapping(raw, source=source, base_dir=base_dir)


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
