"""CPU-scale distribution distances for 2-D data (exact-reference benchmarks).

Both are computed on float64 samples; sample sizes are arguments (default 4,000 each).
"""

from __future__ import annotations

import torch

from decm.registry import register


@register("metrics", "sliced_wasserstein")
def sliced_wasserstein(x: torch.Tensor, y: torch.Tensor, projections: int = 512, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance: sqrt(mean over random unit directions θ of W₂²(θ·x, θ·y)).

    Each 1-D W₂ is exact on sorted projections (equal sample sizes required); the directions come from
    a fixed seed so two evaluations of the same samples agree exactly.

    Args:
      x: (N, D) samples.
      y: (N, D) samples.
      projections: number of random directions.
      seed: seed of the directions.
    """
    if x.shape != y.shape:
        raise ValueError(f"sliced_wasserstein needs equal shapes, got {tuple(x.shape)} and {tuple(y.shape)}")
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(x.shape[1], projections, generator=g, dtype=torch.float64)
    theta = theta / theta.norm(dim=0, keepdim=True)
    px, _ = torch.sort(x.double() @ theta, dim=0)
    py, _ = torch.sort(y.double() @ theta, dim=0)
    return float(((px - py) ** 2).mean().sqrt())


@register("metrics", "energy_distance")
def energy_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """Energy distance 2E‖X−Y‖ − E‖X−X′‖ − E‖Y−Y′‖ (V-statistic, ≥ 0, 0 iff equal laws).

    Args:
      x: (N, D) samples.
      y: (M, D) samples.
    """
    x, y = x.double(), y.double()
    return float(2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean() - torch.cdist(y, y).mean())
