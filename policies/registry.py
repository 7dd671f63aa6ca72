"""Names of the routers and heuristic allocators, as the CLI, scenario files and simulator spell them."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

from policies.allocation import (
    MaxWeightAllocator,
    ProportionalAllocator,
    StaticAllocator,
    SwitchAwareMaxWeightAllocator,
    TargetOngoingRequestsAllocator,
)
from policies.regime import RegimeTargetsAllocator
from policies.routing import (
    PowerOfTwoRouter,
    RandomRouter,
    RuleRouter,
    ShortestExpectedWaitRouter,
)
from policies.views import Allocator, Router

ROUTERS: Mapping[str, Callable[..., Router]] = MappingProxyType(
    {
        "rule": RuleRouter,
        "shortest_wait": ShortestExpectedWaitRouter,
        "power_of_two": PowerOfTwoRouter,
        "random": RandomRouter,
    }
)

ALLOCATORS: Mapping[str, Callable[..., Allocator]] = MappingProxyType(
    {
        "static": StaticAllocator,
        "proportional": ProportionalAllocator,
        "target_ongoing": TargetOngoingRequestsAllocator,
        "maxweight": MaxWeightAllocator,
        "switch_aware": SwitchAwareMaxWeightAllocator,
        # Fitted to one scenario's queues by a policy search during training
        # (policies.learned.regime_search), so not among the heuristics compared against.
        "regime_targets": RegimeTargetsAllocator,
    }
)

# The allocators `bilevel simulate --compare` runs side by side.
HEURISTIC_ALLOCATORS: tuple[str, ...] = (
    "static",
    "proportional",
    "target_ongoing",
    "maxweight",
    "switch_aware",
)


def _make(kind: str, factories: Mapping[str, Callable[..., Any]], name: str, params: Any) -> Any:
    factory = factories.get(name)
    if factory is None:
        known = ", ".join(sorted(factories))
        raise ValueError(f"unknown {kind} {name!r}; known {kind}s: {known}")
    try:
        return factory(**params)
    except TypeError as exc:
        # A misspelt parameter reads better with the policy's name attached.
        raise ValueError(f"bad parameters for {kind} {name!r}: {exc}") from exc


def make_router(name: str, **params: Any) -> Router:
    """A new router by registry name, built with `params`; ValueError lists the known names."""
    router: Router = _make("router", ROUTERS, name, params)
    return router


def make_allocator(name: str, **params: Any) -> Allocator:
    """A new allocator by registry name, built with `params`; ValueError lists the known names."""
    allocator: Allocator = _make("allocator", ALLOCATORS, name, params)
    return allocator
