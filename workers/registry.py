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
imported (`load_handler_modules`); workers import the same modules, so every process agrees. How the
workers of a cluster get modules that are not installed there: scheduler/service/handler_code.py.

Streaming handlers. A handler whose run function is a generator yields chunks (tokens of an LLM,
progress records) that clients read as they come (`for chunk in handle.stream()`), while
`result()` still gives one final result:

    @REGISTRY.handler("generate", loader=load_model)
    def generate(model: Model, payload: dict) -> Iterator[str]:   # a generator: it streams
        text = ""
        for token in model.tokens(payload["prompt"]):
            text += token
            yield token                   # each chunk: any JSON value
        return text                       # the final result (optional, see below)

    @REGISTRY.handler("frames", loader=load_model, stream=True)
    def frames(model: Model, payload: dict) -> Iterator[dict]:
        return model.frame_iterator(payload)      # not a generator, returns one: say stream=True

    @REGISTRY.handler("chat")
    class Chat:                       # a class with run_stream(payload) streams
        def __init__(self) -> None: ...
        def run_stream(self, payload: dict) -> Iterator[str]: ...

    REGISTRY.register("echo_words", loader=lambda: None, run_stream=lambda m, p: iter(p.split()))

The final result of a streaming job, what `result()` returns, is the generator's return value
(StopIteration.value); a generator that returns nothing (None) has the list of every chunk it
yielded as its result, so a caller that never streams gets the whole output, as OpenAI's API gives
the whole completion without `stream=True`. (Ray Serve drops a streaming deployment's return
value; here it is kept because the result is what non-streaming callers of the same job type
read.) A streaming handler runs one job per call (max_batch 1), on the worker's handler thread;
the worker stops pulling from the generator and closes it (GeneratorExit at its `yield`, so its
`finally` runs) when the job is cancelled, times out, or the worker loses its lease or drains.
Async generators are refused: handlers run on a thread, not on the worker's event loop.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
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
    # For a streaming handler: (model, payload) -> iterator of JSON chunks, whose return value is
    # the result (see the module docstring); then run_batch drains it (no streaming), for callers
    # that only want results.
    run_stream: Callable[[M, Any], Iterable[Any]] | None = None

    @property
    def streaming(self) -> bool:
        """True when jobs of this type stream chunks (registered with a generator)."""
        return self.run_stream is not None


@runtime_checkable
class _BatchModel(Protocol):
    def run_batch(self, payloads: list[Any]) -> list[Any]: ...


@runtime_checkable
class _SingleModel(Protocol):
    def run(self, payload: Any) -> Any: ...


@runtime_checkable
class _StreamModel(Protocol):
    def run_stream(self, payload: Any) -> Iterable[Any]: ...


def stream_chunks(produced: Any, job_type: str) -> Iterable[Any]:
    """What a streaming run function returned, as an iterable of chunks; TypeError naming the job
    type when it is not an iterator or a collection of chunks (a str, bytes or dict would be
    streamed piece by piece, which no handler means)."""
    if isinstance(produced, (str, bytes, bytearray, dict)) or not isinstance(produced, Iterable):
        raise TypeError(
            f"{job_type}: a streaming handler must return an iterator or generator of JSON "
            f"chunks, got {type(produced).__name__}"
        )
    return produced


def collect_stream(produced: Iterable[Any]) -> Any:
    """Run a stream to its end without streaming: the generator's return value, or the list of
    its chunks when it returns None (the rule of the module docstring)."""
    iterator = iter(produced)
    chunks: list[Any] = []
    while True:
        try:
            chunks.append(next(iterator))
        except StopIteration as stop:
            return chunks if stop.value is None else stop.value


