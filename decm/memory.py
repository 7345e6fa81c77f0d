"""Per-rank memory of training under DDP and FSDP: the training state from parameter shapes alone
(meta device), and the peak during a DE-CM step (`predict_step_peak`).

FSDP2 shards every parameter on dim 0 over the world, padding dim 0 to a multiple of the world size,
so a rank holds at most ceil(d0 / world) · (numel / d0) elements of it. A model's *shard profile*
{d0: Σ numel/d0 over its parameters with that d0} is enough to get that for any world size; the dry
run stores it and the launcher prints the estimate for the cluster's world, bench/memory.py compares
it with the bytes measured on CPU ranks.

`per_rank` counts (fp32, the loop's dtypes): parameters, gradients, AdamW's two moments, the EMA copy,
the post-hoc EMA profiles (one copy each), the frozen teacher. `predict_step_peak` adds what a step holds on top of that at its peak — DDP's
gradient buckets, FSDP's transient unsharded blocks, the activations saved by one with-grad forward
(traced with fake tensors: exact shapes, no memory) and the backward's temporaries — and is checked
against the peak measured on CPU ranks by bench/memory.py. Neither counts the CUDA context,
allocator slack or the process's own memory.
"""

from __future__ import annotations

import math

import torch

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
             replicated_numel: int = 0, phema_profiles: int = 0) -> dict:
    """Bytes per rank of each part of the training state.

    Args:
      student: the student's shard profile.
      world: number of ranks.
      mode: 'none', 'ddp' or 'fsdp'.
      teacher: the frozen teacher network's shard profile (None: analytic teacher, no weights).
      shard_teacher: the teacher is sharded too (FSDP only).
      replicated_numel: learnable parameters outside the student (the objective's), replicated and
        updated by AdamW on every rank.
      phema_profiles: post-hoc EMA profiles tracked (`train.phema_sigma_rels`): each a copy of the
        student, sharded like the EMA under FSDP.
    """
    s = numel(student, world if mode == "fsdp" else 1)
    t = numel(teacher, world if mode == "fsdp" and shard_teacher else 1) if teacher else 0
    out = {"params": FP32 * (s + replicated_numel), "grads": FP32 * (s + replicated_numel),
           "optimizer": 2 * FP32 * (s + replicated_numel), "ema": FP32 * s, "teacher": FP32 * t,
           "phema": phema_profiles * FP32 * s}
    out["state"] = out["params"] + out["grads"] + out["optimizer"]  # what the FSDP target is stated on
    out["total"] = out["state"] + out["ema"] + out["teacher"] + out["phema"]
    return out


def target(ddp_state_bytes: int, world: int, replicated_bytes: int) -> float:
    """The acceptance bound for FSDP's per-rank params + grads + optimizer bytes: 1.1 × DDP's / world + the
    unsharded remainder (the replicated parameters' state)."""
    return 1.1 * ddp_state_bytes / world + replicated_bytes


def describe(student: dict, world: int, mode: str, teacher: dict | None = None, shard_teacher: bool = False,
             phema_profiles: int = 0) -> str:
    """One line per part, in GB, for the dry run."""
    b = per_rank(student, world, mode, teacher, shard_teacher, phema_profiles=phema_profiles)
    gb = {k: v / 1e9 for k, v in b.items()}
    phema = f" + post-hoc EMA {phema_profiles} × {gb['ema']:.2f} GB" if phema_profiles else ""
    return (f"per-rank training state, {mode} over {world} ranks (fp32; activations not included): "
            f"params {gb['params']:.2f} GB + grads {gb['grads']:.2f} GB + AdamW {gb['optimizer']:.2f} GB "
            f"+ EMA {gb['ema']:.2f} GB + teacher {gb['teacher']:.2f} GB{phema} = {gb['total']:.2f} GB")


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def trace_activations(student, batch: int, shape: tuple, num_classes: int, autocast_dtype=None) -> dict:
    """Bytes saved for backward by one with-grad forward F(x, t, s, y) of `student` at `batch`.

    Run on fake tensors (build `student` inside `torch._subclasses.fake_tensor.FakeTensorMode`): the
    operators, shapes and dtypes of a real CPU forward (the same SDPA kernel choice, autocast's casts),
    no memory. Tensors sharing a storage count once; parameters and buffers do not count.

    Returns {"saved": bytes, "largest": bytes of the largest saved storage}.
    """
    own = {t.untyped_storage()._cdata for t in [*student.parameters(), *student.buffers()]}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage._cdata not in own:
            seen.setdefault(storage._cdata, storage.nbytes())
        return t

    x = torch.zeros((batch, *shape))
    t = torch.zeros(batch)
    y = torch.zeros(batch, dtype=torch.long) if num_classes else None
    with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None), \
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        student(x, t, t, y)
    return {"saved": sum(seen.values()), "largest": max(seen.values(), default=0)}


