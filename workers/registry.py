"""The handler registry: which model loader and run function serve each job type.

A handler is registered under a job type with a `loader` (builds the model once per worker; the
worker measures how long it takes and reports it as the queue's model-load cost) and either `run`
(one payload at a time) or `run_batch` (a list of payloads in one call, for batched inference).

    REGISTRY.register("echo", loader=lambda: None, run=lambda model, payload: payload)

    @REGISTRY.handler("upper", max_batch=32)
    class Upper:                      # a class: constructing it is the load; call methods run
        def __init__(self) -> None: ...
        def run_batch(self, payloads: list[str]) -> list[str]: ...

    @REGISTRY.handler("double", loader=make_table)
    def double(model: Table, payload: int) -> int: ...   # a function: it is `run`

    # retries per job type: a job's own max_retries wins, then the handler's, then
    # Settings.max_retries; only the exceptions listed are retried (PayloadError never is)
    @REGISTRY.handler("embed", loader=load_encoder, max_retries=5, retry_backoff_s=2.0,
                      retryable=(TimeoutError, ConnectionError))
    def embed(model: Encoder, payload: str) -> list[float]: ...

Modules named under `handlers:` in the service configuration register into `REGISTRY` when
imported (`load_handler_modules`); workers import the same modules, so every process agrees.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar, overload, runtime_checkable

M = TypeVar("M")
C = TypeVar("C")
F = TypeVar("F", bound=Callable[..., Any])


class PayloadError(ValueError):
    """The payload cannot be served by this handler (wrong shape or values); raise it from `run`.

    Retrying cannot help, so the worker dead-letters the job at once instead of retrying it.
    """


@dataclass(frozen=True, slots=True)
class Resources:
    """What one worker serving this job type reserves in Ray."""

    # None: the service's WorkerConfig.num_cpus.
    num_cpus: float | None = None
    # Fraction of one GPU (Ray's num_gpus); 0 for CPU-only models.
    gpu_fraction: float = 0.0
    # Ray's memory reservation; None reserves none.
    memory_mb: int | None = None

    def __post_init__(self) -> None:
        if self.num_cpus is not None and self.num_cpus < 0:
            raise ValueError(f"num_cpus must be >= 0, got {self.num_cpus}")
        if self.gpu_fraction < 0.0:
            raise ValueError(f"gpu_fraction must be >= 0, got {self.gpu_fraction}")
        if self.memory_mb is not None and self.memory_mb <= 0:
            raise ValueError(f"memory_mb must be > 0, got {self.memory_mb}")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How the failures of one job type are retried. None fields fall back: `max_retries` to the
    record's budget (the job's own, else the submitting client's Settings.max_retries; a job that
    set its own always keeps it), the backoff fields to the worker's Settings."""

    max_retries: int | None = None
    # The first retry's delay in seconds (doubling per attempt), and its cap.
    backoff_s: float | None = None
    backoff_max_s: float | None = None
    # Exception types worth retrying (subclasses included); None: every exception. PayloadError
    # is never retried, whatever this says.
    retryable: tuple[type[BaseException], ...] | None = None

    def __post_init__(self) -> None:
        if self.max_retries is not None and not (
            isinstance(self.max_retries, int) and 0 <= self.max_retries <= _MAX_RETRIES
        ):
            raise ValueError(
                f"max_retries must be an int in 0..{_MAX_RETRIES}, got {self.max_retries!r}"
            )
        for name in ("backoff_s", "backoff_max_s"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int | float) and 0 <= value < 1e9):
                raise ValueError(f"retry_{name} must be a number of seconds >= 0, got {value!r}")
        if self.retryable is not None:
            bad = [
                t
                for t in self.retryable
                if not (isinstance(t, type) and issubclass(t, BaseException))
            ]
            if not isinstance(self.retryable, tuple) or bad:
                raise ValueError(
                    f"retryable must be a tuple of exception classes, got {self.retryable!r}"
                )

    def retries(self, exc: BaseException) -> bool:
        """Whether a failure raising `exc` may be retried."""
        if isinstance(exc, PayloadError):
            return False
        return self.retryable is None or isinstance(exc, self.retryable)

    def max_retries_for(self, job_max_retries: int | None) -> int | None:
        """The budget to apply in place of the record's: this policy's, unless the job set its
        own (then None: the record holds the job's)."""
        return self.max_retries if job_max_retries is None else None


