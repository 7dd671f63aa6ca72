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

Modules named under `handlers:` in the service configuration register into `REGISTRY` when
imported (`load_handler_modules`); workers import the same modules, so every process agrees. How the
workers of a cluster get modules that are not installed there: scheduler/service/handler_code.py.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys
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
    ) -> Handler[M]:
        """Register a handler; exactly one of `run` and `run_batch` must be given."""
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
    ) -> Callable[[F], F]: ...

    def handler(
        self,
        job_type: str,
        *,
        loader: Callable[[], Any] | None = None,
        max_batch: int = 1,
        batch_wait_ms: float = 0.0,
        resources: Resources = Resources(),
    ) -> Callable[[Any], Any]:
        """Decorator form of `register`.

        Without `loader`: decorates a class whose no-argument constructor loads the model and whose
        `run_batch(payloads)` (or `run(payload)`) serves it. With `loader`: decorates the run
        function `(model, payload) -> result`, or `(model, payloads) -> results` when
        max_batch > 1. The decorated object is returned unchanged.
        """

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
                    )
                elif callable(getattr(target, "run", None)):
                    self.register(
                        job_type,
                        loader=target,
                        run=_call_run,
                        max_batch=max_batch,
                        batch_wait_ms=batch_wait_ms,
                        resources=resources,
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
                )
            else:
                self.register(
                    job_type, loader=loader, run=target, batch_wait_ms=batch_wait_ms,
                    resources=resources,
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
    """A module listed under `handlers:` could not be imported; names the module, the cause, and
    where it was looked for."""


def load_handler_modules(
    modules: Iterable[str], registry: HandlerRegistry = REGISTRY
) -> HandlerRegistry:
    """Import each module (which registers its handlers into REGISTRY) and return `registry`."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            missing = exc.name or ""
            if name == missing or name.startswith(missing + "."):
                raise HandlerModuleError(
                    f"handler module {name!r} failed to import: no module {missing!r} on the "
                    f"Python path of this process (searched {_searched()})"
                ) from exc
            raise HandlerModuleError(
                f"handler module {name!r}{_found_at(name)} failed to import: it imports "
                f"{missing!r}, which is not installed here"
            ) from exc
        except Exception as exc:
            raise HandlerModuleError(
                f"handler module {name!r}{_found_at(name)} failed to import: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
    return registry


def _searched() -> str:
    """The directories on sys.path other than the interpreter's own (stdlib, site-packages),
    which `import` also searched: usually the working directory and PYTHONPATH entries."""
    prefixes = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}
    own = [
        os.path.abspath(p or os.curdir)
        for p in sys.path
        if os.path.isdir(p or os.curdir)
        and not any(os.path.realpath(p or os.curdir).startswith(x + os.sep) for x in prefixes)
    ]
    own = list(dict.fromkeys(own))
    where = ", ".join(own) if own else "no directory of its own"
    return f"{where}, and the installed packages; working directory {os.getcwd()}"


def _found_at(name: str) -> str:
    module = sys.modules.get(name)
    path = getattr(module, "__file__", None)
    if path is None:
        with contextlib.suppress(ImportError, ValueError):
            spec = importlib.util.find_spec(name)
            path = spec.origin if spec is not None else None
    return f" ({path})" if path else ""


__all__ = [
    "REGISTRY",
    "Handler",
    "HandlerModuleError",
    "HandlerRegistry",
    "PayloadError",
    "Resources",
    "load_handler_modules",
]