def unit_bytes(module) -> dict:
    """{"block": bytes of the largest block (the FSDP unit), "root": bytes of the parameters outside the blocks}."""
    blocks = list(getattr(module, "blocks", []))
    in_blocks = {id(p) for b in blocks for p in b.parameters()}
    return {"block": max((_nbytes(b.parameters()) for b in blocks), default=0),
            "root": _nbytes(p for p in module.parameters() if id(p) not in in_blocks)}


# FSDP2's transient unsharded memory in the backward of a block, in units of that block's bytes: its
# all-gathered parameters and the next block's (prefetched for the backward), and — when each term
# reduces its gradients — its unsharded gradients and the reduce-scatter's input copy of them. The
# parameters outside the blocks (embedders, final layer) belong to the root unit, unsharded from the
# forward to the end of the backward (with its unsharded gradients when each term reduces). A block's
# unit exists only during its own backward, when the activations of at least one block (the one after
# it) have been freed: the unit adds max(0, unit − one block's activations) to the peak, which is
# otherwise reached when the backward starts (every activation alive, every block resharded).
FSDP_BLOCKS_IN_FLIGHT = 4
FSDP_BLOCKS_IN_FLIGHT_DEFERRED = 2
FSDP_ROOT_COPIES = 2
# The backward's own temporaries: the gradients flowing into and out of the layer being
# differentiated, each about the size of the largest saved activation.
BACKWARD_TEMPORARIES = 2
# The no-grad JVP holds, inside one attention (MATH arithmetic, decm.method.jvp._plain_attention), the
# scores and their tangent, the softmax and its tangent and one temporary of the softmax's tangent
# rule — each batch × heads × tokens² — and around it a primal/tangent pair at the MLP's input and
# output, each about the size of the largest saved activation. FSDP holds the JVP's current and next
# block unsharded, and the root.
JVP_SCORE_COPIES = 5
JVP_WIDE_COPIES = 4
FSDP_BLOCKS_IN_JVP = 2


