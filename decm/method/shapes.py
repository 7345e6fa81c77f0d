"""Per-sample tensor helpers shared by losses, teachers, guidance and samplers."""

from __future__ import annotations

import torch

from decm.dtypes import at_least_fp32  # noqa: F401  (re-exported for the method's modules)


def bcast(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-sample values (B,) → (B, 1, ..., 1) in x's dtype, to broadcast against x."""
    return t.view(-1, *([1] * (x.dim() - 1))).to(x.dtype)


def per_sample_norm(x: torch.Tensor) -> torch.Tensor:
    """‖x_i‖₂ over all non-batch dimensions, shape (B,)."""
    return x.flatten(1).norm(dim=1)

