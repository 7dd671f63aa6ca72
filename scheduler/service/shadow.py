"""Shadow mode: a second allocator decides every tick beside the acting one, without acting.

With `allocation.shadow` set, the controller (scheduler.service.controller_loop) asks both the
acting policy and the shadow for a target each tick, inside the same guardrails, applies the acting
one's, and logs and publishes both. Every `every_ticks` ticks it estimates what the shadow would
have done to job completion times over the last `window_s` seconds: the window's arrivals, as the
store counted them per queue and tick, are replayed in the simulator from the state the window
started in, once under each policy (policies.sim.counterfactual). The estimate runs off the event
loop, in a thread, and its wall time is published with it.

Promotion. Which of the two configured policies acts is a role, "configured" (allocation.policy)
or "shadow" (allocation.shadow), kept in Redis (Keys.acting_policy) and read by the controller
every tick: `bilevel promote` writes the other role, and the next tick swaps the two, so the former
acting policy becomes the shadow and a second promote switches back. The config file is not
rewritten; the role outlives controller restarts. With `allocation.shadow_promote: {after_s,
min_gain}` the controller promotes the shadow itself once every estimate (at least two) over
`after_s` seconds showed a saving of at least `min_gain` of the acting policy's mean; it never
demotes, and it never overrides a person's promote. See docs/shadow.md.
"""

from __future__ import annotations

import copy
import json
import math
from collections import deque
from dataclasses import dataclass
from typing import Any, Literal

from policies.guardrails import Guardrails, guardrails_for
from policies.sim.counterfactual import (
    CounterfactualEstimate,
    ReplayWindow,
    WindowTick,
    replay_window,
)
from policies.views import Allocation, Allocator, ClusterView
from scheduler.config import ServiceConfig
from scheduler.service.views import DEFAULT_RATE_HALF_LIFE_S, PublishedShadow
from scheduler.store import StoreStats

Role = Literal["configured", "shadow"]
ROLES: tuple[Role, Role] = ("configured", "shadow")

# An estimate every 10 ticks over the last minute: a few tenths of a second of one core for a
# few queues and a few hundred jobs (docs/shadow.md has the measurements), about 2% of a core at
# one tick a second, and a minute is long enough for a burst and the moves it caused.
ESTIMATE_EVERY_TICKS = 10
WINDOW_S = 60.0
# No estimate before the window holds this many ticks: a replay of two ticks says nothing.
MIN_WINDOW_TICKS = 5
# Service times are drawn per seed; two seeds halve the variance of a single draw's difference.
ESTIMATE_SEEDS = (0, 1)


def other_role(role: Role) -> Role:
    return "shadow" if role == "configured" else "configured"


