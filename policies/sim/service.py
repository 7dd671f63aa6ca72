"""Service-time models: how long one job of a type takes on one worker.

Each model is a small validated config (it is also the scenario file's schema) that draws service
times for many jobs in one vectorised call and gives the size estimate a scheduler could know in
advance (the model's mean, or the exact token formula).
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field, model_validator

FloatArray = NDArray[np.float64]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def sample_s(
        self, n: int, rng: np.random.Generator, tokens_in: FloatArray, tokens_out: FloatArray
    ) -> FloatArray:
        """Draws `n` service times in seconds; token arrays hold NaN where unknown."""
        raise NotImplementedError

    def estimate_s(self, tokens_in: FloatArray, tokens_out: FloatArray) -> FloatArray:
        """What a scheduler may know about each job's size before running it (seconds)."""
        return np.full(len(tokens_in), self.nominal_mean_s)

    @property
    def nominal_mean_s(self) -> float:
        """Mean service seconds when nothing about the job is known."""
        raise NotImplementedError

    @property
    def needs_tokens(self) -> bool:
        """True when every job must carry token counts."""
        return False


class ConstantService(_Model):
    """Every job takes exactly `mean_s`."""

    kind: Literal["constant"] = "constant"
    mean_s: float = Field(gt=0)

    def sample_s(
        self, n: int, rng: np.random.Generator, tokens_in: FloatArray, tokens_out: FloatArray
    ) -> FloatArray:
        return np.full(n, self.mean_s)

    @property
    def nominal_mean_s(self) -> float:
        return self.mean_s


class ExponentialService(_Model):
    """Exponential service (the M in M/M/c)."""

    kind: Literal["exponential"] = "exponential"
    mean_s: float = Field(gt=0)

    def sample_s(
        self, n: int, rng: np.random.Generator, tokens_in: FloatArray, tokens_out: FloatArray
    ) -> FloatArray:
        return rng.exponential(self.mean_s, size=n)

    @property
    def nominal_mean_s(self) -> float:
        return self.mean_s


class LognormalService(_Model):
    """Lognormal service with the given mean and either `cv` or the log-space `sigma`."""

    kind: Literal["lognormal"] = "lognormal"
    mean_s: float = Field(gt=0)
    cv: float | None = Field(default=None, gt=0)
    sigma: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _one_spread(self) -> LognormalService:
        if (self.cv is None) == (self.sigma is None):
            raise ValueError("give exactly one of cv or sigma")
        return self

    @property
    def log_sigma(self) -> float:
        """Sigma of the underlying normal; cv^2 = exp(sigma^2) - 1 for a lognormal."""
        if self.sigma is not None:
            return self.sigma
        assert self.cv is not None
        return math.sqrt(math.log1p(self.cv * self.cv))

    def sample_s(
        self, n: int, rng: np.random.Generator, tokens_in: FloatArray, tokens_out: FloatArray
    ) -> FloatArray:
        sigma = self.log_sigma
        # E[exp(N(mu, sigma^2))] = exp(mu + sigma^2 / 2), so this mu gives the requested mean.
        mu = math.log(self.mean_s) - sigma * sigma / 2
        return rng.lognormal(mu, sigma, size=n)

    @property
    def nominal_mean_s(self) -> float:
        return self.mean_s


class ParetoService(_Model):
    """Classic Pareto service: heavy tail with index `alpha` > 1 and the given mean.

    Smaller `alpha` means a heavier tail; the variance is infinite for alpha <= 2.
    """

    kind: Literal["pareto"] = "pareto"
    mean_s: float = Field(gt=0)
    alpha: float = Field(gt=1)

    def sample_s(
        self, n: int, rng: np.random.Generator, tokens_in: FloatArray, tokens_out: FloatArray
    ) -> FloatArray:
        # Classic Pareto with minimum x_m has mean alpha * x_m / (alpha - 1); numpy draws Lomax,
        # which is the classic one shifted by 1, hence (1 + lomax) * x_m.
        x_min_s = self.mean_s * (self.alpha - 1) / self.alpha
        return (1.0 + rng.pareto(self.alpha, size=n)) * x_min_s

    @property
    def nominal_mean_s(self) -> float:
        return self.mean_s


class TokenLinearService(_Model):
    """Service = a_s + b_s_per_token_in * tokens_in + c_s_per_token_out * tokens_out.

    With `noise_cv` > 0 the result is multiplied by a mean-one lognormal factor, so the formula is
    the scheduler's estimate and the noise is what it cannot know.
    """

    kind: Literal["tokens"] = "tokens"
    a_s: float = Field(ge=0)
    b_s_per_token_in: float = Field(default=0.0, ge=0)
    c_s_per_token_out: float = Field(default=0.0, ge=0)
    noise_cv: float = Field(default=0.0, ge=0)

    @model_validator(mode="after")
    def _positive(self) -> TokenLinearService:
        if self.a_s == 0 and self.b_s_per_token_in == 0 and self.c_s_per_token_out == 0:
            raise ValueError("at least one of a_s, b_s_per_token_in, c_s_per_token_out must be > 0")
        return self

    def estimate_s(self, tokens_in: FloatArray, tokens_out: FloatArray) -> FloatArray:
        t_in = np.nan_to_num(tokens_in, nan=0.0)
        t_out = np.nan_to_num(tokens_out, nan=0.0)
        est: FloatArray = self.a_s + self.b_s_per_token_in * t_in + self.c_s_per_token_out * t_out
        # A job with no tokens and a_s = 0 would take no time; a microsecond keeps events ordered.
        return np.maximum(est, 1e-6)

    def sample_s(
        self, n: int, rng: np.random.Generator, tokens_in: FloatArray, tokens_out: FloatArray
    ) -> FloatArray:
        est = self.estimate_s(tokens_in, tokens_out)
        if self.noise_cv == 0:
            return est
        sigma = math.sqrt(math.log1p(self.noise_cv**2))
        factor: FloatArray = rng.lognormal(-sigma * sigma / 2, sigma, size=n)
        return est * factor

    @property
    def nominal_mean_s(self) -> float:
        return self.a_s if self.a_s > 0 else 1.0

    @property
    def needs_tokens(self) -> bool:
        return self.b_s_per_token_in > 0 or self.c_s_per_token_out > 0


ServiceModel = Annotated[
    ConstantService | ExponentialService | LognormalService | ParetoService | TokenLinearService,
    Field(discriminator="kind"),
]
