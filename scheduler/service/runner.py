"""Start and stop the service from Python: the API `bilevel serve`, `make demo` and tests share.

    config = ServiceConfig.load("deploy/service.yaml")
    with start_service(config) as service:          # Ray and (if no URL) an embedded Redis
        with Client(service.redis_url, settings=config.store) as client:
            print(client.submit("embed", {"text": "hi"}).result(timeout=30))

`start_service` starts the router and the controller in one named, detached Ray actor (a
ControlPlane; each role keeps its own leader lock). The name is scoped by namespace
(``bilevel:<namespace>:control``); when it is taken (another `serve` of the same namespace runs)
the new actor gets a standby name and its roles wait for the leader locks.

The config's runtime_env (with the handler code's directory as working_dir by default, see
scheduler/service/handler_code.py) is the runtime_env of the Ray job `ensure_ray` starts:
`ray.init(runtime_env=...)`. Ray uploads a local working_dir or py_modules only there (per job;
per actor or task it takes URIs only), and every actor and task of the job inherits it, including
the detached control plane and the model workers the control plane creates, on every node.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from pydantic import SecretStr
from redis.exceptions import RedisError

from scheduler.config import ServiceConfig
from scheduler.connection import client_from_url, parse_address
from scheduler.embedded_redis import EmbeddedRedis
from scheduler.errors import BilevelError
from scheduler.keys import Keys
from scheduler.logs import get_logger
from scheduler.service.actors import (
    DEFAULT_LEADER_TTL_S,
    ROLES,
    PoolFactory,
    Role,
    control_plane_actor_class,
)
from scheduler.service.handler_code import (
    HandlerCode,
    ImportCheck,
    RuntimeEnvError,
    needs_job_level,
    prepare_handler_code,
    runtime_env_refused,
)
from scheduler.service.health import RoleHealth, read_health
from scheduler.service.observe import ObserveServer, start_observe
from scheduler.service.policies import load_policies
from scheduler.settings import Settings

log = get_logger("bilevel.service")

# The Ray namespace of the service's named actors: every `serve` must use the same one, or a second
# serve would not see the first one's actor names (and the Redis namespace scopes the names within).
RAY_NAMESPACE = "bilevel"

# How long stop() waits for a role to drain (the controller's pool finishing its leased jobs).
STOP_TIMEOUT_S = 60.0


class RayUnavailable(BilevelError):
    """Ray could not be started or joined; names where, and Ray's own reason in one line."""

    def __init__(self, where: str, exc: BaseException) -> None:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        super().__init__(f"Ray: {where}: {reason}")


# The runtime_env ensure_ray started this process's Ray job with (None: none, or Ray was
# initialised by someone else): a later start_service with the same one needs nothing more.
_job_runtime_env: dict[str, Any] | None = None


def ensure_ray(
    *,
    address: str | None = None,
    runtime_env: dict[str, Any] | None = None,
    log_to_driver: bool = True,
) -> bool:
    """Connect to Ray unless connected: to `address` when one is given ("auto" for a cluster
    started on this machine by `ray start`, or host:port), else to RAY_ADDRESS when set (Ray's own
    convention), else a new local Ray in its own temp dir (short, under /tmp, since Ray's socket
    paths have a length cap). Joining a cluster is never a guess: `auto` finds whichever cluster
    this machine last started, which on a shared machine may be somebody else's. A caller that
    initialised Ray itself keeps its namespace (tests do), and its job's runtime_env.

    `runtime_env` becomes the job's (Ray uploads its local directories here); `log_to_driver`
    False keeps the actors' log lines out of this process's stderr. Returns True when
    this call connected, False when Ray already was. When Ray refuses the runtime_env, RuntimeEnvError
    names the field and Ray is shut down again."""
    global _job_runtime_env
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    options: dict[str, Any] = {
        "namespace": RAY_NAMESPACE,
        "configure_logging": False,
        "log_to_driver": log_to_driver,
    }
    if runtime_env:
        options["runtime_env"] = runtime_env
    if address != "local":
        options["address"] = address
    else:
        options |= {
            "_temp_dir": tempfile.mkdtemp(prefix="blray", dir="/tmp"),
            "include_dashboard": False,
        }
    where = (
        f"could not join the cluster at {address}"
        if address != "local"
        else f"could not start a local Ray (temp dir {options['_temp_dir']})"
    )
    try:
        ray.init(**options)
    except (ValueError, TypeError, ray.exceptions.RuntimeEnvSetupError) as exc:
        # Raised by the upload or validation of the runtime_env; anything else (a cluster that
        # cannot be reached) is not about it.
        ray.shutdown()
        if not runtime_env:
            raise RayUnavailable(where, exc) from None
        raise runtime_env_refused(runtime_env, exc) from None
    except (ConnectionError, TimeoutError, RuntimeError) as exc:
        ray.shutdown()
        raise RayUnavailable(where, exc) from None
    except Exception as exc:
        # Ray raises a bare Exception when its node does not come up in time (an overloaded
        # machine): one line naming it, not a traceback through Ray's internals.
        if type(exc) is not Exception:
            raise
        ray.shutdown()
        raise RayUnavailable(where, exc) from None
    _job_runtime_env = runtime_env
    return True


