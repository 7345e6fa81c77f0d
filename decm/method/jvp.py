"""Jacobian-vector products of the student flow map.

Autograd path: `torch.func.jvp` under no-grad on the *unwrapped* module, with SDPA restricted to the
MATH backend (fused kernels have no forward-mode AD). The loss then runs one separate with-grad
forward (through the DDP wrapper when distributed). 'forward_ad' is the same JVP with
`torch.autograd.forward_ad` dual numbers. 'forward_ad_grad' runs that dual forward *with* grad through
the (possibly DDP-wrapped) student, so its primal output is the loss's prediction and the separate
forward is saved — at the price of MATH attention (not fused) in that with-grad forward, and fp32 for
it in bf16 runs. Finite-difference path: a float64 central difference, the
fallback used by FastGen / rCM for kernels without forward AD.

Lean tangents (`lean=True`, the default of both AD paths): PyTorch's forward-AD rule for `linear`
(addmm) materialises zero tangents for the weight and bias and multiplies by them, so every linear
layer costs three matmuls instead of two; its GELU rule evaluates the GELU twice. Inside the JVP a
torch-function mode routes `F.linear` and `F.gelu` through autograd Functions whose tangent rule is
the same formula without the zero terms (x_t·Wᵀ; gelu_backward(x_t, x)), and unmasked attention
through the MATH kernel's own arithmetic minus its safe-softmax check (an extra pass over the scores).
Parameters are never dual here, so the tangent is bit-identical (tested) and a third of the JVP's
matmul work goes away.
"""

from __future__ import annotations

import contextlib
import copy
import math
from typing import Callable

import torch
import torch.autograd.forward_ad as forward_ad
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode

JVP_METHODS = ("autograd", "forward_ad", "forward_ad_grad", "fd")


def unwrap(module):
    """Returns the plain module inside DDP, decm.parallel.Sharded (FSDP2) and torch.compile wrappers (JVPs
    must not see DDP; a sharded module's own hooks gather its parameters inside the JVP)."""
    while True:
        if isinstance(module, torch.nn.parallel.DistributedDataParallel) or getattr(
                module, "is_data_parallel_wrapper", False):
            module = module.module
        elif hasattr(module, "_orig_mod"):
            module = module._orig_mod
        else:
            return module


def _rows(a: torch.Tensor) -> torch.Tensor:
    return a.reshape(-1, a.shape[-1])


