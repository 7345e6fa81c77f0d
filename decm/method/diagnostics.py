"""Training diagnostics: gradient norms of the CM objective's supervised and self-supervised parts.

docs/method.md, eq. 8: at F = F⁻ the CM gradient splits into ∇‖F − v_φ‖² (supervised: towards the
teacher) + ∇‖F − ṽ‖² (self-supervised: towards the student's own JVP target ṽ = F⁻ + (1 − t)·dF⁻/dt).
The paper attributes loss divergence to the self-supervised part. `part_grad_norms` measures both on
the step's own batch and times (a second student forward). With several processes the gradients are
those the optimizer would see — averaged over the ranks, like the training gradient — under DDP and
FSDP alike: under DDP each rank's part gradients (on the plain module) are all-reduced; under FSDP
each part's backward runs through the sharded module, whose reduce-scatter averages them into the
shards (autograd.grad against the sharded parameters would return nothing: they are not in the graph),
and the norms and the dot product add up the shards' squares over the ranks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _part_grads(loss, params, retain_graph: bool) -> list:
    """d loss / d params: autograd.grad for plain parameters, a backward through FSDP2 (reduce-scatter into
    the shards, the training gradients set aside and put back) when any parameter is sharded."""
    from torch.distributed.tensor import DTensor

    if not any(isinstance(p, DTensor) for p in params):
        return list(torch.autograd.grad(loss, params, retain_graph=retain_graph, allow_unused=True))
    kept = [p.grad for p in params]
    for p in params:
        p.grad = None
    try:
        loss.backward(retain_graph=retain_graph)
        return [p.grad for p in params]
    finally:
        for p, g in zip(params, kept):
            p.grad = g


def _dots(a: list, b: list, params) -> tuple[float, float, float]:
    """(‖a‖², ‖b‖², a·b) of the rank-averaged gradients: replicated gradients all-reduced and averaged
    first, the local squares of sharded ones summed over ranks."""
    from torch.distributed.tensor import DTensor

    world = _world()
    a = [g if g is not None else torch.zeros_like(p) for g, p in zip(a, params)]
    b = [g if g is not None else torch.zeros_like(p) for g, p in zip(b, params)]
    plain = [i for i, g in enumerate(a) if not isinstance(g, DTensor)]
    sharded = [i for i in range(len(a)) if i not in plain]
    out = torch.zeros(3, dtype=torch.float64, device=a[0].device if a else "cpu")
    if plain:
        va = torch.cat([a[i].detach().flatten() for i in plain]).double()
        vb = torch.cat([b[i].detach().flatten() for i in plain]).double()
        if world > 1:
            both = torch.stack([va, vb])
            dist.all_reduce(both, op=dist.ReduceOp.SUM)
            va, vb = both[0] / world, both[1] / world
        out += torch.stack([va.dot(va), vb.dot(vb), va.dot(vb)])
    if sharded:
        la = torch.cat([a[i].to_local().detach().flatten() for i in sharded]).double()
        lb = torch.cat([b[i].to_local().detach().flatten() for i in sharded]).double()
        local = torch.stack([la.dot(la), lb.dot(lb), la.dot(lb)])
        dist.all_reduce(local, op=dist.ReduceOp.SUM)
        out += local
    aa, bb, ab = (float(v) for v in out)
    return aa, bb, ab


def part_grad_norms(objective, ctx, params) -> dict:
    """{'grad/<term>_sup', 'grad/<term>_self', 'grad/<term>_sup_self_cos', 'loss/<term>_sup', ...}.

    Covers every term of this step whose loss has `parts` (CM losses). Runs on the unwrapped student
    (plain under DDP, the sharded module under FSDP); the gradients are averaged over the ranks as
    the training gradient is (see the module docstring), so every rank and every mode reports the
    same numbers. The losses are this rank's. Collective when distributed: every rank calls it.
    """
    params = [p for p in params if p.requires_grad]
    out = {}
    wrapped = ctx.student
    ctx.student = ctx.student_raw
    try:
        for term in objective.terms:
            if term.term_name not in ctx.selected or not hasattr(term.loss, "parts"):
                continue
            t, s = ctx.selected[term.term_name]
            sup, self_sup = (v.mean() for v in term.loss.parts(ctx, t, s))
            g_sup = _part_grads(sup, params, retain_graph=True)
            g_self = _part_grads(self_sup, params, retain_graph=False)
            aa, bb, ab = _dots(g_sup, g_self, params)
            name = term.term_name
            out[f"grad/{name}_sup"] = aa ** 0.5
            out[f"grad/{name}_self"] = bb ** 0.5
            out[f"grad/{name}_sup_self_cos"] = ab / (aa ** 0.5 * bb ** 0.5 + 1e-30)
            out[f"loss/{name}_sup"] = float(sup.detach())
            out[f"loss/{name}_self"] = float(self_sup.detach())
    finally:
        ctx.student = wrapped
    return out