def actor_name(namespace: str) -> str:
    """The primary control-plane actor name for a namespace."""
    return f"bilevel:{namespace}:control"


def _free_name(namespace: str) -> str:
    """The primary name if free, else a unique standby name."""
    import ray

    name = actor_name(namespace)
    try:
        ray.get_actor(name)
    except ValueError:
        return name
    return f"{name}:standby-{secrets.token_hex(3)}"


@dataclass
class ServiceHandle:
    """A running service (this process's control-plane actor). `stop()` ends it; also a context
    manager."""

    config: ServiceConfig
    redis_url: str
    actor: Any
    name: str
    embedded: EmbeddedRedis | None = None
    stopped: bool = field(default=False)
    # The role hosts of the namespace that already ran when this service started (so this one
    # stands by for them); empty when it started as the leader.
    standby_of: tuple[str, ...] = ()
    # Handler module not installed -> the file a Ray worker imported it from (checked at start).
    handler_files: dict[str, str] = field(default_factory=dict)
    # The metrics and dashboard server (config.metrics), when enabled.
    observe: ObserveServer | None = None

    @property
    def metrics_url(self) -> str | None:
        """http://host:port of /metrics and the dashboard, or None when metrics are disabled."""
        return self.observe.url if self.observe is not None else None

    @property
    def namespace(self) -> str:
        return self.config.store.namespace

    @property
    def where(self) -> str:
        """The service's Redis as errors name it: host and port, never a secret."""
        return str(parse_address(self.redis_url))

    def status(self, timeout_s: float = 10.0) -> dict[Role, dict[str, Any]]:
        """Each role's status (see RoleHost.status); a dead actor shows as {"alive": False}."""
        import ray

        try:
            statuses: dict[Role, dict[str, Any]] = ray.get(
                self.actor.status.remote(), timeout=timeout_s
            )
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            return {r: {"alive": False, "role": r, "name": f"{self.name}/{r}"} for r in ROLES}
        return {role: {"alive": True, **s} for role, s in statuses.items()}

    def leading(self) -> dict[Role, bool]:
        return {role: bool(s.get("leading")) for role, s in self.status().items()}

    def wait_leading(self, timeout_s: float = 30.0) -> bool:
        """Block until both of this handle's roles lead; False if they do not within the timeout."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if all(self.leading().values()):
                return True
            time.sleep(0.1)
        return False

    def pool_view(self) -> dict[str, Any] | None:
        """The controller's last pool view (when it leads)."""
        import ray

        view: dict[str, Any] | None = ray.get(self.actor.pool_view.remote(), timeout=10)
        return view

    def stop(self, *, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Stop routing, then drain and stop the pool, then end the actor (and an embedded Redis).
        Jobs not yet routed stay in the ingress for the next service."""
        import ray

        if self.stopped:
            return
        self.stopped = True
        if self.observe is not None:
            self.observe.stop()
            self.observe = None
        if self.actor is not None:
            # RayError: also an actor that never came up (its runtime_env failed to set up).
            with contextlib.suppress(ray.exceptions.RayError):
                ray.get(self.actor.stop.remote(), timeout=timeout_s)
            with contextlib.suppress(ray.exceptions.RayActorError, ValueError):
                ray.kill(self.actor, no_restart=True)
        if self.embedded is not None:
            self.embedded.stop()
            self.embedded = None
        log.info("service_stopped", namespace=self.namespace)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def resolve_redis(config: ServiceConfig, redis_url: str | None) -> tuple[str, EmbeddedRedis | None]:
    """The Redis URL to use: the argument, else the config's (BILEVEL_REDIS_URL included), else a
    new embedded server owned by the caller (returned so the caller stops it)."""
    url = redis_url or config.store.url()
    if url is not None:
        return url, None
    embedded = EmbeddedRedis(appendfsync=config.store.appendfsync).start()
    return embedded.url, embedded


def live_role_hosts(settings: Settings) -> list[RoleHealth]:
    """The role hosts that published a live health record for `settings`' namespace (any
    machine, any Ray cluster: what they share is the Redis). Empty when Redis cannot be read."""

    async def read() -> list[RoleHealth]:
        url = settings.url()
        assert url is not None
        redis = client_from_url(url)
        try:
            records = await read_health(redis, Keys(settings.namespace))
        finally:
            await redis.aclose()
        now_s = time.time()
        return [r for r in records if r.state(now_s) != "gone"]

    try:
        return asyncio.run(read())
    except (RedisError, OSError, BilevelError):
        return []


def start_service(
    config: ServiceConfig,
    *,
    redis_url: str | None = None,
    leader_ttl_s: float = DEFAULT_LEADER_TTL_S,
    ray_address: str | None = None,
    wait_s: float | None = 30.0,
    pool_factory: PoolFactory | None = None,
    handler_code: HandlerCode | None = None,
) -> ServiceHandle:
    """Start the control-plane actor (router and controller) for `config`; return its handle.

    Locates the handler code (see handler_code.prepare_handler_code, or pass what it returned),
    connects to Ray with the runtime_env (see ensure_ray) and, when there is one, checks that a
    Ray worker with it imports the handler modules; then Redis (see resolve_redis) and the actor.
    With `wait_s` it waits that long for both roles to lead, unless another service of the
    namespace already runs (then this actor's roles are standbys and it returns at once). When a
    step fails, what the earlier ones started is stopped (Ray too, if this call started it).
    """
    import ray

    # Checked and loaded first: a bad policy or checkpoint fails the start, naming the field.
    policies = load_policies(config)
    code = handler_code or prepare_handler_code(config, cwd=Path.cwd())
    config = code.config
    started_ray = ensure_ray(address=ray_address, runtime_env=code.runtime_env)
    handle: ServiceHandle | None = None
    embedded: EmbeddedRedis | None = None
    check: ImportCheck | None = None
    try:
        actor_env = _actor_runtime_env(code, started_ray)
        if code.runtime_env is not None:
            # Ray sets the environment up for this task while Redis and the actor start.
            check = ImportCheck.start(code, runtime_env=actor_env)
        url, embedded = resolve_redis(config, redis_url)
        config = config.model_copy(
            update={"store": config.store.model_copy(update={"redis_url": SecretStr(url)})}
        )
        name = _free_name(config.store.namespace)
        options: dict[str, Any] = {"name": name, "lifetime": "detached"}
        if actor_env is not None:
            options["runtime_env"] = actor_env
        handle = ServiceHandle(config, url, None, name, embedded)
        handle.observe = start_observe(config, url)
        handle.actor = (
            control_plane_actor_class()
            .options(**options)
            .remote(
                config,
                redis_url=url,
                name=name,
                leader_ttl_s=leader_ttl_s,
                pool_factory=pool_factory,
                policies=policies,
            )
        )
        handle.standby_of = tuple(r.name for r in live_role_hosts(config.store) if r.leading)
        if check is not None:
            where = check.result()
            log.info("handler_code_checked", modules=where)
            handle.handler_files = {m: f for m, f in where.items() if m in code.local_modules}
        ray.get(handle.actor.start.remote(), timeout=60)
    except BaseException:
        if check is not None:
            check.cancel()
        if handle is not None:
            handle.stop(timeout_s=5.0)
        elif embedded is not None:
            embedded.stop()
        if started_ray:
            ray.shutdown()
        raise
    standby = bool(handle.standby_of) or name != actor_name(config.store.namespace)
    if wait_s is not None and not standby:
        handle.wait_leading(wait_s)
    log.info("service_started", namespace=config.store.namespace, actor=name)
    return handle


def _actor_runtime_env(code: HandlerCode, started_ray: bool) -> dict[str, Any] | None:
    """The runtime_env to give the service's first actor and task itself: None when the Ray job
    has it (ensure_ray started the job with it); else the service's own, which Ray takes per actor
    only without local paths to upload (RuntimeEnvError naming the field otherwise)."""
    env = code.runtime_env
    if env is None or started_ray or env == _job_runtime_env:
        return None
    field = needs_job_level(env)
    if field is not None:
        raise RuntimeEnvError(
            f"runtime_env.{field}: Ray was initialised before the service started, and Ray "
            "uploads a local directory or file only when its job starts (ray.init): let the "
            "service start Ray, or give ray.init this runtime_env yourself"
        )
    return env


__all__ = [
    "ServiceHandle",
    "actor_name",
    "ensure_ray",
    "resolve_redis",
    "start_service",
]