# JobOptions.max_retries's bound.
_MAX_RETRIES = 100
_NO_POLICY = RetryPolicy()


@dataclass(frozen=True, slots=True)
class Handler(Generic[M]):
    """How to serve one job type: load a model of type M, then run payloads through it."""

    job_type: str
    loader: Callable[[], M]
    run_batch: Callable[[M, list[Any]], list[Any]]
    # Most payloads per run_batch call; 1 for handlers registered with `run`.
    max_batch: int
    # How long a worker waits for more jobs to fill a batch once it has at least one.
    batch_wait_ms: float
    resources: Resources
    # True when registered with `run_batch` (a batch is one call), False for `run`.
    batched: bool
    # How its failures are retried.
    retry: RetryPolicy = _NO_POLICY


@runtime_checkable
class _BatchModel(Protocol):
    def run_batch(self, payloads: list[Any]) -> list[Any]: ...


@runtime_checkable
class _SingleModel(Protocol):
    def run(self, payload: Any) -> Any: ...


class HandlerRegistry:
    """Job type → Handler. Registering a job type twice is an error (two modules disagree)."""

    def __init__(self) -> None:
        self._handlers: dict[str, Handler[Any]] = {}

    def register(
        self,
        job_type: str,
        *,
        loader: Callable[[], M],
        run: Callable[[M, Any], Any] | None = None,
        run_batch: Callable[[M, list[Any]], list[Any]] | None = None,
        max_batch: int = 1,
        batch_wait_ms: float = 0.0,
        resources: Resources = Resources(),
        max_retries: int | None = None,
        retry_backoff_s: float | None = None,
        retry_backoff_max_s: float | None = None,
        retryable: tuple[type[BaseException], ...] | None = None,
    ) -> Handler[M]:
        """Register a handler; exactly one of `run` and `run_batch` must be given. The retry
        options make the job type's RetryPolicy (ValueError naming a bad one)."""
        if not job_type or job_type != job_type.strip():
            raise ValueError(f"job type {job_type!r} must be non-empty without outer spaces")
        if job_type in self._handlers:
            raise ValueError(f"job type {job_type!r} is already registered")
        if (run is None) == (run_batch is None):
            raise ValueError(f"{job_type}: give exactly one of run= and run_batch=")
        if max_batch < 1:
            raise ValueError(f"{job_type}: max_batch must be >= 1, got {max_batch}")
        if batch_wait_ms < 0:
            raise ValueError(f"{job_type}: batch_wait_ms must be >= 0, got {batch_wait_ms}")
        try:
            retry = RetryPolicy(max_retries, retry_backoff_s, retry_backoff_max_s, retryable)
        except ValueError as exc:
            raise ValueError(f"{job_type}: {exc}") from None
        if run is not None:
            if max_batch != 1:
                raise ValueError(f"{job_type}: max_batch > 1 needs run_batch=, not run=")
            single = run

            def batch_of_one(model: M, payloads: list[Any]) -> list[Any]:
                return [single(model, p) for p in payloads]

            run_batch = batch_of_one
        assert run_batch is not None
        handler = Handler(
            job_type=job_type,
            loader=loader,
            run_batch=run_batch,
            max_batch=max_batch,
            batch_wait_ms=batch_wait_ms,
            resources=resources,
            batched=run is None,
            retry=retry,
        )
        self._handlers[job_type] = handler
        return handler

    @overload
    def handler(
        self,
        job_type: str,
        *,
        loader: None = None,
        max_batch: int = 1,
        batch_wait_ms: float = 0.0,
        resources: Resources = Resources(),
        max_retries: int | None = None,
        retry_backoff_s: float | None = None,
        retry_backoff_max_s: float | None = None,
        retryable: tuple[type[BaseException], ...] | None = None,
    ) -> Callable[[type[C]], type[C]]: ...

    @overload
    def handler(
        self,
        job_type: str,
        *,
        loader: Callable[[], Any],
        max_batch: int = 1,
        batch_wait_ms: float = 0.0,
        resources: Resources = Resources(),
        max_retries: int | None = None,
        retry_backoff_s: float | None = None,
        retry_backoff_max_s: float | None = None,
        retryable: tuple[type[BaseException], ...] | None = None,
    ) -> Callable[[F], F]: ...

    def handler(
        self,
        job_type: str,
        *,
        loader: Callable[[], Any] | None = None,
        max_batch: int = 1,
        batch_wait_ms: float = 0.0,
        resources: Resources = Resources(),
        max_retries: int | None = None,
        retry_backoff_s: float | None = None,
        retry_backoff_max_s: float | None = None,
        retryable: tuple[type[BaseException], ...] | None = None,
    ) -> Callable[[Any], Any]:
        """Decorator form of `register`.

        Without `loader`: decorates a class whose no-argument constructor loads the model and whose
        `run_batch(payloads)` (or `run(payload)`) serves it. With `loader`: decorates the run
        function `(model, payload) -> result`, or `(model, payloads) -> results` when
        max_batch > 1. The decorated object is returned unchanged. The retry options are
        `register`'s.
        """
        retry_options: dict[str, Any] = {
            "max_retries": max_retries,
            "retry_backoff_s": retry_backoff_s,
            "retry_backoff_max_s": retry_backoff_max_s,
            "retryable": retryable,
        }

        def decorate(target: Any) -> Any:
            if loader is None:
                if not isinstance(target, type):
                    raise TypeError(
                        f"{job_type}: without loader=, decorate a class (got {target!r})"
                    )
                if callable(getattr(target, "run_batch", None)):
                    self.register(
                        job_type,
                        loader=target,
                        run_batch=_call_run_batch,
                        max_batch=max_batch,
                        batch_wait_ms=batch_wait_ms,
                        resources=resources,
                        **retry_options,
                    )
                elif callable(getattr(target, "run", None)):
                    self.register(
                        job_type,
                        loader=target,
                        run=_call_run,
                        max_batch=max_batch,
                        batch_wait_ms=batch_wait_ms,
                        resources=resources,
                        **retry_options,
                    )
                else:
                    raise TypeError(f"{job_type}: class {target.__name__} has no run or run_batch")
            elif max_batch > 1:
                self.register(
                    job_type,
                    loader=loader,
                    run_batch=target,
                    max_batch=max_batch,
                    batch_wait_ms=batch_wait_ms,
                    resources=resources,
                    **retry_options,
                )
            else:
                self.register(
                    job_type, loader=loader, run=target, batch_wait_ms=batch_wait_ms,
                    resources=resources, **retry_options,
                )  # fmt: skip
            return target

        return decorate

    def get(self, job_type: str) -> Handler[Any]:
        """The handler of `job_type`; KeyError naming the registered types when there is none."""
        try:
            return self._handlers[job_type]
        except KeyError:
            known = ", ".join(sorted(self._handlers)) or "none"
            raise KeyError(
                f"no handler for job type {job_type!r} (registered: {known}); "
                f"is its module listed under `handlers:`?"
            ) from None

    def __contains__(self, job_type: object) -> bool:
        return job_type in self._handlers

    def job_types(self) -> list[str]:
        return sorted(self._handlers)

    def resources_for(self, job_types: Iterable[str], default_num_cpus: float) -> Resources:
        """What a worker serving all of `job_types` must reserve: the largest need of each kind."""
        handlers = [self.get(t) for t in job_types]
        cpus = [h.resources.num_cpus for h in handlers if h.resources.num_cpus is not None]
        mems = [h.resources.memory_mb for h in handlers if h.resources.memory_mb is not None]
        return Resources(
            num_cpus=max(cpus, default=default_num_cpus),
            gpu_fraction=max((h.resources.gpu_fraction for h in handlers), default=0.0),
            memory_mb=max(mems) if mems else None,
        )


def _call_run_batch(model: _BatchModel, payloads: list[Any]) -> list[Any]:
    return model.run_batch(payloads)


def _call_run(model: _SingleModel, payload: Any) -> Any:
    return model.run(payload)


REGISTRY = HandlerRegistry()


class HandlerModuleError(ImportError):
    """A module listed under `handlers:` could not be imported; names the module and the cause."""


def load_handler_modules(
    modules: Iterable[str], registry: HandlerRegistry = REGISTRY
) -> HandlerRegistry:
    """Import each module (which registers its handlers into REGISTRY) and return `registry`."""
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as exc:
            raise HandlerModuleError(
                f"handler module {name!r} failed to import: {type(exc).__name__}: {exc}"
            ) from exc
    return registry


__all__ = [
    "REGISTRY",
    "Handler",
    "HandlerModuleError",
    "HandlerRegistry",
    "PayloadError",
    "Resources",
    "RetryPolicy",
    "load_handler_modules",
]
