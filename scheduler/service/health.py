"""Health that tells the truth: each loop's proof of progress, what a role publishes, and its state.

A loop that is alive is not necessarily working: a command blocked on a dead connection, or a
call that never returns, leaves a process that answers pings while nothing moves. So every long-
lived loop marks a `Progress` each time it completes a step (a routing batch or an empty look at the
ingress, a controller tick or an idle check, an election step), and records each failed step. From
those marks alone a reader can tell:

- *running*: the loop completed a step recently;
- *failing*: its steps keep failing (Redis unreachable, say), with the last error;
- *stalled*: no step completed and none failed for `stall_after_s`: it is stuck, and a restart of
  the loop (with fresh connections) is what helps; the role's watchdog does that;
- *gone*: the role has not published its record recently: the process is dead or its event loop
  is blocked.

Each role publishes a `RoleHealth` record to Redis (a key per role host, with a TTL) every few
seconds, so `bilevel status` needs only Redis; the same fields are the gauges and counters a
metrics exporter reads.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import redis.asyncio as aioredis

from scheduler.keys import Keys
from scheduler.retry import describe

# What a role's state can be, as `bilevel status` prints it.
RoleState = Literal["leading", "standby", "failing", "stalled", "gone"]

# A role publishes its record this often; a record older than GONE_AFTER_PUBLISHES intervals says
# the role is gone (its key's TTL is a little longer, so a reader sees it age before it vanishes).
PUBLISH_EVERY_S = 2.0
GONE_AFTER_PUBLISHES = 5
RECORD_TTL_S = PUBLISH_EVERY_S * GONE_AFTER_PUBLISHES * 3


@dataclass
class Progress:
    """One loop's proof of work: when it last completed a step, and its failures since."""

    clock: Callable[[], float] = time.time
    last_progress_s: float = field(default=0.0)
    steps: int = 0
    # Failed steps since the last one that completed; 0 while it works.
    failures: int = 0
    failures_total: int = 0
    last_error: str | None = None
    last_error_s: float | None = None

    def __post_init__(self) -> None:
        # A loop that has just started counts as progressing: it has not had time to stall.
        if self.last_progress_s == 0.0:
            self.last_progress_s = self.clock()

    def mark(self) -> None:
        """A step completed."""
        self.last_progress_s = self.clock()
        self.steps += 1
        self.failures = 0

    def failed(self, exc: BaseException) -> None:
        """A step failed with `exc` (the loop goes on)."""
        self.failures += 1
        self.failures_total += 1
        self.last_error = describe(exc)
        self.last_error_s = self.clock()

    def restarted(self) -> None:
        """The loop was restarted: give the new one its own grace period."""
        self.last_progress_s = self.clock()
        self.failures = 0

    def stalled(self, stall_after_s: float) -> bool:
        """No step completed, and none failed, for `stall_after_s`: stuck, not merely failing."""
        now = self.clock()
        if now - self.last_progress_s < stall_after_s:
            return False
        return self.last_error_s is None or now - self.last_error_s >= stall_after_s


@dataclass(frozen=True, slots=True)
class RoleHealth:
    """What one role host publishes about itself (JSON in Redis, and over Ray)."""

    role: str
    name: str
    # host:pid of the process it runs in.
    process: str
    leading: bool
    # Wall-clock seconds of the record, of the loop's and of the election's last completed step.
    published_s: float
    last_progress_s: float
    election_progress_s: float
    stall_after_s: float
    # The election steps only every renew interval, so its own threshold is a few of those.
    election_stall_after_s: float = 0.0
    steps: int = 0
    failures: int = 0
    failures_total: int = 0
    last_error: str | None = None
    last_error_s: float | None = None
    # Loop restarts by the watchdog since the role started.
    restarts: int = 0
    # Role-specific figures: the router's lag behind the ingress, the controller's tick time...
    figures: dict[str, float] = field(default_factory=dict)

    def state(self, now_s: float) -> RoleState:
        """gone > stalled > failing > leading/standby, judged at `now_s` (a reader's clock)."""
        if now_s - self.published_s > PUBLISH_EVERY_S * GONE_AFTER_PUBLISHES:
            return "gone"
        erring = self.last_error_s is not None and now_s - self.last_error_s < self.stall_after_s
        behind = now_s - self.last_progress_s > self.stall_after_s or (
            now_s - self.election_progress_s > max(self.stall_after_s, self.election_stall_after_s)
        )
        if behind and not erring:
            return "stalled"
        if self.failures > 0:
            return "failing"
        return "leading" if self.leading else "standby"

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> RoleHealth:
        """Parse a published record; ValueError for anything this module did not write."""
        try:
            raw: Any = json.loads(text)
            if not isinstance(raw, dict):
                raise TypeError("not an object")
            figures = raw.get("figures") or {}
            return cls(
                role=str(raw["role"]),
                name=str(raw["name"]),
                process=str(raw.get("process", "")),
                leading=bool(raw["leading"]),
                published_s=float(raw["published_s"]),
                last_progress_s=float(raw["last_progress_s"]),
                election_progress_s=float(raw["election_progress_s"]),
                stall_after_s=float(raw["stall_after_s"]),
                election_stall_after_s=float(raw.get("election_stall_after_s", 0.0)),
                steps=int(raw.get("steps", 0)),
                failures=int(raw.get("failures", 0)),
                failures_total=int(raw.get("failures_total", 0)),
                last_error=None if raw.get("last_error") is None else str(raw["last_error"]),
                last_error_s=None
                if raw.get("last_error_s") is None
                else float(raw["last_error_s"]),
                restarts=int(raw.get("restarts", 0)),
                figures={str(k): float(v) for k, v in dict(figures).items()},
            )
        except (ValueError, KeyError, TypeError, RecursionError) as exc:
            raise ValueError(f"not a role health record: {exc}") from None


async def read_health(redis: aioredis.Redis, keys: Keys) -> list[RoleHealth]:
    """Every role host's latest record in a namespace (expired ones are dropped from the index),
    sorted by role, then name."""
    members = sorted(str(m) for m in await redis.smembers(keys.health_index))
    if not members:
        return []
    texts = await redis.mget(members)
    records: list[RoleHealth] = []
    gone: list[str] = []
    for key, text in zip(members, texts, strict=True):
        if text is None:
            gone.append(key)
            continue
        try:
            records.append(RoleHealth.from_json(str(text)))
        except ValueError:
            gone.append(key)
    if gone:
        await redis.srem(keys.health_index, *gone)
    return sorted(records, key=lambda r: (r.role, r.name))


__all__ = [
    "GONE_AFTER_PUBLISHES",
    "PUBLISH_EVERY_S",
    "RECORD_TTL_S",
    "Progress",
    "RoleHealth",
    "RoleState",
    "read_health",
]
