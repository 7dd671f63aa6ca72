"""The live service's two policies, from its config: a registry name, "learned" (the shipped
checkpoint) or a checkpoint path, for `allocation.policy` and for `routing.policy`.

Checkpoints are loaded by `load_policies` in the process that starts the service, and the loaded
weights travel to the control-plane actor with its arguments: a path valid on the machine that ran
`bilevel serve` need not exist on the node where Ray places the actor. Loading there also means a
missing or incompatible checkpoint fails the start with the field's path, not a controller that
crashes on every term.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from policies.learned.policy import LearnedPolicy
from policies.registry import ALLOCATORS, ROUTERS, make_allocator, make_router
from policies.views import Allocator, Router
from scheduler.checkpoints import CheckpointError, named_policy
from scheduler.config import ConfigError, ServiceConfig


@dataclass(frozen=True)
class LoadedPolicies:
    """The learned policies the config names, by level ("allocation", "routing")."""

    learned: dict[str, LearnedPolicy] = field(default_factory=dict)


def _load(
    level: str, name: str, registry: Mapping[str, Any], field: str = "policy"
) -> LearnedPolicy | None:
    """None for a registry name, else the checkpoint's policy; ConfigError names the field."""
    if name in registry:
        return None
    try:
        return named_policy(name, "policy" if level == "allocation" else "router", registry)
    except CheckpointError as exc:
        raise ConfigError(f"{level}.{field}: {exc}") from None


def load_policies(config: ServiceConfig) -> LoadedPolicies:
    """Checks both policy names and loads the checkpoints they name; ConfigError names the field."""
    learned: dict[str, LearnedPolicy] = {}
    allocation = _load("allocation", config.allocation.policy, ALLOCATORS)
    if allocation is not None:
        unknown = sorted(set(config.allocation.params))
        if unknown:
            raise ConfigError(f"allocation.params: a learned allocator takes none, got {unknown}")
        learned["allocation"] = allocation
    shadow = config.allocation.shadow
    if shadow is not None:
        loaded = _load("allocation", shadow, ALLOCATORS, field="shadow")
        if loaded is not None:
            if config.allocation.shadow_params:
                raise ConfigError(
                    "allocation.shadow_params: a learned allocator takes none, got "
                    f"{sorted(config.allocation.shadow_params)}"
                )
            learned["shadow"] = loaded
        else:
            _check_params("allocation.shadow_params", shadow, config.allocation.shadow_params)
    routing = _load("routing", config.routing.policy, ROUTERS)
    if routing is not None:
        if config.routing.params:
            raise ConfigError(
                f"routing.params: a learned router takes none, got {sorted(config.routing.params)}"
            )
        learned["routing"] = routing
    return LoadedPolicies(learned)


def configured_allocator(config: ServiceConfig, loaded: LoadedPolicies) -> Allocator:
    """Level 2's policy (to be wrapped in the guardrails)."""
    policy = loaded.learned.get("allocation")
    if policy is None:
        return make_allocator(config.allocation.policy, **config.allocation.params)
    return policy.allocator(bounds=config.bounds(), max_moves=config.allocation.max_moves_per_tick)


def configured_shadow(config: ServiceConfig, loaded: LoadedPolicies) -> Allocator | None:
    """Level 2's shadow policy (to be wrapped in the guardrails), or None without one."""
    name = config.allocation.shadow
    if name is None:
        return None
    policy = loaded.learned.get("shadow")
    if policy is None:
        return make_allocator(name, **config.allocation.shadow_params)
    return policy.allocator(bounds=config.bounds(), max_moves=config.allocation.max_moves_per_tick)


def _check_params(field: str, name: str, params: Mapping[str, Any]) -> None:
    """A heuristic built once with `params`, so a wrong parameter fails the start, not a tick."""
    try:
        make_allocator(name, **params)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{field}: {exc}") from None


def configured_router(config: ServiceConfig, loaded: LoadedPolicies) -> Router:
    """Level 1's policy."""
    policy = loaded.learned.get("routing")
    if policy is None:
        return make_router(config.routing.policy, **config.routing.params)
    return policy.router()


__all__ = [
    "LoadedPolicies",
    "configured_allocator",
    "configured_router",
    "configured_shadow",
    "load_policies",
]
