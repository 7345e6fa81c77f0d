"""Trajectory selectors: choose the (t, s) sub-trajectory pairs a loss term trains on.

A selector maps base times u (from the objective's time sampler, shape (B,)) and the training step to
a pair (t, s) with t ≤ s: the student learns the flow map f(x_t, t, s) from time t to time s.
"""

from __future__ import annotations

import torch

from decm.registry import register


class Selector:
    """Base class: `selector(u, step, generator) -> (t, s)`."""

    def __call__(self, u: torch.Tensor, step: int, generator=None):
        raise NotImplementedError


@register("selectors", "consistency")
class Consistency(Selector):
    """Consistency cluster: s = 1 (jump to data), t = u. Trains f(x_t, t, 1) with L_cm.

    Args:
      t_max: largest t used (t = 1 makes the flow map the identity, an empty constraint).
    """

    def __init__(self, t_max: float = 1.0):
        self.t_max = t_max

    def __call__(self, u, step, generator=None):
        t = u.clamp(max=self.t_max)
        return t, torch.ones_like(t)


@register("selectors", "instantaneous")
class Instantaneous(Selector):
    """Instantaneous cluster: s = t (the boundary, where F is the velocity). Trains with L_fm."""

    def __call__(self, u, step, generator=None):
        return u, u


def r_schedule(step: int, delta: float, decay_steps: int) -> float:
    """Linear decay r_max(step) = max(0, (1 − step / decay_steps)·δ); decay_steps ≤ 0 keeps δ."""
    if decay_steps <= 0:
        return delta
    return max(0.0, (1.0 - step / decay_steps) * delta)


@register("selectors", "noise_to_noisy")
class NoiseToNoisy(Selector):
    """N2N cluster: from r ≈ 0 to any t: r = max(0, (1 − step/decay)·δ), t = r + (t_max − r)·u.

    Args:
      delta: initial r (paper: 0.1).
      decay_steps: steps over which r decays linearly to 0 (paper: 20000; ≤ 0 disables decay).
      r_sampling: 'fixed' uses r_max(step) for every sample (paper note); 'uniform' draws
        r ~ U(0, r_max(step)) per sample.
      t_max: largest end time t (paper: 1, "to any point"). Below 1, N2N trains only the noise end of
        the trajectory and leaves the long spans to t ≈ 1 to the consistency cluster (our option; see
        README "N2N diagnostic" for why).
    """

    def __init__(self, delta: float = 0.1, decay_steps: int = 20000, r_sampling: str = "fixed", t_max: float = 1.0):
        if r_sampling not in ("fixed", "uniform"):
            raise ValueError(f"noise_to_noisy.r_sampling must be 'fixed' or 'uniform', got {r_sampling!r}")
        if not delta < t_max <= 1.0:
            raise ValueError(f"noise_to_noisy.t_max must be in (delta, 1], got {t_max!r} (delta {delta!r})")
        self.delta, self.decay_steps, self.r_sampling, self.t_max = delta, decay_steps, r_sampling, t_max

    def __call__(self, u, step, generator=None):
        r_max = r_schedule(step, self.delta, self.decay_steps)
        if self.r_sampling == "fixed":
            r = torch.full_like(u, r_max)
        else:
            r = torch.rand(u.shape, generator=generator).to(u) * r_max
        t = r + (self.t_max - r) * u
        return r, t


@register("selectors", "general_pairs")
class GeneralPairs(Selector):
    """General (t, s) pairs (MeanFlow-style): two draws sorted so t ≤ s; a fraction has s = t.

    The second draw is uniform on [0, 1] (the first is the objective's time sampler).

    Args:
      equal_fraction: fraction of the batch with s = t (MeanFlow: 0.75).
    """

    def __init__(self, equal_fraction: float = 0.75):
        self.equal_fraction = equal_fraction

    def __call__(self, u, step, generator=None):
        v = torch.rand(u.shape, generator=generator).to(u)
        t, s = torch.minimum(u, v), torch.maximum(u, v)
        equal = torch.rand(u.shape, generator=generator).to(u) < self.equal_fraction
        s = torch.where(equal, t, s)
        return t, s
