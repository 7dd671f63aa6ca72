"""The torch networks behind the learned allocator (level 2) and router (level 1).

Both are permutation-equivariant by construction: every per-queue (or per-(job, queue)) row goes
through the same weights, and the only cross-queue information is a mean and a max over queues,
which do not depend on queue order. So permuting the queues permutes the per-queue outputs and leaves
the global outputs unchanged, and one set of weights serves 1 or 256 queues.

Hyper-parameters live in small frozen dataclasses that checkpoints store next to the weights, so a
checkpoint can rebuild exactly the network it was trained with.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from policies.features import N_BASE_FEATURES, N_JOB_QUEUE_FEATURES, N_QUEUE_FEATURES
from policies.regime import N_REGIME_FEATURES

# Initial bias of the "stop" logit: an untrained allocator should mostly hold its workers, since
# every move costs a model load; with logit 2 against ~0 for each queue, it stops at once with
# probability about e^2 / (e^2 + n) (0.7 for 3 queues), so early rollouts are not pure thrash.
_STOP_BIAS = 2.0


# One base heuristic of a residual allocator: its registry name and constructor parameters.
BaseSpec = tuple[str, dict[str, float]]


@dataclass(frozen=True, slots=True)
class AllocatorNetConfig:
    """Shape of `QueueSetNet`, and the base heuristics a residual allocator corrects."""

    # Width of the per-queue encoder, the pooled summary and the per-queue head.
    hidden: int = 64
    n_features: int = N_QUEUE_FEATURES
    # A residual allocator: heuristics whose proposals the moves may start from. Each tick a gate
    # (a global softmax over the queue features alone) picks one, and the moves correct its
    # proposal, whose features (`policies.features.base_features`) the per-queue head sees;
    # stopping at once reproduces it. Only the picked base has to run, which keeps a tick cheap.
    # Empty: the moves start from the current allocation. `residual` builds one and sizes the input.
    bases: tuple[BaseSpec, ...] = ()
    # Initial bias of the stop logit (see `_STOP_BIAS`) and of the first base's gate logit (the
    # others start at 0); they only shape freshly built networks.
    stop_bias: float = _STOP_BIAS
    gate_bias: float = _STOP_BIAS
    # A target head (residual allocators only): one more option for the gate, whose proposal is the
    # network's own split of the budget, from per-queue target-share logits of a second equivariant
    # network that also sees each queue's burst regime (`policies.regime`), applied through the
    # regime allocator's hold rule with factor `target_hold`. It is trained by imitating a regime
    # table found by policy search (`policies.learned.regime_search`), not by the policy gradient.
    target_head: bool = False
    target_hold: float = 2.0
    # Time constant of the slow rate average the regime features compare against.
    slow_s: float = 600.0

    def __post_init__(self) -> None:
        # JSON metadata gives lists; keep the frozen config hashable-looking and comparable.
        bases = tuple((str(name), dict(params)) for name, params in self.bases)
        object.__setattr__(self, "bases", bases)
        wanted = N_QUEUE_FEATURES + (N_BASE_FEATURES if bases else 0)
        if self.n_features != wanted:
            raise ValueError(f"n_features must be {wanted} with {len(bases)} base heuristics")
        if self.target_head and not bases:
            raise ValueError("a target head is a gate option: it needs at least one base heuristic")
        for name, value in (("target_hold", self.target_hold), ("slow_s", self.slow_s)):
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value}")

    @property
    def n_options(self) -> int:
        """Gate options: the bases, then the target head if there is one."""
        return len(self.bases) + int(self.target_head)

    @classmethod
    def residual(
        cls,
        bases: Sequence[BaseSpec],
        *,
        hidden: int = 64,
        stop_bias: float = _STOP_BIAS,
        gate_bias: float = _STOP_BIAS,
        target_head: bool = False,
    ) -> AllocatorNetConfig:
        """A network that picks one of `bases` (or, with `target_head`, its own targets) and
        corrects that proposal."""
        if not bases:
            raise ValueError("a residual allocator needs at least one base heuristic")
        return cls(
            hidden=hidden,
            n_features=N_QUEUE_FEATURES + N_BASE_FEATURES,
            bases=tuple(bases),
            stop_bias=stop_bias,
            gate_bias=gate_bias,
            target_head=target_head,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class RouterNetConfig:
    """Shape of `JobQueueScorer`."""

    hidden: int = 32
    n_features: int = N_JOB_QUEUE_FEATURES

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class QueueSetOutput:
    """What `QueueSetNet` says about one batch of views (B views of n queues each)."""

    # (B, n): preference for giving a worker to each queue.
    receiver_logits: torch.Tensor
    # (B, n): preference for taking a worker from each queue.
    donor_logits: torch.Tensor
    # (B,): preference for taking from the unassigned pool rather than a queue.
    pool_logit: torch.Tensor
    # (B,): preference for stopping (no further move this tick) at the first step.
    stop_logit: torch.Tensor
    # (B,) >= 0: how much the stop preference grows per move already made this tick.
    stop_slope: torch.Tensor
    # (B, K): preference for starting from each gate option's proposal: the base heuristics, then
    # the target head if any (K = 0: not residual).
    gate_logits: torch.Tensor


def _layer(n_in: int, n_out: int, gain: float = 2.0**0.5) -> nn.Linear:
    """Orthogonal weights and zero bias, as cleanrl's `layer_init`: well-conditioned at start."""
    linear = nn.Linear(n_in, n_out)
    nn.init.orthogonal_(linear.weight, gain)
    nn.init.zeros_(linear.bias)
    return linear


