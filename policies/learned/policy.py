"""A learned policy as one value: its networks, their shapes, and the allocator's move limit.

This is what a checkpoint holds (`scheduler.checkpoints` writes it to files), what training ships to
rollout workers (it pickles as weights bytes plus configs, never as live modules), and what builds
the `LearnedAllocator` and `LearnedRouter` objects the simulator and the service run.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from policies.learned.allocator import LearnedAllocator
from policies.learned.forecast import ForecasterConfig, RateForecaster, RateForecastNet
from policies.learned.networks import (
    AllocatorNetConfig,
    JobQueueScorer,
    QueueSetNet,
    RouterNetConfig,
)
from policies.learned.router import LearnedRouter
from policies.registry import make_allocator
from policies.views import AllocationBounds


@dataclass(eq=False)
class LearnedPolicy:
    """The allocator network, the router network, how many moves a tick may make, and optionally
    the arrival-rate forecaster the allocator plans with (`policies.learned.forecast`)."""

    allocator_net: QueueSetNet = field(default_factory=QueueSetNet)
    router_net: JobQueueScorer = field(default_factory=JobQueueScorer)
    max_moves: int = 4
    forecaster_net: RateForecastNet | None = None

    def _nets(self) -> list[tuple[str, torch.nn.Module]]:
        """Every network with the prefix its weights carry in a state dict."""
        nets: list[tuple[str, torch.nn.Module]] = [
            ("allocator", self.allocator_net),
            ("router", self.router_net),
        ]
        if self.forecaster_net is not None:
            nets.append(("forecaster", self.forecaster_net))
        return nets

    @classmethod
    def create(
        cls,
        allocator_config: AllocatorNetConfig | None = None,
        router_config: RouterNetConfig | None = None,
        *,
        max_moves: int = 4,
        seed: int | None = None,
        forecaster_config: ForecasterConfig | None = None,
    ) -> LearnedPolicy:
        """Fresh networks (a forecaster only with `forecaster_config`); `seed` makes their initial
        weights reproducible."""
        if seed is not None:
            torch.manual_seed(seed)
        forecaster = RateForecastNet(forecaster_config) if forecaster_config is not None else None
        return cls(
            QueueSetNet(allocator_config), JobQueueScorer(router_config), max_moves, forecaster
        )

    def allocator(
        self,
        *,
        bounds: AllocationBounds | None = None,
        rng: np.random.Generator | None = None,
        record: bool = False,
        max_moves: int | None = None,
        force_base: int | None = None,
        record_forecast: bool = False,
    ) -> LearnedAllocator:
        """A level-2 allocator on these weights (deterministic unless `rng` is given); a residual
        network gets fresh instances of its base heuristics, and a fresh forecasting state, which
        keeps its inputs with `record_forecast` (for fitting the forecaster)."""
        config = self.allocator_net.config
        forecaster = (
            RateForecaster(self.forecaster_net, record=record_forecast)
            if self.forecaster_net is not None
            else None
        )
        return LearnedAllocator(
            self.allocator_net,
            max_moves=self.max_moves if max_moves is None else max_moves,
            bounds=bounds,
            rng=rng,
            record=record,
            bases=[make_allocator(name, **params) for name, params in config.bases],
            forecaster=forecaster,
            force_base=force_base,
        )

    def router(
        self, *, rng: np.random.Generator | None = None, record: bool = False
    ) -> LearnedRouter:
        """A level-1 router on these weights (deterministic unless `rng` is given)."""
        return LearnedRouter(self.router_net, rng=rng, record=record)

    def hyperparameters(self) -> dict[str, Any]:
        """The shapes that rebuild these networks, as JSON-ready data."""
        return {
            "allocator": self.allocator_net.config.to_dict(),
            "router": self.router_net.config.to_dict(),
            "max_moves": self.max_moves,
            "forecaster": (
                self.forecaster_net.config.to_dict() if self.forecaster_net is not None else None
            ),
        }

    @classmethod
    def from_hyperparameters(cls, params: dict[str, Any]) -> LearnedPolicy:
        """Untrained networks of the shapes `hyperparameters()` described (a policy saved before
        forecasters existed has no "forecaster" entry, and gets none)."""
        forecaster = params.get("forecaster")
        return cls(
            QueueSetNet(AllocatorNetConfig(**params["allocator"])),
            JobQueueScorer(RouterNetConfig(**params["router"])),
            int(params["max_moves"]),
            RateForecastNet(ForecasterConfig.from_dict(forecaster))
            if forecaster is not None
            else None,
        )

    def state_dict(self) -> dict[str, Any]:
        """Every network's weights under its prefix ("allocator.", "router.", "forecaster.")."""
        state: dict[str, Any] = {}
        for prefix, net in self._nets():
            for key, value in net.state_dict().items():
                state[f"{prefix}.{key}"] = value
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Loads weights written by `state_dict` (strict: every key must match)."""
        known = {prefix for prefix, _ in self._nets()}
        strays = sorted({k.split(".", 1)[0] for k in state} - known)
        if strays:
            raise ValueError(f"weights for networks this policy does not have: {strays}")
        for prefix, net in self._nets():
            part = {k[len(prefix) + 1 :]: v for k, v in state.items() if k.startswith(prefix + ".")}
            net.load_state_dict(part)

    def to_bytes(self) -> bytes:
        """The weights in torch's zip format (tensors only)."""
        buffer = io.BytesIO()
        torch.save(self.state_dict(), buffer)
        return buffer.getvalue()

    def load_bytes(self, data: bytes) -> None:
        """Loads weights from `to_bytes` output; never unpickles code (weights_only)."""
        self.load_state_dict(torch.load(io.BytesIO(data), weights_only=True))

    def copy(self) -> LearnedPolicy:
        """An independent copy (same shapes and weights)."""
        other = LearnedPolicy.from_hyperparameters(self.hyperparameters())
        other.load_state_dict(self.state_dict())
        return other

    # Rollout tasks cross process boundaries: ship bytes and shapes, not live modules.
    def __getstate__(self) -> dict[str, Any]:
        return {"params": self.hyperparameters(), "weights": self.to_bytes()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        fresh = LearnedPolicy.from_hyperparameters(state["params"])
        self.__dict__.update(fresh.__dict__)
        self.load_bytes(state["weights"])
