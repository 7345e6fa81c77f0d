"""Data parallelism of the training loop: one process, DDP, or FSDP2 (sharded parameters, gradients,
optimizer state and EMA; optionally the frozen teacher).

`train.parallel` picks the mode: 'auto' (DDP when the environment describes several processes, one
process otherwise), 'none', 'ddp' or 'fsdp'. Under 'fsdp' (`torch.distributed.fsdp.fully_shard`) each
transformer block of the student and then its root are sharded over all ranks (parameters are
DTensors sharded on dim 0); the EMA copy is sharded the same way, so its update is a per-shard lerp;
with `train.shard_teacher` the frozen teacher network is sharded too (no gradients, no optimizer state:
its memory simply divides by the world size).

The objective and the loop are the same code for every mode. The student handed to the objective is
wrapped so that it looks like DDP to it: `.module` is what the JVP runs on (FSDP2's hooks all-gather
each block's parameters inside `torch.func.jvp` / forward-AD under no-grad, with the lean tangent rules
and MATH attention as always). Unlike DDP's, the wrapper has no `no_sync`: under backward-per-term
every term's backward reduce-scatters its gradients into the shards, so no rank ever holds the whole
model's unsharded gradients (turning the sync off until the last term, as DDP does, would keep them
all — full size — from the first term's backward to the last; bench/fsdp_grad_memory.py measures
both), and a step skipped after some terms leaves nothing behind that `zero_grad` does not clear.

Precision: with `train.precision = 'bf16'` the compute runs under the loop's autocast as under DDP
(`autocast` below: under FSDP without autocast's weight cache, which would route the later terms'
gradients around FSDP's reduce-scatter) and gradients are reduced in fp32
(`MixedPrecisionPolicy(reduce_dtype=fp32)`). Parameters are
all-gathered in fp32 by default (`gather_dtype='fp32'`). `gather_dtype='bf16'` gathers the blocks'
parameters in bf16 (half that traffic; the blocks then compute with bf16 weights and inputs, the
JVP's included); the root — embedders, final layer — is always gathered in fp32 and FSDP never casts
the root's inputs, so the times t, s, their JVP tangents and the time embeddings stay fp32 in every
mode (FSDP2's `cast_forward_inputs` on the root would round t = 0.999 to 1.0 in bf16).

Limits (refused with a one-line error): 'fsdp' needs several processes; the JVP method 'fd' (it copies
the module to float64) and 'forward_ad_grad' (FSDP2's post-backward autograd.Function has no
forward-AD rule) are refused under 'fsdp'; so is `train.compile_backend` (not composed with the
sharded JVP yet).
"""

from __future__ import annotations

import math

import gin
import torch
import torch.distributed as dist
from torch import nn

MODES = ("auto", "none", "ddp", "fsdp")
GATHER_DTYPES = {"fp32": None, "bf16": torch.bfloat16}


class ParallelConfigError(ValueError):
    """A parallel setting that cannot work with this job (one line, exit 2 through the launcher)."""


def check_mode(parallel: str) -> None:
    """The setting is one of MODES (dry runs check this much; `resolve` also checks the world size)."""
    if parallel not in MODES:
        raise ParallelConfigError(f"train.parallel must be one of {MODES}, got {parallel!r}")


def resolve(parallel: str, world_size: int) -> str:
    """The effective mode: 'none', 'ddp' or 'fsdp' ('auto' → DDP with several processes)."""
    check_mode(parallel)
    if parallel == "auto":
        return "ddp" if world_size > 1 else "none"
    if parallel in ("ddp", "fsdp") and world_size < 2:
        raise ParallelConfigError(
            f"train.parallel = {parallel!r} needs several processes (torchrun --nproc-per-node N, or srun with "
            f"cluster.tasks_per_node > 1); this job has one — use 'auto' or 'none'")
    if parallel == "none" and world_size > 1:
        raise ParallelConfigError(f"train.parallel = 'none' with {world_size} processes would train {world_size} "
                                  "unrelated copies — use 'auto', 'ddp' or 'fsdp'")
    return parallel


def check_fsdp_compatible(mode: str, jvp_method: str | None, compile_backend: str) -> None:
    """Refuses the settings FSDP does not compose with (see the module docstring)."""
    if mode != "fsdp":
        return
    if jvp_method in ("fd", "forward_ad_grad"):
        raise ParallelConfigError(
            f"objectives.decm.jvp_method = {jvp_method!r} does not run on a sharded student under train.parallel = "
            "'fsdp' ('fd' copies the module to float64; 'forward_ad_grad' needs a forward-AD rule FSDP2's "
            "post-backward hook lacks) — use 'autograd' or 'forward_ad'")
    if compile_backend != "off":
        raise ParallelConfigError("train.compile_backend is not supported with train.parallel = 'fsdp' yet — "
                                  "set it to 'off'")


