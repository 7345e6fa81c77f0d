"""Flow-map MLP for low-dimensional data, with the same interface as the DiT: F(x, t, s, y)."""

from __future__ import annotations

import math

import torch
from torch import nn

from decm.dtypes import at_least_fp32
from decm.models.sit import flow_map_condition
from decm.registry import register


class FourierTime(nn.Module):
    """Fixed sinusoidal features of t (frequencies 1 … max_freq, log-spaced) and a 2-layer MLP."""

    def __init__(self, width: int, n_freqs: int = 16, max_freq: float = 100.0):
        super().__init__()
        self.register_buffer("freqs", torch.exp(torch.linspace(0, math.log(max_freq), n_freqs)))
        self.mlp = nn.Sequential(nn.Linear(2 * n_freqs, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t):
        ang = t.to(at_least_fp32(t.dtype)).unsqueeze(1) * self.freqs.to(at_least_fp32(t.dtype)).unsqueeze(0)
        return self.mlp(torch.cat([ang.cos(), ang.sin()], 1).to(self.mlp[0].weight.dtype))


class ResBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1, self.fc2 = nn.Linear(width, 2 * width), nn.Linear(2 * width, width)
        self.mod = nn.Linear(width, 2 * width)

    def forward(self, h, c):
        scale, shift = self.mod(c).chunk(2, dim=1)
        return h + self.fc2(torch.nn.functional.silu(self.fc1(self.norm(h) * (1 + scale) + shift)))


class FlowMapMLP(nn.Module):
    """Residual MLP flow map F(x, t, s, y) with conditioning c = t_emb(t) + s_emb(s) + y_emb(y).

    Args:
      dim: data dimension.
      width: hidden width.
      depth: residual blocks.
      num_classes: classes (0: unconditional; index num_classes is the null class).
      flow_map: adds the s-embedder with a zero-initialised output layer.
    """

    def __init__(self, dim=2, width=256, depth=4, num_classes=0, flow_map=True):
        super().__init__()
        self.num_classes, self.flow_map = num_classes, flow_map
        self.inp = nn.Linear(dim, width)
        self.t_embedder = FourierTime(width)
        self.s_embedder = FourierTime(width) if flow_map else None
        if self.s_embedder is not None:
            nn.init.zeros_(self.s_embedder.mlp[2].weight)
            nn.init.zeros_(self.s_embedder.mlp[2].bias)
        self.y_embedder = nn.Embedding(num_classes + 1, width) if num_classes > 0 else None
        self.blocks = nn.ModuleList([ResBlock(width) for _ in range(depth)])
        self.out = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, dim))

    def forward(self, x, t, s=None, y=None):
        c = flow_map_condition(self, t, s, y)
        h = self.inp(x)
        for block in self.blocks:
            h = block(h, c)
        return self.out(h)


@register("backbones", "mlp", denylist=("dim", "num_classes", "flow_map"))
def mlp(width: int = 256, depth: int = 4, dim: int = 2, num_classes: int = 0, flow_map: bool = True) -> FlowMapMLP:
    """Flow-map residual MLP for 2-D data (same interface as sit).

    Args:
      width: hidden width.
      depth: residual blocks.
      dim: data dimension (set by the dataset).
      num_classes: classes (set by the dataset).
      flow_map: add the zero-initialised s input.
    """
    return FlowMapMLP(dim=dim, width=width, depth=depth, num_classes=num_classes, flow_map=flow_map)
