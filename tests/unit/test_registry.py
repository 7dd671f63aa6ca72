"""The handler registry: decorator and class forms, and its errors."""

from __future__ import annotations

from collections.abc import AsyncIterator, Generator, Iterator
from typing import Any

import pytest

from workers.registry import (
    HandlerModuleError,
    HandlerRegistry,
    PayloadError,
    Resources,
    RetryPolicy,
    load_handler_modules,
)


def test_register_a_run_function() -> None:
    """`run` handlers serve one payload per call, wrapped as a batch of one."""
    registry = HandlerRegistry()
    registry.register("double", loader=lambda: 2, run=lambda model, x: model * x)
    handler = registry.get("double")
    assert (handler.max_batch, handler.batched) == (1, False)
    assert handler.run_batch(handler.loader(), [1, 2]) == [2, 4]


def test_decorate_a_run_function_with_its_loader() -> None:
    """With loader=, the decorated function is the run function and is returned unchanged."""
    registry = HandlerRegistry()

    @registry.handler("add", loader=lambda: 10)
    def add(model: int, payload: int) -> int:
        return model + payload

    assert add(1, 2) == 3
    handler = registry.get("add")
    assert handler.run_batch(handler.loader(), [5]) == [15]


def test_decorate_a_batched_function() -> None:
    """max_batch > 1 makes the decorated function the batch function."""
    registry = HandlerRegistry()

    @registry.handler("lens", loader=lambda: None, max_batch=8, batch_wait_ms=5.0)
    def lens(model: None, payloads: list[str]) -> list[int]:
        return [len(p) for p in payloads]

    handler = registry.get("lens")
    assert (handler.max_batch, handler.batch_wait_ms, handler.batched) == (8, 5.0, True)
    assert handler.run_batch(None, ["a", "bcd"]) == [1, 3]


def test_decorate_a_class_whose_constructor_loads() -> None:
    """A class with run_batch (or run): constructing it is the load."""
    registry = HandlerRegistry()

    @registry.handler("upper", max_batch=4, resources=Resources(num_cpus=1.0, memory_mb=256))
    class Upper:
        def run_batch(self, payloads: list[str]) -> list[str]:
            return [p.upper() for p in payloads]

    @registry.handler("neg")
    class Neg:
        def run(self, payload: int) -> int:
            return -payload

    upper = registry.get("upper")
    assert isinstance(upper.loader(), Upper)
    assert upper.run_batch(upper.loader(), ["a"]) == ["A"]
    assert upper.resources == Resources(num_cpus=1.0, memory_mb=256)
    neg = registry.get("neg")
    assert neg.run_batch(neg.loader(), [3]) == [-3]
    assert registry.job_types() == ["neg", "upper"]


def test_unknown_job_type_names_the_registered_ones() -> None:
    """get() on an unknown type is a KeyError listing what is registered."""
    registry = HandlerRegistry()
    registry.register("a", loader=lambda: None, run=lambda m, p: p)
    with pytest.raises(KeyError, match=r"no handler for job type 'b' \(registered: a\)"):
        registry.get("b")


def test_duplicate_registration_is_refused() -> None:
    """Two registrations of one job type mean two modules disagree: an error, not a silent win."""
    registry = HandlerRegistry()
    registry.register("a", loader=lambda: None, run=lambda m, p: p)
    with pytest.raises(ValueError, match="'a' is already registered"):
        registry.register("a", loader=lambda: None, run=lambda m, p: p)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, "exactly one of run= and run_batch="),
        ({"run": lambda m, p: p, "run_batch": lambda m, ps: ps}, "exactly one of"),
        ({"run": lambda m, p: p, "max_batch": 4}, "max_batch > 1 needs run_batch="),
        ({"run_batch": lambda m, ps: ps, "max_batch": 0}, "max_batch must be >= 1"),
    ],
)
def test_invalid_registrations(options: dict[str, Any], message: str) -> None:
    """Inconsistent options fail at registration, naming the job type."""
    with pytest.raises(ValueError, match=message):
        HandlerRegistry().register("x", loader=lambda: None, **options)


def test_class_without_run_is_refused() -> None:
    """A decorated class must offer run or run_batch."""
    registry = HandlerRegistry()
    with pytest.raises(TypeError, match="has no run or run_batch"):
        registry.handler("x")(type("Empty", (), {}))


def test_resources_for_takes_the_largest_need() -> None:
    """A worker serving several job types reserves the most any of them needs."""
    registry = HandlerRegistry()
    registry.register("a", loader=lambda: None, run=lambda m, p: p)
    registry.register(
        "b", loader=lambda: None, run=lambda m, p: p,
        resources=Resources(num_cpus=2.0, gpu_fraction=0.25, memory_mb=512),
    )  # fmt: skip
    assert registry.resources_for(["a"], 0.5) == Resources(num_cpus=0.5)
    assert registry.resources_for(["a", "b"], 0.5) == Resources(2.0, 0.25, 512)


def test_a_handler_module_that_fails_to_import_is_named() -> None:
    """load_handler_modules says which module failed and why."""
    with pytest.raises(HandlerModuleError, match="'no_such_module_xyz' failed to import"):
        load_handler_modules(["no_such_module_xyz"], HandlerRegistry())


