"""Teacher pretraining objective: conditional flow matching with label dropout (for CFG)."""

from __future__ import annotations

import torch
from torch import nn

from decm.method.jvp import unwrap
from decm.method.shapes import bcast
from decm.method.time_samplers import Uniform
from decm.registry import register


@register("objectives", "flow_matching_pretrain")
class FlowMatchingPretrain(nn.Module):
    """Teacher stage: ‖v_θ(x_t, t, y′) − (x₁ − z)‖², x_t = (1 − t)z + t·x₁, y′ = null with prob p.

    Args:
      time_sampler: draws t (default uniform).
      label_dropout: probability of replacing the label by the null class (CFG training).
    """

    def __init__(self, time_sampler=None, label_dropout: float = 0.1):
        super().__init__()
        self.time_sampler = time_sampler or Uniform()
        self.label_dropout = label_dropout

    def forward(self, model, teacher, x1, y, step, generator=None):
        z = torch.randn(x1.shape, generator=generator, dtype=x1.dtype).to(x1.device)
        t = self.time_sampler(x1.shape[0], generator).to(x1.device, x1.dtype)
        drop = torch.rand(x1.shape[0], generator=generator).to(x1.device) < self.label_dropout
        if y is not None:
            y = torch.where(drop, torch.full_like(y, unwrap(model).num_classes), y)
        tb = bcast(t, x1)
        x_t = (1 - tb) * z + tb * x1
        target = x1 - z
        per_sample = ((model(x_t, t, t, y) - target) ** 2).flatten(1).mean(1)
        loss = per_sample.mean()
        return loss, {"loss/fm_pretrain": float(loss.detach()), "loss/total": float(loss.detach()),
                      "nan/masked_samples": 0}, None
