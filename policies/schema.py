"""One schema for what the service and a scenario both describe: queues, routing, allocation.

`Layout` is the part of a service config (`scheduler.config.ServiceConfig`) and of a scenario
(`policies.sim.scenario.Scenario`) that says which queues exist, how many workers each may have,
which policies decide at both levels, and the guardrails around level 2. Both subclass it and add
their own sections, and both are validated here, by `Layout.problems`: the same mistake gets the
same message, under the field path the user wrote, from `bilevel serve` and `bilevel simulate`.
A scenario's queues, routing and allocation can therefore be served as they are
(`bilevel serve --scenario`, `ServiceConfig.from_scenario`).

The layout, in YAML (defaults shown where there is one):

    queues:
      - name: llm_small         # 1-64 of A-Z a-z 0-9 _ . -, starting with a letter or digit
        job_types: [small]      # at least one
        min_workers: 1          # default 0
        max_workers: 8          # default: none (the budget)
        slo_s: 5.0              # target job completion time; default: none
    routing:                    # level 1
      policy: shortest_wait     # default rule
      params: {}
    allocation:                 # level 2 and its guardrails
      policy: switch_aware      # default switch_aware
      params: {horizon_s: 320.0}
      fallback: proportional    # replaces a proposal that raises or is invalid; default proportional
      tick_s: 2.0               # the allocator decides once per tick; default 1
      budget: 24                # workers across all queues; required
      max_moves_per_tick: 2     # workers that may change queue per tick; default: no cap
      hysteresis_workers: 1     # a queue changes only by at least this many workers; default 1
      initial: {llm_small: 12}  # workers per queue at start (others 0); default: see below
      shadow: learned           # decides beside the acting policy, never acts; default: none
      shadow_params: {}         # the shadow's parameters, as params are the policy's
      shadow_promote: {after_s: 600, min_gain: 0.05}  # automatic promotion; default: off

`allocation.initial` is the allocation before the first decision: in the simulator the workers
at time 0, models loaded (default: the budget split by each queue's offered work); in the service
the first decision of a controller that starts with no workers (default: the policy's).

A scenario adds `service` and `model_load_s` to each queue, and `workload`, `slos`, `duration_s`,
`max_jobs`, `drain`, `max_drain_s`, `name` and `description`. A service config adds
`required_tags` to each queue, `routing.batch_size`, `allocation.idle_tick_s`, and the `store`,
`handlers`, `worker` and `health` sections. Files in the layout used before this one are read by
`policies.legacy_layout`, which says what each old key became.

Nothing here does I/O.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from policies.views import AllocationBounds

# Queue names end up inside the service's Redis key names and log lines, so they follow the rule
# of scheduler.keys (a test pins that the two agree).
QUEUE_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$"
_QUEUE_NAME_RE = re.compile(QUEUE_NAME_PATTERN)

# (dotted field path, message), as the loaders report them.
Problem = tuple[str, str]


class LayoutError(ValueError):
    """Cross-field problems of a layout, each with the field path it is about.

    Raised inside pydantic validation; `validation_problems` unpacks it into one problem per path.
    """

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(f"{path}: {msg}" for path, msg in self.problems))


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class QueueSection(_Section):
    """One task queue: the job types it takes, how many workers it may have, and its target."""

    name: str
    job_types: tuple[str, ...] = Field(min_length=1)
    min_workers: int = Field(default=0, ge=0)
    # None: no maximum of its own (the budget).
    max_workers: int | None = Field(default=None, ge=0)
    # Target job completion time, used by SLO-aware policies and reported by status and metrics.
    slo_s: float | None = Field(default=None, gt=0)

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        if not _QUEUE_NAME_RE.match(value):
            raise ValueError(
                f"queue name {value!r} is invalid: use 1-64 characters from A-Z a-z 0-9 _ . - "
                "starting with a letter or digit"
            )
        return value


class RoutingSection(_Section):
    """Level 1: the routing policy (policies.registry name) and its parameters."""

    policy: str = "rule"
    params: dict[str, Any] = Field(default_factory=dict)


class ShadowPromoteSection(_Section):
    """When a shadow policy becomes the acting one without a person asking (see docs/shadow.md)."""

    # Every estimate over this long, and at least two of them, must show the gain below.
    after_s: float = Field(gt=0)
    # The shadow's estimated saving in mean job completion time, as a fraction of the acting
    # policy's (0.05: 5% faster).
    min_gain: float = Field(default=0.05, ge=0, lt=1)


class AllocationSection(_Section):
    """Level 2: the allocator, how often it runs, and the guardrails around it."""

    policy: str = "switch_aware"
    params: dict[str, Any] = Field(default_factory=dict)
    # Used when the allocator raises, returns something invalid, or its checkpoint is missing.
    fallback: str = "proportional"
    tick_s: float = Field(default=1.0, gt=0)
    # Total workers the allocation may place across all queues. No default: it sizes everything.
    budget: int = Field(ge=1)
    # At most this many workers change queue per tick (a move costs a model load); None: no cap.
    max_moves_per_tick: int | None = Field(default=None, ge=0)
    # A queue is held at its count unless the proposal differs by at least this many workers
    # (1 lets every change through).
    hysteresis_workers: int = Field(default=1, ge=1)
    # Workers per queue before the first decision (see the module docstring); queues left out get 0.
    initial: dict[str, int] | None = None
    # A second allocator (a policy name, "learned" or a checkpoint path) that decides every tick
    # beside the acting one without acting; its decisions and estimated effect are published.
    shadow: str | None = None
    shadow_params: dict[str, Any] = Field(default_factory=dict)
    # Automatic promotion of the shadow; None (the default): only `bilevel promote` promotes.
    shadow_promote: ShadowPromoteSection | None = None


class Layout(_Section):
    """Queues, routing and allocation with its guardrails; see the module docstring.

    Subclasses narrow the sections to their own (a scenario's queues carry service models) and
    extend `problems` with their own cross-field checks.
    """

    queues: tuple[QueueSection, ...] = Field(min_length=1)
    routing: RoutingSection = Field(default_factory=RoutingSection)
    allocation: AllocationSection

    def layout_problems(self) -> list[Problem]:
        """What contradicts itself across the layout's fields, each under its field path."""
        problems: list[Problem] = []
        names = [q.name for q in self.queues]
        for i, name in enumerate(names):
            if name in names[:i]:
                problems.append((f"queues.{i}.name", f"duplicate queue name {name!r}"))
        for i, q in enumerate(self.queues):
            if q.max_workers is not None and q.max_workers < q.min_workers:
                problems.append(
                    (
                        f"queues.{i}.max_workers",
                        f"{q.max_workers} is below min_workers ({q.min_workers})",
                    )
                )
        a = self.allocation
        minimum = sum(q.min_workers for q in self.queues)
        if minimum > a.budget:
            problems.append(
                (
                    "allocation.budget",
                    f"{a.budget} is below the sum of the queues' min_workers ({minimum})",
                )
            )
        if a.hysteresis_workers > a.budget:
            problems.append(
                (
                    "allocation.hysteresis_workers",
                    f"{a.hysteresis_workers} is above allocation.budget ({a.budget}): no queue "
                    "could ever change",
                )
            )
        if a.shadow is None:
            if a.shadow_params:
                problems.append(
                    ("allocation.shadow_params", "given without allocation.shadow to apply to")
                )
            if a.shadow_promote is not None:
                problems.append(
                    ("allocation.shadow_promote", "given without allocation.shadow to promote")
                )
        elif not a.shadow.strip():
            problems.append(("allocation.shadow", "is empty: name a policy or a checkpoint"))
        if a.initial is not None:
            for name, count in a.initial.items():
                if name not in names:
                    problems.append(
                        (f"allocation.initial.{name}", f"unknown queue; queues are {names}")
                    )
                if count < 0:
                    problems.append((f"allocation.initial.{name}", "must be >= 0"))
            if sum(a.initial.values()) > a.budget:
                problems.append(
                    (
                        "allocation.initial",
                        f"allocates {sum(a.initial.values())} workers, more than "
                        f"allocation.budget ({a.budget})",
                    )
                )
        return problems

    def problems(self) -> list[Problem]:
        """Every cross-field problem; subclasses add theirs to the layout's."""
        return self.layout_problems()

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        problems = self.problems()
        if problems:
            raise LayoutError(problems)
        return self

    def bounds(self) -> AllocationBounds:
        """The guardrails' limits: each queue's min and max workers, and the move cap."""
        return AllocationBounds(
            min_workers={q.name: q.min_workers for q in self.queues},
            max_workers={q.name: q.max_workers for q in self.queues if q.max_workers is not None},
            max_moves_per_tick=self.allocation.max_moves_per_tick,
        )


def layout_fields(section: type[BaseModel], shared: type[BaseModel]) -> tuple[str, ...]:
    """The fields of `section` that its layout base `shared` does not have (service-only or
    scenario-only keys), in declaration order."""
    return tuple(name for name in section.model_fields if name not in shared.model_fields)


def _path(loc: Iterable[int | str], union_tags: frozenset[str]) -> str:
    """A dotted field path without the union tags pydantic inserts (users never wrote them)."""
    parts = list(loc)
    kept: list[str] = []
    for i, part in enumerate(parts):
        after_union = i > 0 and (parts[i - 1] == "service" or isinstance(parts[i - 1], int))
        if isinstance(part, str) and part in union_tags and after_union:
            continue
        kept.append(str(part))
    return ".".join(kept)


def _renamed(path: str, renamed: Mapping[str, str]) -> str:
    """`path` as the user wrote it: the longest translated prefix replaced by its old spelling."""
    best = ""
    for new in renamed:
        if (path == new or path.startswith(new + ".")) and len(new) > len(best):
            best = new
    return renamed[best] + path[len(best) :] if best else path


def validation_problems(
    exc: ValidationError,
    *,
    union_tags: frozenset[str] = frozenset(),
    renamed: Mapping[str, str] | None = None,
) -> list[Problem]:
    """Each error of `exc` as (field path, message): a layout's own checks under the paths they
    name, pydantic's under the path of the field, both in the spelling the user wrote (`renamed`
    maps a translated key's new path to its old one) and without pydantic's 'Value error, '."""
    renamed = renamed or {}
    problems: list[Problem] = []
    errors = exc.errors()
    locs = [tuple(e["loc"]) for e in errors]
    for err in errors:
        loc = tuple(err["loc"])
        if err["type"] == "too_short" and any(
            len(other) > len(loc) and other[: len(loc)] == loc for other in locs
        ):
            # A list whose only items are invalid is also "too short"; the items say why.
            continue
        where = _path(err["loc"], union_tags)
        cause = (err.get("ctx") or {}).get("error")
        if isinstance(cause, LayoutError):
            for path, msg in cause.problems:
                full = f"{where}.{path}" if where else path
                problems.append((_renamed(full, renamed), msg))
        elif err["type"] == "value_error" and cause is not None:
            problems.append((_renamed(where, renamed), str(cause)))
        else:
            problems.append((_renamed(where, renamed), err["msg"]))
    return problems


def format_problems(problems: Sequence[Problem]) -> str:
    """One line per problem, `path: message` (the message alone for the top level)."""
    return "\n".join(f"  {path}: {msg}" if path else f"  {msg}" for path, msg in problems)


__all__ = [
    "QUEUE_NAME_PATTERN",
    "AllocationSection",
    "Layout",
    "LayoutError",
    "Problem",
    "QueueSection",
    "RoutingSection",
    "ShadowPromoteSection",
    "format_problems",
    "layout_fields",
    "validation_problems",
]
