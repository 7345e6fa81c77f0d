"""Time samplers: draw t in [0, 1] per sample (t = 0 noise, t = 1 data)."""

from __future__ import annotations

import math

import torch

from decm.registry import register


class TimeSampler:
    """Base class: `sampler(batch, generator) -> t` of shape (batch,), float32 in [0, 1]."""

    def __call__(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        raise NotImplementedError


@register("time_samplers", "uniform")
class Uniform(TimeSampler):
    """t ~ U(0, 1).

    Args:
      t_min: lower clip of t (keeps t away from exact noise where needed).
      t_max: upper clip of t.
    """

    def __init__(self, t_min: float = 0.0, t_max: float = 1.0):
        self.t_min, self.t_max = t_min, t_max

    def __call__(self, batch, generator=None):
        u = torch.rand(batch, generator=generator)
        return self.t_min + (self.t_max - self.t_min) * u


@register("time_samplers", "uniform_segmented")
class UniformSegmented(TimeSampler):
    """Stratified uniform per batch: t_i = (π(i) + u_i) / B, π a random permutation (DE-CM default).

    Every batch covers [0, 1] evenly (one sample per segment of width 1/B), which lowers the variance
    of the batch loss relative to i.i.d. uniform draws.

    Args:
      t_min: lower clip of t.
      t_max: upper clip of t.
    """

    def __init__(self, t_min: float = 0.0, t_max: float = 1.0):
        self.t_min, self.t_max = t_min, t_max

    def __call__(self, batch, generator=None):
        perm = torch.randperm(batch, generator=generator).float()
        u = (perm + torch.rand(batch, generator=generator)) / batch
        return self.t_min + (self.t_max - self.t_min) * u


@register("time_samplers", "logit_normal")
class LogitNormal(TimeSampler):
    """t = sigmoid(n), n ~ N(mean, std²) (SD3 / MeanFlow).

    Args:
      mean: mean of the normal before the sigmoid.
      std: standard deviation before the sigmoid.
    """

    def __init__(self, mean: float = 0.0, std: float = 1.0):
        self.mean, self.std = mean, std

    def __call__(self, batch, generator=None):
        n = torch.randn(batch, generator=generator) * self.std + self.mean
        return torch.sigmoid(n)


@register("time_samplers", "arctan_lognormal")
class ArctanLogNormal(TimeSampler):
    """FACM: t = 1 − (2/π)·arctan(exp(n)), n ~ N(mean, std²); large exp(n) → t → 0 (noise).

    Args:
      mean: mean of the log-σ normal (FACM: −0.8).
      std: standard deviation of the log-σ normal (FACM: 1.6).
    """

    def __init__(self, mean: float = -0.8, std: float = 1.6):
        self.mean, self.std = mean, std

    def __call__(self, batch, generator=None):
        n = torch.randn(batch, generator=generator) * self.std + self.mean
        return 1.0 - (2.0 / math.pi) * torch.atan(torch.exp(n))


@register("time_samplers", "lognormal_sigma")
class LogNormalSigma(TimeSampler):
    """EDM: σ = exp(n), n ~ N(mean, std²), mapped to the linear path by σ = (1 − t)/t, t = 1/(1 + σ).

    Args:
      mean: EDM P_mean (−1.2).
      std: EDM P_std (1.2).
    """

    def __init__(self, mean: float = -1.2, std: float = 1.2):
        self.mean, self.std = mean, std

    def __call__(self, batch, generator=None):
        sigma = torch.exp(torch.randn(batch, generator=generator) * self.std + self.mean)
        return 1.0 / (1.0 + sigma)
