"""The discrete-event core: an event heap plus one pre-sorted event stream, stepped explicitly.

Modelled on SimPy's `Environment` (a heap of `(time, priority, seq, event)`, `step()`, `run(until=)`),
but events are explicit `(kind, arg)` pairs dispatched to registered handlers instead of generator
processes, so a caller can stop at any decision point (a level-2 tick) and resume later.

Why a separate stream: arrivals are drawn in one vectorised batch and are already sorted, so pushing
each through the heap would double the heap traffic of the hottest loop for nothing. The stream is
merged with the heap under the same `(time, priority)` order. Events are plain tuples of numbers so
the hot loop allocates nothing but the heap entry itself.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Sequence

# A handler receives the integer argument its event was scheduled with (a job or worker index).
Handler = Callable[[int], None]

# (time_s, priority, seq, kind, arg): `seq` makes ties between equal (time, priority) resolve in
# scheduling order, so a run is a pure function of its inputs.
_Entry = tuple[float, int, int, int, int]


class Engine:
    """An event heap with deterministic ties, merged with at most one sorted stream of events.

    Order of events: by time, then priority (lower first), then scheduling order. A stream event
    that ties with a heap event on (time, priority) runs first.
    """

    __slots__ = (
        "_handlers",
        "_heap",
        "_seq",
        "_stream_kind",
        "_stream_pos",
        "_stream_priority",
        "_stream_times_s",
        "now_s",
    )

    def __init__(self) -> None:
        self.now_s = 0.0
        self._heap: list[_Entry] = []
        self._seq = 0
        self._handlers: list[Handler] = []
        self._stream_times_s: Sequence[float] = ()
        self._stream_pos = 0
        self._stream_kind = -1
        self._stream_priority = 0

    def register(self, handler: Handler) -> int:
        """Adds an event handler and returns its event kind."""
        self._handlers.append(handler)
        return len(self._handlers) - 1

    def schedule_at(self, time_s: float, priority: int, kind: int, arg: int) -> None:
        """Schedules event `kind` with `arg` at absolute `time_s` (not before now)."""
        if time_s < self.now_s:
            raise ValueError(f"cannot schedule at {time_s} s, before now ({self.now_s} s)")
        self._seq += 1
        heapq.heappush(self._heap, (time_s, priority, self._seq, kind, arg))

    def set_stream(self, times_s: Sequence[float], kind: int, priority: int) -> None:
        """Delivers event `kind` with arg `i` at `times_s[i]` for every i; times must be sorted."""
        if self._stream_pos < len(self._stream_times_s):
            raise RuntimeError("the previous stream has not been consumed")
        self._stream_times_s = times_s
        self._stream_pos = 0
        self._stream_kind = kind
        self._stream_priority = priority

    @property
    def stream_pos(self) -> int:
        """Index of the next stream event (the number delivered so far)."""
        return self._stream_pos

    def peek(self) -> float:
        """Time of the next event, or infinity when there is none."""
        heap_s = self._heap[0][0] if self._heap else math.inf
        pos = self._stream_pos
        stream_s = self._stream_times_s[pos] if pos < len(self._stream_times_s) else math.inf
        return min(heap_s, stream_s)

    def step(self) -> bool:
        """Processes the next event; returns False when there was none."""
        return self.run(max_events=1) == 1

    def run(self, until: float | None = None, max_events: int | None = None) -> int:
        """Processes events with time <= `until` (all when None); returns how many ran.

        When `until` is given the clock ends at `until` even if the last event was earlier, as in
        SimPy; events scheduled exactly at `until` do run.
        """
        # Everything the loop touches is a local: attribute lookups cost more than the event itself.
        heap = self._heap
        handlers = self._handlers
        heappop = heapq.heappop
        stream = self._stream_times_s
        n_stream = len(stream)
        pos = self._stream_pos
        s_kind = self._stream_kind
        s_prio = self._stream_priority
        limit_s = math.inf if until is None else until
        budget = -1 if max_events is None else max_events
        inf = math.inf
        ran = 0
        while ran != budget:
            stream_s = stream[pos] if pos < n_stream else inf
            if heap:
                top = heap[0]
                top_s = top[0]
                if stream_s < top_s or (stream_s == top_s and s_prio <= top[1]):
                    if stream_s > limit_s:
                        break
                    self._stream_pos = pos + 1
                    self.now_s = stream_s
                    handlers[s_kind](pos)
                    pos += 1
                else:
                    if top_s > limit_s:
                        break
                    heappop(heap)
                    self.now_s = top_s
                    handlers[top[3]](top[4])
            elif stream_s <= limit_s and stream_s != inf:
                self._stream_pos = pos + 1
                self.now_s = stream_s
                handlers[s_kind](pos)
                pos += 1
            else:
                break
            ran += 1
        if until is not None and until > self.now_s and ran != budget:
            self.now_s = until
        return ran

    def pending(self) -> list[tuple[float, int, int]]:
        """The heap's pending events as (time_s, kind, arg), in no particular order."""
        return [(e[0], e[3], e[4]) for e in self._heap]
