"""Per-sample tensor helpers shared by losses, teachers, guidance and samplers."""

from __future__ import annotations

import torch


def bcast(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-sample values (B,) → (B, 1, ..., 1) in x's dtype, to broadcast against x."""
    return t.view(-1, *([1] * (x.dim() - 1))).to(x.dtype)


def per_sample_norm(x: torch.Tensor) -> torch.Tensor:
    """‖x_i‖₂ over all non-batch dimensions, shape (B,)."""
    return x.flatten(1).norm(dim=1)


def at_least_fp32(dtype: torch.dtype) -> torch.dtype:
    """float32 for half-precision dtypes, else the dtype itself (time embeddings never run in bf16)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