def test_a_generator_run_function_streams() -> None:
    """A generator is a streaming handler; drained without streaming, its result is its return
    value, or the list of its chunks when it returns None."""
    registry = HandlerRegistry()

    @registry.handler("words", loader=lambda: None)
    def words(model: None, payload: str) -> Iterator[str]:
        yield from payload.split()

    @registry.handler("counted", loader=lambda: None)
    def counted(model: None, payload: int) -> Generator[int, None, str]:
        yield from range(payload)
        return f"{payload} chunks"

    assert registry.get("words").streaming
    assert registry.get("words").run_batch(None, ["a b"]) == [["a", "b"]]
    assert registry.get("counted").run_batch(None, [3]) == ["3 chunks"]
    assert not registry.get("counted").batched
    assert list(words(None, "x y")) == ["x", "y"]  # returned unchanged


def test_stream_forms_of_classes_and_iterators() -> None:
    """A class with run_stream streams, and so does a run function returning an iterator with
    stream=True, or registered as run_stream=."""
    registry = HandlerRegistry()

    @registry.handler("chat")
    class Chat:
        def run(self, payload: str) -> str:
            return payload

        def run_stream(self, payload: str) -> Iterator[str]:
            yield from payload

    registry.handler("frames", loader=lambda: 2, stream=True)(lambda m, p: iter([m] * p))
    registry.register("listed", loader=lambda: None, run_stream=lambda m, p: [p, p])
    assert registry.get("chat").streaming
    assert registry.get("chat").run_batch(Chat(), ["hi"]) == [["h", "i"]]
    assert registry.get("frames").run_batch(2, [3]) == [[2, 2, 2]]
    assert registry.get("listed").run_batch(None, [1]) == [[1, 1]]
    assert not registry.get("chat").batched


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"run_stream": lambda m, p: iter(()), "run": lambda m, p: p}, "exactly one of run=, "),
        ({"run_stream": lambda m, p: iter(()), "max_batch": 4}, "max_batch must be 1"),
    ],
)
def test_invalid_stream_registrations(options: dict[str, Any], message: str) -> None:
    """A streaming handler runs one job per call, and has one run function."""
    with pytest.raises(ValueError, match=message):
        HandlerRegistry().register("x", loader=lambda: None, **options)


def test_async_stream_functions_and_str_streams_are_refused() -> None:
    """An async generator cannot run on the handler thread; a str is not a stream of chunks."""

    async def agen(model: None, payload: Any) -> AsyncIterator[int]:
        yield 1

    with pytest.raises(TypeError, match="async function"):
        HandlerRegistry().register("x", loader=lambda: None, run_stream=agen)
    registry = HandlerRegistry()
    registry.register("s", loader=lambda: None, run_stream=lambda m, p: "text")
    with pytest.raises(TypeError, match="must return an iterator or generator"):
        registry.get("s").run_batch(None, [1])


class TestRetryPolicy:
    def test_registered_retry_options_make_the_policy(self) -> None:
        """handler(..., max_retries=, retry_backoff_s=, retryable=) ends up on the Handler."""
        registry = HandlerRegistry()

        @registry.handler("embed", loader=lambda: None, max_retries=5, retry_backoff_s=2.0,
                          retryable=(TimeoutError, ConnectionError))  # fmt: skip
        def embed(model: None, payload: str) -> str:
            return payload

        retry = registry.get("embed").retry
        assert (retry.max_retries, retry.backoff_s, retry.backoff_max_s) == (5, 2.0, None)
        assert retry.retries(TimeoutError())
        assert retry.retries(ConnectionResetError())
        assert not retry.retries(ValueError())

    def test_payload_errors_are_never_retried(self) -> None:
        """Whatever `retryable` lists, a PayloadError dead-letters at once; no list retries
        everything else."""
        assert not RetryPolicy(retryable=(ValueError,)).retries(PayloadError("bad"))
        assert not RetryPolicy().retries(PayloadError("bad"))
        assert RetryPolicy().retries(RuntimeError())

    def test_a_jobs_own_max_retries_wins(self) -> None:
        """The handler's budget replaces the record's only for a job that set none."""
        assert RetryPolicy(max_retries=5).max_retries_for(None) == 5
        assert RetryPolicy(max_retries=5).max_retries_for(0) is None
        assert RetryPolicy().max_retries_for(None) is None

    @pytest.mark.parametrize(
        ("options", "message"),
        [
            ({"max_retries": -1}, "max_retries must be an int in 0..100, got -1"),
            ({"max_retries": 101}, "max_retries must be an int in 0..100, got 101"),
            ({"retry_backoff_s": -1.0}, "retry_backoff_s must be a number of seconds >= 0"),
            ({"retry_backoff_max_s": "5"}, "retry_backoff_max_s must be a number of seconds"),
            ({"retryable": [TimeoutError]}, "retryable must be a tuple of exception classes"),
            ({"retryable": (TimeoutError, "x")}, "retryable must be a tuple of exception"),
        ],
    )
    def test_bad_retry_options_name_the_job_type_and_option(
        self, options: dict[str, Any], message: str
    ) -> None:
        """A bad retry option fails the registration, naming the job type and the option."""
        with pytest.raises(ValueError, match=f"^embed: {message}"):
            HandlerRegistry().register("embed", loader=lambda: None, run=lambda m, p: p, **options)
