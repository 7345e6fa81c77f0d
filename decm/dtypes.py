"""dtype rules shared by the models and the method (a leaf module: imports nothing from decm)."""

from __future__ import annotations

import torch


def at_least_fp32(dtype: torch.dtype) -> torch.dtype:
    """float32 for half-precision dtypes, else the dtype itself (time embeddings never run in bf16)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
