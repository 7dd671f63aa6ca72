"""The event engine: ordering, ties, step/run semantics, stream merging."""

from __future__ import annotations

import pytest

from policies.sim.engine import Engine


def _recorder(engine: Engine, log: list[tuple[float, str, int]], tag: str) -> int:
    return engine.register(lambda arg: log.append((engine.now_s, tag, arg)))


def test_events_run_by_time_then_priority_then_scheduling_order() -> None:
    """Ties on time break by priority, then by the order events were scheduled."""
    engine = Engine()
    log: list[tuple[float, str, int]] = []
    kind = _recorder(engine, log, "e")
    engine.schedule_at(2.0, 0, kind, 1)
    engine.schedule_at(1.0, 1, kind, 2)
    engine.schedule_at(1.0, 0, kind, 3)
    engine.schedule_at(1.0, 0, kind, 4)
    engine.run()
    assert [arg for _, _, arg in log] == [3, 4, 2, 1]
    assert engine.now_s == 2.0


def test_stream_merges_with_heap_under_the_same_order() -> None:
    """Stream events interleave with heap events; on a full tie the stream goes first."""
    engine = Engine()
    log: list[tuple[float, str, int]] = []
    heap_kind = _recorder(engine, log, "heap")
    stream_kind = _recorder(engine, log, "stream")
    engine.set_stream([0.5, 1.0, 3.0], stream_kind, priority=1)
    engine.schedule_at(1.0, 0, heap_kind, 7)
    engine.schedule_at(1.0, 1, heap_kind, 8)
    engine.schedule_at(2.0, 1, heap_kind, 9)
    engine.run()
    assert [(t, tag) for t, tag, _ in log] == [
        (0.5, "stream"),
        (1.0, "heap"),
        (1.0, "stream"),
        (1.0, "heap"),
        (2.0, "heap"),
        (3.0, "stream"),
    ]
    assert engine.stream_pos == 3


def test_run_until_stops_inclusively_and_advances_the_clock() -> None:
    """run(until=t) runs events at t, leaves later ones, and sets the clock to t."""
    engine = Engine()
    log: list[tuple[float, str, int]] = []
    kind = _recorder(engine, log, "e")
    for t in (1.0, 2.0, 3.0):
        engine.schedule_at(t, 0, kind, int(t))
    assert engine.run(until=2.0) == 2
    assert engine.now_s == 2.0
    assert engine.peek() == 3.0
    assert engine.run(until=2.5) == 0
    assert engine.now_s == 2.5
    assert engine.step()
    assert engine.now_s == 3.0
    assert not engine.step()


def test_handlers_may_schedule_more_events() -> None:
    """An event scheduled by a handler at the current time still runs in the same run()."""
    engine = Engine()
    seen: list[int] = []

    def chain(arg: int) -> None:
        seen.append(arg)
        if arg < 3:
            engine.schedule_at(engine.now_s, 0, kind, arg + 1)

    kind = engine.register(chain)
    engine.schedule_at(1.0, 0, kind, 0)
    engine.run(until=1.0)
    assert seen == [0, 1, 2, 3]


def test_scheduling_in_the_past_is_refused() -> None:
    """The clock never goes backwards."""
    engine = Engine()
    kind = engine.register(lambda arg: None)
    engine.run(until=5.0)
    with pytest.raises(ValueError, match="before now"):
        engine.schedule_at(4.0, 0, kind, 0)