def stop_offset(config: AllocatorNetConfig, n_queues: int) -> float:
    """Added to a residual allocator's stop logit: log(n) makes the chance of leaving the base
    proposal alone the same for 3 queues as for 60 (against n receiver logits near 0 it is
    e^b / (e^b + 1) for stop bias b), so exploration does not grow with the queue count."""
    return math.log(n_queues) if config.bases and n_queues > 0 else 0.0


class TargetShareNet(nn.Module):
    """Per-queue target-share logits from queue and regime features (B, n, F + R) -> (B, n).

    Its own encoder and mean+max pooling (the same shape as `QueueSetNet`'s), because a queue's
    share depends on which *other* queues burst, which the main summary does not see.
    """

    def __init__(self, hidden: int) -> None:
        super().__init__()
        n_in = N_QUEUE_FEATURES + N_REGIME_FEATURES
        self.encoder = nn.Sequential(
            _layer(n_in, hidden), nn.Tanh(), _layer(hidden, hidden), nn.Tanh()
        )
        self.head = nn.Sequential(
            _layer(3 * hidden, hidden), nn.Tanh(), _layer(hidden, 1, gain=0.01)
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        encoded = self.encoder(features)
        pooled = torch.cat([encoded.mean(dim=-2), encoded.amax(dim=-2)], dim=-1)
        logits: torch.Tensor = self.head(
            torch.cat([encoded, pooled.unsqueeze(-2).expand(*encoded.shape[:-1], -1)], dim=-1)
        ).squeeze(-1)
        return logits


class QueueSetNet(nn.Module):
    """Shared per-queue encoder -> mean+max pooling across queues -> per-queue and global heads.

    Input: queue features (B, n, F) as `policies.features.queue_features` gives them (n >= 1),
    for a residual network followed by the picked base's `base_features` columns, which only the
    per-queue head sees: the encoder, the pooled summary and so the gate depend on the queue
    features alone, so the gate can pick before any base runs.
    """

    def __init__(self, config: AllocatorNetConfig | None = None) -> None:
        super().__init__()
        self.config = config if config is not None else AllocatorNetConfig()
        h = self.config.hidden
        self.encoder = nn.Sequential(
            _layer(N_QUEUE_FEATURES, h), nn.Tanh(), _layer(h, h), nn.Tanh()
        )
        # Integration layer: a summary of the whole cluster from order-free pooling.
        self.integrate = nn.Sequential(_layer(2 * h, h), nn.Tanh())
        # Per-queue head sees its own encoding beside the cluster summary (and the base's proposal).
        # Small output gain (cleanrl uses 0.01 for the actor) keeps the first policy near uniform.
        n_base = self.config.n_features - N_QUEUE_FEATURES
        self.queue_head = nn.Sequential(
            _layer(2 * h + n_base, h), nn.Tanh(), _layer(h, 2, gain=0.01)
        )
        # Stop, stop slope, pool, then one gate logit per option (bases, then the target head).
        self.global_head = _layer(h, 3 + self.config.n_options, gain=0.01)
        self.target_net = TargetShareNet(h) if self.config.target_head else None
        with torch.no_grad():
            self.global_head.bias[0] = self.config.stop_bias
            if self.config.bases:
                self.global_head.bias[3] = self.config.gate_bias

    def forward(self, features: torch.Tensor) -> QueueSetOutput:
        encoded = self.encoder(features[..., :N_QUEUE_FEATURES])  # (B, n, h)
        pooled = torch.cat([encoded.mean(dim=1), encoded.amax(dim=1)], dim=-1)
        summary = self.integrate(pooled)  # (B, h)
        n = encoded.shape[1]
        per_queue = self.queue_head(
            torch.cat(
                [encoded, summary.unsqueeze(1).expand(-1, n, -1), features[..., N_QUEUE_FEATURES:]],
                -1,
            )
        )
        glob = self.global_head(summary)
        return QueueSetOutput(
            receiver_logits=per_queue[..., 0],
            donor_logits=per_queue[..., 1],
            stop_logit=glob[:, 0] + stop_offset(self.config, n),
            stop_slope=nn.functional.softplus(glob[:, 1]),
            pool_logit=glob[:, 2],
            gate_logits=glob[:, 3:],
        )


@dataclass(frozen=True, slots=True)
class QueueSetOutputNp:
    """`QueueSetOutput` of a single view, as numpy (float64) for the per-tick decision loop."""

    receiver_logits: np.ndarray  # (n,)
    donor_logits: np.ndarray  # (n,)
    pool_logit: float
    stop_logit: float
    stop_slope: float
    gate_logits: np.ndarray  # (K,)


@dataclass(frozen=True, slots=True)
class EncodedNp:
    """`QueueSetNetNp.encode`'s result: per-queue encodings, the summary, the global outputs."""

    encoded: np.ndarray  # (n, h)
    summary: np.ndarray  # (h,)
    glob: np.ndarray  # (3 + K,) float64: stop, slope, pool, gate logits


# OpenBLAS splits one matrix product over its threads once M*N*K exceeds 65,536 x 4 (its
# GEMM_MULTITHREAD_THRESHOLD); for the (n, 64) x (64, 64) products of a few hundred queues the
# hand-off to other threads costs milliseconds on a machine whose cores are busy, 20-50x the
# arithmetic. Row blocks under that size run on the calling thread, whatever the thread settings of
# the process (which a library must not change).
_SINGLE_THREAD_MNK = 65_536 * 4


def matmul_rows(a: np.ndarray, w: np.ndarray) -> np.ndarray:
    """`a @ w` for a 2-D `a`, in row blocks small enough that BLAS keeps each on this thread.

    Each output row depends only on its own input row, so the blocks give the same rows as one
    product (up to the kernel's float rounding)."""
    rows = max(1, _SINGLE_THREAD_MNK // max(1, w.shape[0] * w.shape[1]))
    if a.shape[0] <= rows:
        out: np.ndarray = a @ w
        return out
    blocks = [a[i : i + rows] @ w for i in range(0, a.shape[0], rows)]
    return np.concatenate(blocks)


def linear_np(layer: nn.Module) -> tuple[np.ndarray, np.ndarray]:
    """A frozen copy of an `nn.Linear`'s (weight transposed, bias), for `x @ w + b` in numpy."""
    assert isinstance(layer, nn.Linear)
    return layer.weight.detach().numpy().T.copy(), layer.bias.detach().numpy().copy()


class QueueSetNetNp:
    """A frozen numpy copy of a `QueueSetNet` for one view at a time.

    Torch spends ~10 us of dispatch per op, which for one small view is most of the cost; the same
    arithmetic in numpy on float32 is several times faster and gives the same logits up to float
    rounding (a unit test compares them). Weights are copied at construction: later training steps
    on the torch module do not show here.
    """

    def __init__(self, net: QueueSetNet) -> None:
        self.enc1, self.enc2 = linear_np(net.encoder[0]), linear_np(net.encoder[2])
        self.integrate = linear_np(net.integrate[0])
        self.head1, self.head2 = linear_np(net.queue_head[0]), linear_np(net.queue_head[2])
        self.glob = linear_np(net.global_head)
        self.hidden = net.config.hidden
        self.config = net.config
        self.target: list[tuple[np.ndarray, np.ndarray]] = []
        if net.target_net is not None:
            t = net.target_net
            self.target = [linear_np(t.encoder[0]), linear_np(t.encoder[2])]
            self.target += [linear_np(t.head[0]), linear_np(t.head[2])]

    def target_logits(self, features: np.ndarray) -> np.ndarray:
        """`TargetShareNet` on one view's (n, F + R) queue and regime features -> (n,) float64."""
        (w1, b1), (w2, b2), (w3, b3), (w4, b4) = self.target
        encoded = np.tanh(matmul_rows(np.tanh(matmul_rows(features, w1) + b1), w2) + b2)
        h = self.hidden
        pooled = np.concatenate([encoded.mean(axis=0), encoded.max(axis=0)])
        hidden = np.tanh(matmul_rows(encoded, w3[:h]) + (pooled @ w3[h:] + b3))
        out: np.ndarray = (matmul_rows(hidden, w4) + b4)[:, 0].astype(np.float64)
        return out

    def encode(self, queue_features: np.ndarray) -> EncodedNp:
        """The stage that depends on the queue features (n, N_QUEUE_FEATURES) alone."""
        encoded = np.tanh(matmul_rows(queue_features, self.enc1[0]) + self.enc1[1])
        encoded = np.tanh(matmul_rows(encoded, self.enc2[0]) + self.enc2[1])
        pooled = np.concatenate([encoded.mean(axis=0), encoded.max(axis=0)])
        summary = np.tanh(pooled @ self.integrate[0] + self.integrate[1])
        glob = (summary @ self.glob[0] + self.glob[1]).astype(np.float64)
        return EncodedNp(encoded, summary, glob)

    def heads(self, encoding: EncodedNp, base: np.ndarray) -> QueueSetOutputNp:
        """The outputs, given `encode`'s result and the picked base's (n, N_BASE_FEATURES)
        features (n, 0 for a network without bases)."""
        h = self.hidden
        # (encoded | summary | base) @ W splits into encoded @ W[:h] + summary @ W[h:2h] + ...:
        # no (n, 2h) concat.
        w1, b1 = self.head1
        pre = matmul_rows(encoding.encoded, w1[:h]) + (encoding.summary @ w1[h : 2 * h] + b1)
        if base.shape[1]:
            pre += matmul_rows(base, w1[2 * h :])
        hidden = np.tanh(pre)
        per_queue = (matmul_rows(hidden, self.head2[0]) + self.head2[1]).astype(np.float64)
        glob = encoding.glob
        return QueueSetOutputNp(
            receiver_logits=per_queue[:, 0],
            donor_logits=per_queue[:, 1],
            stop_logit=float(glob[0]) + stop_offset(self.config, len(per_queue)),
            stop_slope=float(np.logaddexp(0.0, glob[1])),  # softplus
            pool_logit=float(glob[2]),
            gate_logits=glob[3:],
        )

    def __call__(self, features: np.ndarray) -> QueueSetOutputNp:
        """Outputs for one view's (n, F) float32 features (n >= 1), as the torch network's input."""
        return self.heads(
            self.encode(features[:, :N_QUEUE_FEATURES]), features[:, N_QUEUE_FEATURES:]
        )


class JobQueueScorer(nn.Module):
    """Scores each (job, queue) row of `policies.features.job_queue_features` independently.

    The rows already carry the queue's state (expected wait, depth, workers) next to the job's, so a
    per-row MLP is enough for a softmax over the eligible queues; it is equivariant trivially.
    """

    def __init__(self, config: RouterNetConfig | None = None) -> None:
        super().__init__()
        self.config = config if config is not None else RouterNetConfig()
        h = self.config.hidden
        self.body = nn.Sequential(
            _layer(self.config.n_features, h),
            nn.Tanh(),
            _layer(h, h),
            nn.Tanh(),
            _layer(h, 1, gain=0.01),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(..., m, F) rows -> (..., m) scores."""
        scores: torch.Tensor = self.body(features).squeeze(-1)
        return scores