def predict_step_peak(build, kwargs: dict, batch: int, world: int, mode: str, teacher: bool = True,
                      shard_teacher: bool = False, autocast_dtype=None, unsharded_grads: bool = False,
                      optimizer_foreach: bool = False, phema_profiles: int = 0) -> dict:
    """Predicted peak bytes per rank during one DE-CM training step (decm.train's loop, backward per term).

    peak = resident + grads + unit + activations + temporaries, where
      resident: what the rank holds when the step starts — parameters, AdamW's two moments of the
        trainable ones, the EMA, the post-hoc EMA profiles (one student copy each), the teacher (÷ world
        when sharded), and under DDP its gradient buckets (one more copy of the trainable parameters);
      grads: the trainable parameters' gradients (÷ world under FSDP; with `unsharded_grads` — FSDP2
        with the gradient reduction deferred to the last term, `set_requires_gradient_sync(False)` —
        the whole model's unsharded gradients, held from the first term's backward to the last's);
      unit: FSDP only, the transient unsharded blocks beyond the activations they outlive:
        max(0, FSDP_BLOCKS_IN_FLIGHT × the largest block + FSDP_ROOT_COPIES × the parameters outside
        the blocks − one block's activations); with `unsharded_grads` FSDP_BLOCKS_IN_FLIGHT_DEFERRED
        blocks and one root copy (the unsharded gradients are part of grads; no reduce-scatter);
      activations: the bytes one with-grad forward of the student saves at `batch` (traced, see
        `trace_activations`; with `autocast_dtype` under that autocast); the terms run their backward
        one at a time, so one forward's activations are alive at once;
      temporaries: BACKWARD_TEMPORARIES × the largest saved activation.
    That is the with-grad phase. The no-grad JVP of a later term (L_n2n's, after the other terms'
    backwards: all gradients exist) can set the peak instead when tokens² is large against the width:
    resident + grads + FSDP_BLOCKS_IN_JVP blocks and the root (FSDP) + JVP_SCORE_COPIES × batch ×
    heads × tokens² + JVP_WIDE_COPIES × the largest saved activation (all fp32: the JVP runs outside
    autocast). With `optimizer_foreach` (AdamW's multi-tensor path, PyTorch's default on CUDA) the
    update allocates one more copy of the (local) trainable parameters while the gradients are alive:
    the optimizer phase, resident + grads + that copy. "peak" is the largest phase. The no-grad
    teacher call (CFG: twice the batch, fused attention) holds a few activation-sized tensors and
    sets none.

    Args:
      build: backbone factory, called as build(**kwargs, flow_map=...) inside FakeTensorMode.
      kwargs: input_size, in_channels, num_classes.
      batch: samples per rank.
      world: number of ranks.
      mode: 'none', 'ddp' or 'fsdp'.
      teacher: a network teacher of the same architecture (False: analytic, no weights).
      shard_teacher: the teacher is sharded too (FSDP).
      autocast_dtype: None (fp32) or torch.bfloat16 (activations under autocast; weights stay fp32).
      unsharded_grads: FSDP holds unsharded gradients between the terms (see above).
      optimizer_foreach: AdamW runs its multi-tensor (foreach) update (CUDA's default; on CPU it
        updates one tensor at a time).
      phema_profiles: post-hoc EMA profiles tracked (`train.phema_sigma_rels`; gin/decm_xl.gin: 2).

    Returns the parts and "peak", in bytes.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    if mode not in ("none", "ddp", "fsdp"):
        raise ValueError(f"mode must be 'none', 'ddp' or 'fsdp', got {mode!r}")
    with FakeTensorMode():
        student = build(**kwargs, flow_map=True)
        act = trace_activations(student, batch, (kwargs["in_channels"], kwargs["input_size"], kwargs["input_size"]),
                                kwargs["num_classes"], autocast_dtype)
        t_net = build(**kwargs, flow_map=False) if teacher else None
    units = unit_bytes(student)
    sharded = world if mode == "fsdp" else 1
    profile_all, profile_train = shard_profile(student), {}
    for p in student.parameters():
        if p.requires_grad:
            d0 = int(p.shape[0]) if p.dim() > 0 else 1
            profile_train[d0] = profile_train.get(d0, 0) + p.numel() // d0
    params = FP32 * numel(profile_all, sharded)
    train_bytes = FP32 * numel(profile_train, sharded)
    teacher_bytes = FP32 * numel(shard_profile(t_net), world if mode == "fsdp" and shard_teacher else 1) if teacher else 0
    out = {"params": params, "optimizer": 2 * train_bytes, "ema": params, "phema": phema_profiles * params,
           "teacher": teacher_bytes, "ddp_buckets": FP32 * numel(profile_train) if mode == "ddp" else 0}
    out["resident"] = (out["params"] + out["optimizer"] + out["ema"] + out["phema"] + out["teacher"]
                       + out["ddp_buckets"])
    deferred = mode == "fsdp" and unsharded_grads
    out["grads"] = FP32 * numel(profile_train) if deferred else train_bytes
    out["unit"] = 0
    if mode == "fsdp":  # deferred: the gradients accumulate unsharded (counted in grads), no reduce-scatter
        unit = FSDP_BLOCKS_IN_FLIGHT_DEFERRED * units["block"] + units["root"] if deferred else \
            FSDP_BLOCKS_IN_FLIGHT * units["block"] + FSDP_ROOT_COPIES * units["root"]
        out["unit"] = max(0, unit - act["saved"] // max(1, len(student.blocks)))
    out["activations"] = act["saved"]
    out["temporaries"] = BACKWARD_TEMPORARIES * act["largest"]
    out["with_grad_phase"] = out["resident"] + out["grads"] + out["unit"] + out["activations"] + out["temporaries"]
    heads, tokens = student.blocks[0].attn.num_heads, student.x_embedder.num_patches
    largest_fp32 = act["largest"] * (2 if autocast_dtype is not None else 1)  # the JVP's tensors are fp32
    out["jvp_transient"] = JVP_SCORE_COPIES * batch * heads * tokens ** 2 * FP32 + JVP_WIDE_COPIES * largest_fp32
    jvp_unit = (FSDP_BLOCKS_IN_JVP * units["block"] + units["root"]) if mode == "fsdp" else 0
    out["jvp_phase"] = out["resident"] + out["grads"] + jvp_unit + out["jvp_transient"]
    out["optimizer_phase"] = out["resident"] + train_bytes + (train_bytes if optimizer_foreach else 0)
    out["peak"] = max(out["with_grad_phase"], out["jvp_phase"], out["optimizer_phase"])
    return out
