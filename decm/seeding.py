"""Per-step randomness that depends only on (seed, rank, step): the basis of bit-identical resumes."""

from __future__ import annotations

import numpy as np
import torch


def step_generator(seed: int, rank: int, step: int) -> torch.Generator:
    """A torch.Generator seeded from (seed, rank, step) only (independent of history)."""
    state = np.random.SeedSequence([seed, rank, step]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
