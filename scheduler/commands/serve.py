"""`bilevel serve --config FILE`: run the router and controller on Ray until Ctrl-C or SIGTERM.

`bilevel serve --scenario FILE [--config FILE]` serves a scenario's queues, routing policy and
allocation with its guardrails, as the simulator runs them; the config file then gives only what a
scenario does not describe (store, handlers, worker, health, routing.batch_size,
allocation.idle_tick_s), and may not repeat what the scenario gives.

Every check that can fail on a bad file runs before Ray starts: the config (errors name the field),
the handler modules (errors name the module and where it was looked for), the runtime_env (errors
name the field; a working_dir too large for Ray to upload names its largest entries) and that
every queue's job types have a handler (errors name the queue index and the job type). What only
Ray can judge (a pip spec it cannot install, a module its workers cannot import) fails the start
once Ray runs, naming the field, with nothing left running. All exit with code 2 and no traceback.

Handler modules not installed on the nodes (found only in the directory serve starts in, or named
by file) are shipped to every node as runtime_env.working_dir (scheduler/service/handler_code.py).
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from scheduler.commands._common import fail, read_scenario
from scheduler.config import ConfigError, ServiceConfig, read_mapping
from scheduler.errors import BilevelError

if TYPE_CHECKING:
    from scheduler.service.actors import Role
    from scheduler.service.handler_code import HandlerCode
    from scheduler.service.runner import ServiceHandle

# Seconds between the status lines serve prints while it runs.
STATUS_EVERY_S = 10.0


def load_config(path: Path | None, scenario_path: Path | None = None) -> ServiceConfig:
    """The validated config: the file at `path`, or the scenario's queues, routing and allocation
    with the service settings of the file at `path` (if any); Exit(2) naming the bad field."""
    if path is None and scenario_path is None:
        raise fail(
            "give --config FILE, or --scenario FILE (and --config FILE for the service's "
            "own settings: store, handlers, worker, health)"
        )
    try:
        if scenario_path is None:
            assert path is not None
            return ServiceConfig.load(path)
        scenario = read_scenario(scenario_path)
        service_only = read_mapping(path) if path is not None else {}
        if scenario.tenants:
            if "tenants" in service_only:
                raise ConfigError(
                    f"{path}: invalid configuration\n  tenants: the scenario gives the tenants: "
                    "leave them out"
                )
            # The scenario's tenant shares are served as the simulator runs them.
            service_only["tenants"] = {k: v.model_dump() for k, v in scenario.tenants.items()}
        return ServiceConfig.from_scenario(
            scenario,
            source=str(path if path is not None else scenario_path),
            base_dir=path.absolute().parent if path is not None else None,
            **service_only,
        )
    except ConfigError as exc:
        raise fail(str(exc)) from None


def with_policies(config: ServiceConfig, policy: str | None, router: str | None) -> ServiceConfig:
    """`config` with --policy and --router in place of its policies (start_service checks them
    first of all, naming the field)."""
    if policy is not None:
        allocation = config.allocation.model_copy(update={"policy": policy, "params": {}})
        config = config.model_copy(update={"allocation": allocation})
    if router is not None:
        routing = config.routing.model_copy(update={"policy": router, "params": {}})
        config = config.model_copy(update={"routing": routing})
    return config


def check_handlers(config: ServiceConfig, *, from_scenario: bool = False) -> HandlerCode:
    """Locate and import the handler modules (module names also from the current directory) and
    check every configured job type has a handler; Exit(2) naming the entry, the runtime_env
    field, or the queue index and job type, otherwise (and, for a scenario's queues, where
    handlers are named: a scenario has none). Returns the handler code to serve."""
    from scheduler.service.handler_code import prepare_handler_code
    from workers.registry import REGISTRY, HandlerModuleError

    try:
        code = prepare_handler_code(config, cwd=Path.cwd())
        code.import_here()
    except ConfigError as exc:
        raise fail(str(exc)) from None
    except HandlerModuleError as exc:
        raise fail(f"handlers: {exc}") from None
    known = set(REGISTRY.job_types())
    for i, queue in enumerate(config.queues):
        for j, job_type in enumerate(queue.job_types):
            if job_type not in known:
                hint = (
                    "; a scenario names no handlers: give --config FILE listing handler modules "
                    "(handlers:) that register its job types"
                    if from_scenario
                    else ""
                )
                raise fail(
                    f"queues.{i}.job_types.{j}: no handler is registered for job type "
                    f"{job_type!r} (queue {queue.name!r}); handler modules "
                    f"{', '.join(code.modules) or '(none)'} register: "
                    f"{', '.join(sorted(known)) or 'nothing'}{hint}"
                )
    return code


def _mode_lines(handle: ServiceHandle) -> list[str]:
    """What kind of deployment this serve is, said once at start: a user who runs serve twice
    must see whether the second joined the first or stands alone."""
    lines = []
    if handle.embedded is not None:
        # The embedded server lives as long as this process; clients need its URL.
        lines.append(
            f"embedded Redis: BILEVEL_REDIS_URL={handle.redis_url} BILEVEL_NAMESPACE="
            f"{handle.namespace} (a deployment of its own: it stops with this process; to add a "
            "standby to a running service instead, start serve with that service's --redis-url)"
        )
    for module, path in handle.handler_files.items():
        lines.append(f"handler module {module}: the workers import {path}")
    if handle.standby_of:
        lines.append(
            f"standing by for {', '.join(handle.standby_of)}, which serves namespace "
            f"{handle.namespace} on this Redis: this service takes over when it stops"
        )
    if handle.observe is not None:
        url = handle.observe.url
        lines.append(f"metrics: {url}/metrics; dashboard: {url}/ (JSON: {url}/api/state)")
        if handle.observe.port_taken:
            port = handle.config.metrics.port
            lines.append(
                f"metrics port {port} is in use (by the service this one stands by for, or "
                f"another program): served on {url} until it is free, then on {port} too"
            )
    return lines


def _warn_if_redis_gone(
    console: Console,
    handle: ServiceHandle,
    statuses: Mapping[Role, dict[str, Any]],
    since: float | None,
) -> float | None:
    """Say plainly, once per outage, that Redis is unreachable (and what that usually means)."""
    failing = [s for s in statuses.values() if s.get("state") == "failing" and s.get("alive", True)]
    if len(failing) < len(statuses):
        if since is not None:
            console.print("Redis is reachable again; serving", highlight=False)
        return None
    if since is None:
        error = (failing[0].get("health") or {}).get("last_error") or "no answer"
        console.print(
            f"Redis at {handle.where} is unreachable ({error}). If it was the embedded Redis of "
            "another `bilevel serve`, that service has stopped. Retrying until it is back; "
            "Ctrl-C stops this service.",
            highlight=False,
        )
        return time.monotonic()
    return since


def _status_line(statuses: Mapping[Role, dict[str, Any]]) -> str:
    parts = []
    for role, s in statuses.items():
        state = s.get("state") or ("standby" if s.get("alive") else "dead")
        if state in ("failing", "stalled", "gone", "dead"):
            error = (s.get("health") or {}).get("last_error")
            state = state.upper() + (f" ({error})" if error else "")
        extra = ""
        if role == "router" and "routed" in s:
            extra = f" routed={s['routed']} rejected={s['rejected']}"
        if role == "controller" and s.get("target"):
            extra = " workers=" + ",".join(f"{q}:{n}" for q, n in s["target"].items())
        parts.append(f"{role} {state}{extra}")
    return "; ".join(parts)


def serve(
    config_path: Annotated[
        Path | None,
        typer.Option(
            "--config",
            help="Service config YAML; with --scenario, only its service settings (store, "
            "handlers, worker, health).",
            show_default=False,
        ),
    ] = None,
    scenario_path: Annotated[
        Path | None,
        typer.Option(
            "--scenario",
            help="Serve this scenario's queues, routing and allocation (with its guardrails).",
            show_default=False,
        ),
    ] = None,
    redis_url: Annotated[
        str | None,
        typer.Option(
            "--redis-url",
            help="Redis URL (default: BILEVEL_REDIS_URL, the config's, or an embedded server).",
        ),
    ] = None,
    ray_address: Annotated[
        str | None,
        typer.Option(
            "--ray-address",
            help="Ray to join: 'auto' (the cluster `ray start` started on this machine) or "
            "HOST:PORT. Default: RAY_ADDRESS if set, else a new local Ray.",
        ),
    ] = None,
    leader_ttl_s: Annotated[
        float,
        typer.Option("--leader-ttl", min=0.1, help="Seconds a leader lock lives unrenewed."),
    ] = 10.0,
    policy: Annotated[
        str | None,
        typer.Option(
            "--policy",
            help="Level 2: an allocator name, 'learned' (the shipped checkpoint) or a checkpoint "
            "path; replaces the config's allocation.policy (and its params).",
        ),
    ] = None,
    router: Annotated[
        str | None,
        typer.Option(
            "--router",
            help="Level 1: a router name, 'learned' or a checkpoint path; replaces the config's "
            "routing.policy (and its params).",
        ),
    ] = None,
) -> None:
    """Run the scheduling service (router + controller on Ray) in the foreground."""
    config = with_policies(load_config(config_path, scenario_path), policy, router)
    code = check_handlers(config, from_scenario=scenario_path is not None)
    from scheduler.service.runner import start_service

    console = Console(stderr=True)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    for line in code.summary():
        console.print(line, highlight=False, soft_wrap=True)
    try:
        handle = start_service(
            code.config,
            redis_url=redis_url,
            leader_ttl_s=leader_ttl_s,
            ray_address=ray_address,
            handler_code=code,
        )
    except ConfigError as exc:
        # A policy, checkpoint or runtime_env the config names: whatever had started is stopped.
        raise fail(str(exc)) from None
    except BilevelError as exc:
        raise fail(str(exc), code=1) from None
    # After ray.init, which installs its own SIGTERM handler: ours must win so the workers drain.
    previous = signal.signal(signal.SIGTERM, on_signal)
    try:
        console.print(
            f"bilevel serving namespace [bold]{handle.namespace}[/] "
            f"(router and controller in actor {handle.name})",
            highlight=False,
        )
        for line in _mode_lines(handle):
            console.print(line, highlight=False, soft_wrap=True)
        last = 0.0
        unreachable_since: float | None = None
        while not stop.is_set():
            if time.monotonic() - last >= STATUS_EVERY_S:
                last = time.monotonic()
                statuses = handle.status(timeout_s=5.0)
                console.print(_status_line(statuses), highlight=False)
                unreachable_since = _warn_if_redis_gone(
                    console, handle, statuses, unreachable_since
                )
            stop.wait(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        console.print("stopping: draining workers...", highlight=False)
        handle.stop()
        signal.signal(signal.SIGTERM, previous)
        console.print("stopped", highlight=False)


def register(app: typer.Typer) -> None:
    """Adds the `serve` command to the CLI."""
    app.command("serve")(serve)