@dataclass(frozen=True, slots=True)
class RoleRecord:
    """Keys.acting_policy's content: who made `role` act, and when."""

    role: Role
    by: str  # "manual" (bilevel promote) or "auto" (allocation.shadow_promote)
    t_s: float

    def to_json(self) -> str:
        return json.dumps({"role": self.role, "by": self.by, "t_s": self.t_s})

    @classmethod
    def from_json(cls, text: str) -> RoleRecord:
        """ValueError naming what is wrong when `text` is not what `to_json` writes."""
        try:
            raw = json.loads(text)
            role, by, t_s = raw["role"], raw["by"], float(raw["t_s"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"acting-policy record is malformed: {exc}") from None
        if role not in ROLES:
            raise ValueError(f"acting-policy record names role {role!r}, not one of {ROLES}")
        return cls(role=role, by=str(by), t_s=t_s)


@dataclass(frozen=True, slots=True)
class ShadowDecision:
    """The shadow's decision for one tick (what it would have applied)."""

    policy: str
    target: Allocation | None
    # Why its guardrails replaced its proposal, or why it could not decide at all.
    fallback: str | None = None


class ShadowMode:
    """The acting and the shadow policy, each in its own guardrails, the window of history the
    estimate replays, the latest estimate, and the promotion rule."""

    def __init__(
        self,
        config: ServiceConfig,
        acting: Allocator,
        shadow: Allocator,
        *,
        window_s: float = WINDOW_S,
        every_ticks: int = ESTIMATE_EVERY_TICKS,
        seeds: tuple[int, ...] = ESTIMATE_SEEDS,
    ) -> None:
        if window_s <= 0 or every_ticks < 1 or not seeds:
            raise ValueError("window_s must be > 0, every_ticks >= 1, and seeds not empty")
        self.config = config
        # Untouched copies: each replay starts from fresh policies, not from the live ones'
        # running state (rate averages, forecasts).
        self._pristine: dict[Role, Allocator] = {
            "configured": copy.deepcopy(acting),
            "shadow": copy.deepcopy(shadow),
        }
        self._guardrails: dict[Role, Guardrails] = {
            "configured": guardrails_for(config, acting),
            "shadow": guardrails_for(config, shadow),
        }
        self.acting_role: Role = "configured"
        self.window_s = window_s
        self.every_ticks = every_ticks
        self.seeds = seeds
        # (view, enqueued totals per queue) of recent ticks, oldest first.
        self._history: deque[tuple[ClusterView, tuple[int, ...]]] = deque()
        self._ticks_since_estimate = 0
        self.estimate: CounterfactualEstimate | None = None
        self.estimate_t_s: float | None = None
        promote = config.allocation.shadow_promote
        self.auto_promote = promote
        # Since when every estimate has shown the promotion gain, and how many did.
        self._good_since_s: float | None = None
        self._good_count = 0
        # The role record last applied (None until one was read or written).
        self.promoted: RoleRecord | None = None

    # --- the two policies -----------------------------------------------------------------------

    @property
    def acting(self) -> Guardrails:
        return self._guardrails[self.acting_role]

    @property
    def shadow(self) -> Guardrails:
        return self._guardrails[other_role(self.acting_role)]

    def decide(self, view: ClusterView) -> ShadowDecision:
        """The shadow's target for `view`; a failure is a decision with no target and the reason
        (a broken shadow must never stop the acting policy's tick)."""
        shadow = self.shadow
        try:
            target = shadow.allocate(view)
        except Exception as exc:  # the shadow's guardrails refused the view itself
            return ShadowDecision(shadow.name, None, f"raised {type(exc).__name__}: {exc}")
        return ShadowDecision(shadow.name, target, shadow.last_fallback_reason)

    def apply_role(self, record: RoleRecord) -> bool:
        """Makes `record.role` act; True when that swapped the two policies."""
        self.promoted = record
        if record.role == self.acting_role:
            return False
        self.acting_role = record.role
        # The estimate so far compared the policies the other way round.
        self.estimate = None
        self.estimate_t_s = None
        self._good_since_s = None
        self._good_count = 0
        return True

    # --- the estimate ---------------------------------------------------------------------------

    def observe(self, view: ClusterView, stats: StoreStats) -> None:
        """Adds one tick to the window (and drops what fell out of it, keeping its start)."""
        totals = tuple(
            stats.queues[q.name].enqueued_total if q.name in stats.queues else 0
            for q in view.queues
        )
        self._history.append((view, totals))
        while len(self._history) > 1 and view.now_s - self._history[1][0].now_s >= self.window_s:
            self._history.popleft()
        self._ticks_since_estimate += 1

    def window(self) -> ReplayWindow | None:
        """The replay window (the oldest kept view and the arrivals of every tick since), or None
        while it holds fewer than MIN_WINDOW_TICKS ticks."""
        if len(self._history) <= MIN_WINDOW_TICKS:
            return None
        start, last_totals = self._history[0]
        ticks = []
        for view, totals in list(self._history)[1:]:
            # A total that went down (a flushed namespace) counts as no arrivals.
            arrivals = tuple(max(t - s, 0) for t, s in zip(totals, last_totals, strict=True))
            ticks.append(WindowTick(view.now_s, arrivals))
            last_totals = totals
        return ReplayWindow(start, tuple(ticks))

    @property
    def due(self) -> bool:
        return self._ticks_since_estimate >= self.every_ticks and self.window() is not None

    def run_estimate(self) -> CounterfactualEstimate | None:
        """The window replayed under the acting and the shadow policy (CPU-bound: the controller
        runs it in a thread). None when the window is still too short."""
        window = self.window()
        if window is None:
            return None
        self._ticks_since_estimate = 0
        acting, shadow = (
            self._pristine[self.acting_role],
            self._pristine[other_role(self.acting_role)],
        )
        return replay_window(
            self.config,
            window,
            lambda: copy.deepcopy(acting),
            lambda: copy.deepcopy(shadow),
            seeds=self.seeds,
            rate_window_s=DEFAULT_RATE_HALF_LIFE_S / math.log(2),
        )

    def record_estimate(self, estimate: CounterfactualEstimate, now_s: float) -> bool:
        """Keeps `estimate`; True when the automatic promotion rule now asks for the shadow."""
        self.estimate = estimate
        self.estimate_t_s = now_s
        rule = self.auto_promote
        if rule is None or estimate.jobs == 0:
            return False
        if estimate.gain >= rule.min_gain:
            if self._good_since_s is None:
                self._good_since_s = now_s
            self._good_count += 1
        else:
            self._good_since_s = None
            self._good_count = 0
        return (
            self.acting_role == "configured"
            and (self.promoted is None or self.promoted.by != "manual")
            and self._good_count >= 2
            and self._good_since_s is not None
            and now_s - self._good_since_s >= rule.after_s
        )

    # --- publishing -----------------------------------------------------------------------------

    def published(self, decision: ShadowDecision | None) -> PublishedShadow:
        estimate: dict[str, Any] | None = None
        if self.estimate is not None:
            estimate = {**self.estimate.to_dict(), "t_s": self.estimate_t_s}
        rule = self.auto_promote
        return PublishedShadow(
            policy=self.shadow.name,
            workers={} if decision is None or decision.target is None else dict(decision.target),
            acting_role=self.acting_role,
            fallback=None if decision is None else decision.fallback,
            estimate=estimate,
            auto_promote=None
            if rule is None
            else {"after_s": rule.after_s, "min_gain": rule.min_gain},
            promoted=None
            if self.promoted is None
            else {"role": self.promoted.role, "by": self.promoted.by, "t_s": self.promoted.t_s},
        )


__all__ = [
    "ESTIMATE_EVERY_TICKS",
    "ROLES",
    "WINDOW_S",
    "Role",
    "RoleRecord",
    "ShadowDecision",
    "ShadowMode",
    "other_role",
]
