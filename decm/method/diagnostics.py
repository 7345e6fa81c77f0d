"""Training diagnostics: gradient norms of the CM objective's supervised and self-supervised parts.

docs/method.md, eq. 8: at F = F⁻ the CM gradient splits into ∇‖F − v_φ‖² (supervised: towards the
teacher) + ∇‖F − ṽ‖² (self-supervised: towards the student's own JVP target ṽ = F⁻ + (1 − t)·dF⁻/dt).
The paper attributes loss divergence to the self-supervised part. `part_grad_norms` measures both on
the step's own batch and times (a second student forward; the gradients are local to this process).
"""

from __future__ import annotations

import torch


def part_grad_norms(objective, ctx, params) -> dict:
    """{'grad/<term>_sup', 'grad/<term>_self', 'grad/<term>_sup_self_cos', 'loss/<term>_sup', ...}.

    Covers every term of this step whose loss has `parts` (CM losses). Uses the unwrapped student, so
    it is safe under DDP (and measures this rank's gradient only).
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
            g_sup = torch.autograd.grad(sup, params, retain_graph=True, allow_unused=True)
            g_self = torch.autograd.grad(self_sup, params, allow_unused=True)
            a = torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(g_sup, params)])
            b = torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(g_self, params)])
            name = term.term_name
            out[f"grad/{name}_sup"] = float(a.norm())
            out[f"grad/{name}_self"] = float(b.norm())
            out[f"grad/{name}_sup_self_cos"] = float(torch.dot(a, b) / (a.norm() * b.norm() + 1e-30))
            out[f"loss/{name}_sup"] = float(sup.detach())
            out[f"loss/{name}_self"] = float(self_sup.detach())
    finally:
        ctx.student = wrapped
    return out