def _is_async(fn: Callable[..., Any]) -> bool:
    return inspect.isasyncgenfunction(fn) or inspect.iscoroutinefunction(fn)


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
        run_stream: Callable[[M, Any], Iterable[Any]] | None = None,
        max_retries: int | None = None,
        retry_backoff_s: float | None = None,
        retry_backoff_max_s: float | None = None,
        retryable: tuple[type[BaseException], ...] | None = None,
    ) -> Handler[M]:
        """Register a handler; exactly one of `run`, `run_batch` and `run_stream` must be given.
        A `run` that is a generator function streams: it is taken as `run_stream`. The retry
        options make the job type's RetryPolicy (ValueError naming a bad one)."""
        if not job_type or job_type != job_type.strip():
            raise ValueError(f"job type {job_type!r} must be non-empty without outer spaces")
        if job_type in self._handlers:
            raise ValueError(f"job type {job_type!r} is already registered")
        try:
            retry = RetryPolicy(max_retries, retry_backoff_s, retry_backoff_max_s, retryable)
        except ValueError as exc:
            raise ValueError(f"{job_type}: {exc}") from None
        if run is not None and run_stream is None and inspect.isgeneratorfunction(run):
            run, run_stream = None, run
        if run_stream is not None:
            return self._register_stream(
                job_type, loader, run_stream, run, run_batch, max_batch, resources, retry
            )
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
            retry=retry,
        )
        self._handlers[job_type] = handler
        return handler

    def _register_stream(
        self,
        job_type: str,
        loader: Callable[[], M],
        run_stream: Callable[[M, Any], Iterable[Any]],
        run: Callable[[M, Any], Any] | None,
        run_batch: Callable[[M, list[Any]], list[Any]] | None,
        max_batch: int,
        resources: Resources,
        retry: RetryPolicy,
    ) -> Handler[M]:
        if run is not None or run_batch is not None:
            raise ValueError(f"{job_type}: give exactly one of run=, run_batch= and run_stream=")
        if max_batch != 1:
            raise ValueError(
                f"{job_type}: a streaming handler runs one job per call; max_batch must be 1, "
                f"got {max_batch}"
            )
        if _is_async(run_stream):
            raise TypeError(
                f"{job_type}: run_stream is an async function; handlers run on a thread, so "
                "give a plain generator (def ... yield) instead"
            )
        stream = run_stream

        def drain_each(model: M, payloads: list[Any]) -> list[Any]:
            return [collect_stream(stream_chunks(stream(model, p), job_type)) for p in payloads]

        handler = Handler(
            job_type=job_type,
            loader=loader,
            run_batch=drain_each,
            max_batch=1,
            batch_wait_ms=0.0,
            resources=resources,
            batched=False,
            retry=retry,
            run_stream=run_stream,
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
        stream: bool = False,
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
        stream: bool = False,
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
        stream: bool = False,
        max_retries: int | None = None,
        retry_backoff_s: float | None = None,
        retry_backoff_max_s: float | None = None,
        retryable: tuple[type[BaseException], ...] | None = None,
    ) -> Callable[[Any], Any]:
        """Decorator form of `register`.

        Without `loader`: decorates a class whose no-argument constructor loads the model and whose
        `run_batch(payloads)` (or `run_stream(payload)`, or `run(payload)`) serves it. With
        `loader`: decorates the run function `(model, payload) -> result`, or
        `(model, payloads) -> results` when max_batch > 1. A generator function (or a class's
        generator `run`) streams, as does any run function with `stream=True` (one that returns an
        iterator). The decorated object is returned unchanged. The retry options are
        `register`'s.
        """
        retry_options: dict[str, Any] = {
            "max_retries": max_retries,
            "retry_backoff_s": retry_backoff_s,
            "retry_backoff_max_s": retry_backoff_max_s,
            "retryable": retryable,
        }

        def decorate(target: Any) -> Any:
            if stream or _streams(target):
                self.register(
                    job_type,
                    loader=target if loader is None else loader,
                    run_stream=_stream_of(job_type, target, loader is None),
                    max_batch=max_batch,
                    resources=resources,
                    **retry_options,
                )
                return target
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
                    raise TypeError(
                        f"{job_type}: class {target.__name__} has no run or run_batch "
                        "(or run_stream)"
                    )
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


def _call_run_stream(model: _StreamModel, payload: Any) -> Iterable[Any]:
    return model.run_stream(payload)


def _call_run_as_stream(model: _SingleModel, payload: Any) -> Iterable[Any]:
    produced: Iterable[Any] = model.run(payload)
    return produced


def _streams(target: Any) -> bool:
    """Whether a decorated function or class streams without being told: a generator function, or
    a class with run_stream, or whose run is a generator (and which has no run_batch)."""
    if not isinstance(target, type):
        return callable(target) and inspect.isgeneratorfunction(target)
    if callable(getattr(target, "run_batch", None)):
        return False
    run = getattr(target, "run", None)
    return callable(getattr(target, "run_stream", None)) or (
        callable(run) and inspect.isgeneratorfunction(run)
    )


def _stream_of(job_type: str, target: Any, is_class: bool) -> Callable[[Any, Any], Iterable[Any]]:
    """The run_stream of a decorated streaming function or class."""
    if not is_class:
        if not callable(target):
            raise TypeError(f"{job_type}: decorate a run function (got {target!r})")
        fn: Callable[[Any, Any], Iterable[Any]] = target
        return fn
    if not isinstance(target, type):
        raise TypeError(f"{job_type}: without loader=, decorate a class (got {target!r})")
    if callable(getattr(target, "run_stream", None)):
        return _call_run_stream
    if callable(getattr(target, "run", None)):
        return _call_run_as_stream
    raise TypeError(f"{job_type}: class {target.__name__} has no run_stream or run")


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
    "RetryPolicy",
    "collect_stream",
    "load_handler_modules",
    "stream_chunks",
]
