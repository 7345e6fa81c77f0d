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

    `guided_channels = k` reproduces the official SiT / LightningDiT `forward_with_cfg`
    (willisma/SiT `models.py`, hustvl/LightningDiT `lightningdit.py`): `eps, rest = out[:, :3], out[:, 3:]`,
    only the first k channels are guided and the others are the conditional velocity. The clip norm
    ‖Δv‖ is then taken over the guided channels only, so η acts on the same channels as the guidance.
    FACM's CM training (ali-vilab/FACM `losses.py`, `get_velocity`) calls the plain forward twice and
    guides every channel (`guided_channels = None`). On the guided channels the arithmetic is
    v_c + (w − 1)·Δv; the peers write v_u + w·Δv, equal up to float rounding (tested to 1e-6).

    Args:
      scale: guidance scale w (paper: 1.75; 1 disables guidance and skips the unconditional pass).
      clip_norm: η, the largest per-sample ‖(w−1)… Δv‖ pre-factor norm; inf disables clipping.
      interval: (t_lo, t_hi) where guidance is applied (t = 0 noise).
      null_class: label of the unconditional (dropped) class; None uses `teacher.num_classes`.
      guided_channels: None guides every channel (default); an int k guides channels [0, k) only,
        the official SiT/LightningDiT convention (k = 3). Needs data with a channel axis (dim 1).
    """

    def __init__(self, scale: float = 1.75, clip_norm: float = float("inf"),
                 interval: tuple[float, float] = (0.0, 1.0), null_class: int | None = None,
                 guided_channels: int | None = None):
        if guided_channels is not None and (isinstance(guided_channels, bool) or int(guided_channels) != guided_channels
                                            or guided_channels < 1):
            raise ValueError(f"guidance.cfg.guided_channels must be None or an int ≥ 1, got {guided_channels!r}")
        self.scale, self.clip_norm, self.interval, self.null_class = scale, clip_norm, tuple(interval), null_class
        self.guided_channels = None if guided_channels is None else int(guided_channels)

    def channel_mask(self, x: torch.Tensor) -> torch.Tensor | None:
        """(1, C, 1, ...) mask of the guided channels, or None when every channel is guided."""
        k = self.guided_channels
        if k is None:
            return None
        if x.dim() < 2 or k > x.shape[1]:
            raise ValueError(f"guidance.cfg.guided_channels = {k} needs data with at least {k} channels on dim 1, "
                             f"got shape {tuple(x.shape)}")
        mask = torch.zeros((1, x.shape[1]) + (1,) * (x.dim() - 2), dtype=x.dtype, device=x.device)
        mask[:, :k] = 1
        return mask

    def __call__(self, teacher, x, t, y):
        with torch.no_grad():
            if self.scale == 1.0 or y is None:
                return teacher(x, t, y)
            mask = self.channel_mask(x)
            null = self.null_class if self.null_class is not None else teacher.num_classes
            y_null = torch.full_like(y, null)
            v = teacher(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, y_null]))
            v_cond, v_uncond = v.chunk(2)
            delta = v_cond - v_uncond
            if mask is not None:
                delta = delta * mask  # unguided channels: Δ = 0, so v = v_c there, and ‖Δ‖ covers the guided ones
            factor = bcast(torch.clamp(self.clip_norm / per_sample_norm(delta).clamp_min(1e-12), max=1.0), x)
            guided = v_cond + (self.scale - 1.0) * factor * delta
            lo, hi = self.interval
            inside = bcast((t >= lo) & (t <= hi), x).bool()
            return torch.where(inside, guided, v_cond)