def block_list(module: nn.Module) -> nn.ModuleList:
    """The module's transformer/residual blocks (the FSDP unit); an error naming the module without one."""
    blocks = getattr(module, "blocks", None)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise ParallelConfigError(
            f"train.parallel = 'fsdp' shards each block of the network, but {type(module).__name__} has no "
            "non-empty `blocks` nn.ModuleList — add one to the backbone or use train.parallel = 'ddp'")
    return blocks


@gin.configurable("fsdp")
def fsdp_options(gather_dtype: str = "fp32", reshard_after_forward: bool = True):
    """FSDP2 options of `train.parallel = 'fsdp'`.

    Args:
      gather_dtype: dtype of the blocks' all-gathered parameters with train.precision = 'bf16': 'fp32'
        (default; the JVP stays fp32, compute is bf16 through autocast) or 'bf16' (half the blocks'
        all-gather traffic; the blocks then run every forward, the JVP's included, with bf16 weights;
        the root, its time embedders and the time inputs stay fp32). Unused with precision 'fp32'.
      reshard_after_forward: free each block's gathered parameters after its forward (memory ∝ 1/world
        between forwards; the backward gathers again). False keeps them (fewer all-gathers, more memory).
    """
    if gather_dtype not in GATHER_DTYPES:
        raise ParallelConfigError(f"fsdp.gather_dtype must be one of {sorted(GATHER_DTYPES)}, got {gather_dtype!r}")
    return {"gather_dtype": gather_dtype, "reshard_after_forward": bool(reshard_after_forward)}