class _LeanLinear(torch.autograd.Function):
    """F.linear whose forward-AD rule is x_t·Wᵀ (+ x·W_tᵀ + b_t only when those tangents exist).

    The backward (needed by the with-grad dual forward, 'forward_ad_grad') is the usual
    (g·W, gᵀx, Σg). fp32 only: the JVP paths always run outside autocast.
    """

    @staticmethod
    def forward(x, weight, bias):
        return F.linear(x, weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias = inputs
        ctx.set_materialize_grads(False)  # absent tangents stay None instead of zero tensors
        ctx.save_for_forward(x, weight)
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None

    @staticmethod
    def jvp(ctx, x_t, weight_t, bias_t):
        x, weight = ctx.saved_tensors
        parts = [F.linear(x_t, weight)] if x_t is not None else []
        if weight_t is not None:
            parts.append(F.linear(x, weight_t))
        if bias_t is not None:
            parts.append(bias_t)
        return sum(parts[1:], parts[0]) if parts else None

    @staticmethod
    def backward(ctx, grad):
        if grad is None:
            return None, None, None
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        grad_x = grad.matmul(weight) if need_x else None
        grad_w = _rows(grad).t().mm(_rows(x)) if need_w else None
        grad_b = _rows(grad).sum(0) if need_b and ctx.has_bias else None
        return grad_x, grad_w, grad_b


class _LeanGelu(torch.autograd.Function):
    """F.gelu whose forward-AD rule is gelu_backward(x_t, x) without re-evaluating the GELU."""

    @staticmethod
    def forward(x, approximate):
        return F.gelu(x, approximate=approximate)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, approximate = inputs
        ctx.set_materialize_grads(False)
        ctx.save_for_forward(x)
        ctx.save_for_backward(x)
        ctx.approximate = approximate

    @staticmethod
    def jvp(ctx, x_t, _):
        (x,) = ctx.saved_tensors
        return None if x_t is None else torch.ops.aten.gelu_backward(x_t, x, approximate=ctx.approximate)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return (None if grad is None else torch.ops.aten.gelu_backward(grad, x, approximate=ctx.approximate)), None


class LeanTangents(TorchFunctionMode):
    """Routes F.linear, F.gelu and unmasked SDPA through the lean rules in this file (fp32, outside autocast)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:  # linear(input, weight, bias=None)
            bound = dict(zip(("input", "weight", "bias"), args), **kwargs)
            return _LeanLinear.apply(bound["input"], bound["weight"], bound.get("bias"))
        if func is F.gelu:  # gelu(input, approximate='none')
            bound = dict(zip(("input", "approximate"), args), **kwargs)
            return _LeanGelu.apply(bound["input"], bound.get("approximate", "none"))
        if func is F.scaled_dot_product_attention:
            names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
            bound = dict(zip(names, args), **kwargs)
            if bound.get("attn_mask") is None and not bound.get("dropout_p") and not bound.get("is_causal") \
                    and not bound.get("enable_gqa"):
                return _plain_attention(bound["query"], bound["key"], bound["value"], bound.get("scale"))
        return func(*args, **kwargs)


def _plain_attention(q, k, v, scale=None):
    """The MATH SDPA kernel's arithmetic (√scale on q and on kᵀ, softmax, ·v) without its safe-softmax
    check for fully masked rows (an all-reduce over the scores that cannot fire without a mask)."""
    root = math.sqrt(scale if scale is not None else 1.0 / math.sqrt(q.shape[-1]))
    attn = torch.matmul(q * root, k.transpose(-2, -1) * root)
    return torch.matmul(attn.softmax(dim=-1), v)


def jvp_autograd(fn: Callable, primals: tuple, tangents: tuple, lean: bool = True):
    """(fn(*primals), d/dε fn(primals + ε·tangents)) by forward-mode AD (torch.func.jvp), no graph kept."""
    with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]), (LeanTangents() if lean else contextlib.nullcontext()):
        out, tangent_out = torch.func.jvp(fn, primals, tangents)
    return out, tangent_out


def jvp_forward_ad(fn: Callable, primals: tuple, tangents: tuple, lean: bool = True, grad: bool = False):
    """The same JVP with `torch.autograd.forward_ad` dual numbers (no functorch transform).

    With `grad=False` no graph is kept. With `grad=True` the primal output keeps its autograd graph
    (one with-grad forward gives both the prediction and the JVP; 'forward_ad_grad'); the tangent is
    returned detached either way.
    """
    with torch.set_grad_enabled(grad), sdpa_kernel([SDPBackend.MATH]), forward_ad.dual_level(), \
            (LeanTangents() if lean else contextlib.nullcontext()):
        out = fn(*(forward_ad.make_dual(p, d) for p, d in zip(primals, tangents)))
        primal, tangent = forward_ad.unpack_dual(out)
    tangent = tangent.detach() if tangent is not None else torch.zeros_like(primal.detach())
    return primal, tangent


def jvp_finite_difference(fn: Callable, primals: tuple, tangents: tuple, eps: float = 1e-4,
                          module: torch.nn.Module | None = None):
    """Central difference (fn(p + εd) − fn(p − εd)) / 2ε in float64; primal from fn(p).

    Args:
      fn: function of the primals; if `module` is given, `fn(module, *primals)`.
      primals: inputs.
      tangents: directions, same shapes as primals.
      eps: step size in units of the tangent.
      module: optional module that is copied to float64 for the differences (the primal output is
        computed with the original module in its own dtype).
    """
    with torch.no_grad():
        out = fn(module, *primals) if module is not None else fn(*primals)
        m64 = copy.deepcopy(module).double() if module is not None else None
        plus = tuple(p.double() + eps * d.double() for p, d in zip(primals, tangents))
        minus = tuple(p.double() - eps * d.double() for p, d in zip(primals, tangents))
        call = (lambda *a: fn(m64, *a)) if m64 is not None else fn
        tangent_out = (call(*plus) - call(*minus)) / (2 * eps)
    return out, tangent_out.to(out.dtype)


def flow_map_jvp(model, x, t, s, y, dx, dt, ds, method: str = "autograd", fd_eps: float = 1e-4,
                 lean: bool = True):
    """JVP of F(x, t, s, y) along (dx, dt, ds); returns (F, dF). `model` must be unwrapped.

    Args:
      model: the unwrapped student (callable as model(x, t, s, y)).
      x, t, s, y: primal point and labels (labels are not differentiated).
      dx, dt, ds: tangent directions for x, t and s.
      method: 'autograd' (torch.func.jvp), 'forward_ad' (dual numbers) or 'fd' (float64 central
        difference); all without a graph ('forward_ad_grad' is handled by the objective's Context).
      fd_eps: finite-difference step.
      lean: lean linear/GELU/attention rules in the AD paths (bit-identical; False = PyTorch's own rules).
    """
    if method == "autograd":
        return jvp_autograd(lambda a, b, c: model(a, b, c, y), (x, t, s), (dx, dt, ds), lean=lean)
    if method == "forward_ad":
        return jvp_forward_ad(lambda a, b, c: model(a, b, c, y), (x, t, s), (dx, dt, ds), lean=lean)
    if method == "fd":
        if isinstance(model, torch.nn.Module):
            return jvp_finite_difference(lambda m, a, b, c: m(a, b, c, y), (x, t, s), (dx, dt, ds),
                                         eps=fd_eps, module=model)
        return jvp_finite_difference(lambda a, b, c: model(a, b, c, y), (x, t, s), (dx, dt, ds), eps=fd_eps)
    raise ValueError(f"unknown JVP method {method!r}; expected one of {JVP_METHODS}")
