"""The one small interface every peer implements, and the sizes of a measured round.

A peer is a module under benchmarks/peers/ exposing `PEER`, an object with:

- `name`, `settings` (each setting with the one line that justifies it) and `load` (its round's
  sizes: a slow peer runs fewer jobs so a round stays short);
- `unavailable()`: None, or why this peer cannot run here (the row then says so);
- `start(redis_url, workdir, stack)`: starts its workers (their logs in `workdir`, their stop
  registered on `stack`) and returns a `Session`, which measures one round and names the processes whose idle CPU is the peer's.

Most peers hand the shared harness a `SyncDriver` or `AsyncDriver` (submit a batch, submit one,
wait for results) and let it time the round; a peer whose client is not Python (BullMQ) measures
the round in its own language and returns the same `RoundResult`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from benchmarks.peers.procstat import ProcStat


@dataclass(frozen=True)
class Load:
    """The sizes of one measured round."""

    # Jobs submitted through the peer's batch API, `batch_size` per call, then all awaited.
    batched_jobs: int = 10_000
    batch_size: int = 100
    # Jobs submitted one call each by `clients` concurrent clients, each then awaiting its own.
    individual_jobs: int = 4_000
    clients: int = 16
    # Sequential submit-then-await jobs at low load, after `warmup_round_trips` unmeasured ones.
    round_trips: int = 300
    warmup_round_trips: int = 30
    # Bound on any one wait for a result.
    result_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if value <= 0:
                raise ValueError(f"Load.{name} must be positive, got {value}")
        if self.individual_jobs % self.clients:
            raise ValueError(
                f"Load.individual_jobs ({self.individual_jobs}) must split evenly over "
                f"Load.clients ({self.clients})"
            )


@dataclass(frozen=True)
class RoundResult:
    """One round's figures."""

    batched_jobs_per_s: float
    individual_jobs_per_s: float
    round_trip_p50_ms: float
    round_trip_p99_ms: float


class Session(Protocol):
    """A running peer: its workers are up until the stack that started it closes."""

    def measure(self, load: Load) -> RoundResult:
        """Measure one round: batched, individual, round trips, each job tracked to its result."""
        ...

    def idle_processes(self) -> list[ProcStat]:
        """The processes the peer started to serve jobs, whose CPU is its idle figure."""
        ...


class Peer(Protocol):
    name: str
    settings: Mapping[str, str]
    load: Load

    def unavailable(self) -> str | None:
        """None when the peer can run here, else why not (e.g. 'node not found')."""
        ...

    def start(self, redis_url: str, workdir: Path, stack: ExitStack) -> Session: ...


class SyncDriver(Protocol):
    """A blocking client; the harness runs concurrent clients as threads sharing it."""

    def submit_batch(self, payloads: Sequence[int]) -> Any: ...

    def wait_batch(self, handle: Any, timeout_s: float) -> list[Any]: ...

    def submit(self, payload: int) -> Any: ...

    def wait(self, handle: Any, timeout_s: float) -> Any: ...


class AsyncDriver(Protocol):
    """An asyncio client; the harness runs concurrent clients as tasks sharing it."""

    async def submit_batch(self, payloads: Sequence[int]) -> Any: ...

    async def wait_batch(self, handle: Any, timeout_s: float) -> list[Any]: ...

    async def submit(self, payload: int) -> Any: ...

    async def wait(self, handle: Any, timeout_s: float) -> Any: ...