def mixed_precision(precision: str, gather_dtype: str):
    """The FSDP2 MixedPrecisionPolicy of the blocks and of the root: (blocks, root).

    fp32 reduction always; with precision 'bf16' and gather_dtype 'bf16' the blocks gather (and take
    their inputs) in bf16 and return fp32. The root never gathers in bf16 nor casts its inputs, so the times t, s and
    their JVP tangents reach the time embedders in fp32 (on CPU as on CUDA)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if precision != "bf16":
        return MixedPrecisionPolicy(), MixedPrecisionPolicy()
    root = MixedPrecisionPolicy(reduce_dtype=torch.float32, cast_forward_inputs=False)
    gathered = GATHER_DTYPES[gather_dtype]
    # bf16 gathers: the blocks hand fp32 back (output_dtype), so the root's fp32 layers after the last
    # block take their input in their own dtype whatever the backbone does (the JVP runs outside autocast)
    return MixedPrecisionPolicy(param_dtype=gathered, reduce_dtype=torch.float32,
                                output_dtype=torch.float32 if gathered is not None else None), root


def autocast(device_type: str, precision: str, mode: str):
    """The training step's autocast context: bf16 under precision 'bf16', off under 'fp32'.

    Under FSDP autocast's weight cache is turned off. Autocast caches the bf16 cast of every leaf
    parameter that requires grad until the outermost autocast region exits; FSDP2's gathered
    (unsharded) parameters are such leaves, gathered again for every forward. With a cache, the second
    and later terms of a step reuse the cast made in the first term's forward, so their backward
    accumulates gradients into the unsharded parameters outside FSDP's post-backward hook: those
    gradients are not reduce-scattered in that term, the last term's are left on every rank as full-size
    fp32 tensors and leak into the next step (measured: FSDP's losses leave DDP's from the third step
    on, and a full fp32 copy of the blocks' gradients stays allocated after the step). Without the
    cache each forward casts its weights afresh inside the module's forward; the one-process and DDP
    paths keep the cache (their parameters never change identity within a step).

    Args:
      device_type: 'cpu' or 'cuda'.
      precision: 'fp32' (autocast disabled) or 'bf16'.
      mode: the resolved parallel mode ('none', 'ddp' or 'fsdp').
    """
    return torch.autocast(device_type=device_type, dtype=torch.bfloat16, enabled=precision == "bf16",
                          cache_enabled=mode != "fsdp")


def shard(module: nn.Module, world_size: int, device: torch.device, precision: str = "fp32",
          options: dict | None = None) -> nn.Module:
    """Shards `module` in place: every block, then the root (FSDP2). Returns the same module."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    options = options or fsdp_options()
    mesh = init_device_mesh(device.type, (world_size,))
    blocks_policy, root_policy = mixed_precision(precision, options["gather_dtype"])
    for block in block_list(module):
        fully_shard(block, mesh=mesh, mp_policy=blocks_policy, reshard_after_forward=options["reshard_after_forward"])
    fully_shard(module, mesh=mesh, mp_policy=root_policy, reshard_after_forward=options["reshard_after_forward"])
    return module


class Sharded(nn.Module):
    """The face of an FSDP2-sharded student that the objective sees, the same as DDP's.

    `.module` is the sharded module itself (decm.method.jvp.unwrap returns it: the JVP runs through
    FSDP's all-gather hooks under no-grad). There is deliberately no `no_sync()`: each term's backward
    reduce-scatters into the shards, so gradient memory stays ≈ 1/world for the whole step (see the
    module docstring).

    Args:
      module: a module already sharded by `shard`.
    """

    is_data_parallel_wrapper = True  # decm.method.jvp.unwrap looks for this (the method layer imports nothing here)

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def wrap(model: nn.Module, ema: nn.Module, teacher, mode: str, world_size: int, device: torch.device,
         precision: str = "fp32", shard_teacher: bool = False) -> nn.Module:
    """Prepares the modules for `mode` and returns the student the objective calls.

    'none': the model itself; 'ddp': DistributedDataParallel(model) (EMA and teacher replicated);
    'fsdp': model and EMA sharded in place (and the teacher network with `shard_teacher`), wrapped in
    `Sharded`. Call before building the optimizer (FSDP replaces the parameters by DTensors).
    """
    if shard_teacher and mode != "fsdp":
        raise ParallelConfigError("train.shard_teacher = True needs train.parallel = 'fsdp'")
    if mode == "none":
        return model
    if mode == "ddp":
        return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    options = fsdp_options()
    shard(model, world_size, device, precision, options)
    shard(ema, world_size, device, precision, options)
    if shard_teacher:
        net = getattr(teacher, "net", None)
        if not isinstance(net, nn.Module):
            raise ParallelConfigError("train.shard_teacher = True needs a network teacher (teacher_source "
                                      "'checkpoint', 'sit' or 'lightningdit'); the analytic teacher has no parameters")
        shard(net, world_size, device, precision, options)
    return Sharded(model)


def is_sharded(tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor; the tensor itself otherwise."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def held_grad_bytes(module: nn.Module) -> int:
    """Bytes of gradient storage this rank holds for `module`: the (local shards of the) parameters'
    `.grad`, plus the unsharded gradients FSDP2 keeps on its gathered parameters between backwards
    (when gradient sync is off). Checks and benchmarks of gradient memory use it."""
    total = 0
    for p in module.parameters():
        if p.grad is not None:
            g = local(p.grad)
            total += g.numel() * g.element_size()
    for m in module.modules():
        get_state = getattr(m, "_get_fsdp_state", None)
        group = getattr(get_state(), "_fsdp_param_group", None) if get_state is not None else None
        for fsdp_param in getattr(group, "fsdp_params", ()):
            kept = [fsdp_param.unsharded_accumulated_grad]
            unsharded = getattr(fsdp_param, "_unsharded_param", None)
            if unsharded is not None:
                kept.append(unsharded.grad)
            total += sum(g.numel() * g.element_size() for g in kept if g is not None)
    return total


def sync_replicated_grads(params, world_size: int) -> None:
    """Averages over ranks the gradients of replicated parameters that no wrapper reduces (the
    objective's own learnable parts, e.g. sCM's adaptive log-variance weight): without this each rank's
    copy would drift apart under DDP and FSDP alike."""
    if world_size < 2:
        return
    for p in params:
        if p.grad is not None and not is_sharded(p.grad):
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad.div_(world_size)


def clip_grad_norm(params, max_norm: float) -> torch.Tensor:
    """Clips the global gradient norm (torch's own for plain tensors, bit for bit; sharded gradients:
    the squared norms of the local shards all-reduced, replicated ones counted once). Returns the
    total norm before clipping."""
    params = [p for p in params if p.grad is not None]
    sharded = [p for p in params if is_sharded(p.grad)]
    if not sharded:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    plain = [p for p in params if not is_sharded(p.grad)]
    device = local(sharded[0].grad).device
    sq = torch.zeros((), dtype=torch.float32, device=device)
    for p in sharded:
        sq += local(p.grad).float().square().sum()
    dist.all_reduce(sq, op=dist.ReduceOp.SUM)
    for p in plain:
        sq += p.grad.float().square().sum()
    total = sq.sqrt()
    if math.isfinite(max_norm):
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        with torch.no_grad():
            for p in params:
                local(p.grad).mul_(coef.to(local(p.grad).dtype))
    return total


def shard_checksum(module: nn.Module) -> float:
    """Σ p² over this rank's own part of the module (its local shards; every parameter when unsharded),
    in float64, with no collective: under FSDP it differs between ranks, so comparing it rank by rank
    checks each rank's shards, where `param_checksum` is the same number everywhere by construction."""
    return float(sum(local(p.detach()).double().square().sum().cpu() for p in module.parameters()))


def param_checksum(module: nn.Module) -> float:
    """Σ p² over the whole (possibly sharded) module, in float64; the same number on every rank."""
    total = torch.zeros((), dtype=torch.float64)
    shards = torch.zeros((), dtype=torch.float64)
    for p in module.parameters():
        if is_sharded(p):
            shards += local(p.detach()).double().square().sum().cpu()
        else:
            total += p.detach().double().square().sum().cpu()
    if any(is_sharded(p) for p in module.parameters()):
        device = local(next(module.parameters())).device
        shards = shards.to(device)
        dist.all_reduce(shards, op=dist.ReduceOp.SUM)
    return float(total + shards.cpu())
