"""Per-rank bytes of the training state under DDP and FSDP, from parameter shapes alone (meta device).

FSDP2 shards every parameter on dim 0 over the world, padding dim 0 to a multiple of the world size,
so a rank holds at most ceil(d0 / world) · (numel / d0) elements of it. A model's *shard profile*
{d0: Σ numel/d0 over its parameters with that d0} is enough to get that for any world size; the dry
run stores it and the launcher prints the estimate for the cluster's world, bench/memory.py compares
it with the bytes measured on CPU ranks.

Counted (fp32, the loop's dtypes): parameters, gradients, AdamW's two moments, the EMA copy, the frozen
teacher. Not counted: activations (the JVP, the with-grad forwards), DDP's gradient buckets (one more
parameter-sized buffer), FSDP's transient all-gathered block, CUDA context and allocator slack.
"""

from __future__ import annotations

import math

FP32 = 4


def shard_profile(module) -> dict[int, int]:
    """{d0: Σ numel/d0} over the module's parameters (0-dim parameters count as d0 = 1)."""
    out: dict[int, int] = {}
    for p in module.parameters():
        d0 = int(p.shape[0]) if p.dim() > 0 else 1
        out[d0] = out.get(d0, 0) + (p.numel() // d0 if d0 else 0)
    return out


def numel(profile: dict, world: int = 1) -> int:
    """Elements one rank holds when every parameter is sharded over `world` ranks (world 1: all)."""
    return sum(math.ceil(int(d0) / world) * rest for d0, rest in profile.items())


def per_rank(student: dict, world: int, mode: str, teacher: dict | None = None, shard_teacher: bool = False,
             replicated_numel: int = 0) -> dict:
    """Bytes per rank of each part of the training state.

    Args:
      student: the student's shard profile.
      world: number of ranks.
      mode: 'none', 'ddp' or 'fsdp'.
      teacher: the frozen teacher network's shard profile (None: analytic teacher, no weights).
      shard_teacher: the teacher is sharded too (FSDP only).
      replicated_numel: learnable parameters outside the student (the objective's), replicated and
        updated by AdamW on every rank.
    """
    s = numel(student, world if mode == "fsdp" else 1)
    t = numel(teacher, world if mode == "fsdp" and shard_teacher else 1) if teacher else 0
    out = {"params": FP32 * (s + replicated_numel), "grads": FP32 * (s + replicated_numel),
           "optimizer": 2 * FP32 * (s + replicated_numel), "ema": FP32 * s, "teacher": FP32 * t}
    out["state"] = out["params"] + out["grads"] + out["optimizer"]  # what the FSDP target is stated on
    out["total"] = out["state"] + out["ema"] + out["teacher"]
    return out


def target(ddp_state_bytes: int, world: int, replicated_bytes: int) -> float:
    """The acceptance bound for FSDP's per-rank params + grads + optimizer bytes: 1.1 × DDP's / world + the
    unsharded remainder (the replicated parameters' state)."""
    return 1.1 * ddp_state_bytes / world + replicated_bytes


def describe(student: dict, world: int, mode: str, teacher: dict | None = None, shard_teacher: bool = False) -> str:
    """One line per part, in GB, for the dry run."""
    b = per_rank(student, world, mode, teacher, shard_teacher)
    gb = {k: v / 1e9 for k, v in b.items()}
    return (f"per-rank training state, {mode} over {world} ranks (fp32; activations not included): "
            f"params {gb['params']:.2f} GB + grads {gb['grads']:.2f} GB + AdamW {gb['optimizer']:.2f} GB "
            f"+ EMA {gb['ema']:.2f} GB + teacher {gb['teacher']:.2f} GB = {gb['total']:.2f} GB")
