"""Jacobian-vector products of the student flow map.

Autograd path: `torch.func.jvp` under no-grad on the *unwrapped* module, with SDPA restricted to the
MATH backend (fused kernels have no forward-mode AD). The loss then runs one separate with-grad
forward (through the DDP wrapper when distributed). Finite-difference path: a float64 central
difference, the fallback used by FastGen / rCM for kernels without forward AD.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel


def unwrap(module):
    """Returns the plain module inside DDP and torch.compile wrappers (JVPs must not see DDP)."""
    while True:
        if isinstance(module, torch.nn.parallel.DistributedDataParallel):
            module = module.module
        elif hasattr(module, "_orig_mod"):
            module = module._orig_mod
        else:
            return module


def jvp_autograd(fn: Callable, primals: tuple, tangents: tuple):
    """(fn(*primals), d/dε fn(primals + ε·tangents)) by forward-mode AD, no graph kept."""
    with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]):
        out, tangent_out = torch.func.jvp(fn, primals, tangents)
    return out, tangent_out


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


def flow_map_jvp(model, x, t, s, y, dx, dt, ds, method: str = "autograd", fd_eps: float = 1e-4):
    """JVP of F(x, t, s, y) along (dx, dt, ds); returns (F, dF). `model` must be unwrapped.

    Args:
      model: the unwrapped student (callable as model(x, t, s, y)).
      x, t, s, y: primal point and labels (labels are not differentiated).
      dx, dt, ds: tangent directions for x, t and s.
      method: 'autograd' (torch.func.jvp) or 'fd' (float64 central difference).
      fd_eps: finite-difference step.
    """
    if method == "autograd":
        return jvp_autograd(lambda a, b, c: model(a, b, c, y), (x, t, s), (dx, dt, ds))
    if method == "fd":
        if isinstance(model, torch.nn.Module):
            return jvp_finite_difference(lambda m, a, b, c: m(a, b, c, y), (x, t, s), (dx, dt, ds),
                                         eps=fd_eps, module=model)
        return jvp_finite_difference(lambda a, b, c: model(a, b, c, y), (x, t, s), (dx, dt, ds), eps=fd_eps)
    raise ValueError(f"unknown JVP method {method!r}; expected 'autograd' or 'fd'")
