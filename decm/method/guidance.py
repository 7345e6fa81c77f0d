"""Teacher guidance: classifier-free guidance with velocity-norm clipping and a guidance interval.

CFG is baked into the distillation targets, so the student samples without CFG.
"""

from __future__ import annotations

import torch

from decm.method.shapes import bcast, per_sample_norm
from decm.registry import register


@register("guidance", "no_guidance")
class NoGuidance:
    """v = v_φ(x, t, y): the teacher's conditional (or unconditional) velocity, one forward."""

    def __call__(self, teacher, x, t, y):
        with torch.no_grad():
            return teacher(x, t, y)


@register("guidance", "cfg")
class CFG:
    """CFG with norm clipping: v = v_c + (w − 1)·min(1, η/‖Δv‖)·Δv, Δv = v_c − v_u, for t in [t_lo, t_hi].

    The conditional and unconditional velocities come from one batched teacher forward. η = inf is
    plain CFG; outside the interval the conditional velocity is used (FACM: CFG only for t > 0.125).

    Args:
      scale: guidance scale w (paper: 1.75; 1 disables guidance and skips the unconditional pass).
      clip_norm: η, the largest per-sample ‖(w−1)… Δv‖ pre-factor norm; inf disables clipping.
      interval: (t_lo, t_hi) where guidance is applied (t = 0 noise).
      null_class: label of the unconditional (dropped) class; None uses `teacher.num_classes`.
    """

    def __init__(self, scale: float = 1.75, clip_norm: float = float("inf"),
                 interval: tuple[float, float] = (0.0, 1.0), null_class: int | None = None):
        self.scale, self.clip_norm, self.interval, self.null_class = scale, clip_norm, tuple(interval), null_class

    def __call__(self, teacher, x, t, y):
        with torch.no_grad():
            if self.scale == 1.0 or y is None:
                return teacher(x, t, y)
            null = self.null_class if self.null_class is not None else teacher.num_classes
            y_null = torch.full_like(y, null)
            v = teacher(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, y_null]))
            v_cond, v_uncond = v.chunk(2)
            delta = v_cond - v_uncond
            factor = bcast(torch.clamp(self.clip_norm / per_sample_norm(delta).clamp_min(1e-12), max=1.0), x)
            guided = v_cond + (self.scale - 1.0) * factor * delta
            lo, hi = self.interval
            inside = bcast((t >= lo) & (t <= hi), x).bool()
            return torch.where(inside, guided, v_cond)
