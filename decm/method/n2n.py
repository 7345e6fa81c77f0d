"""N2N variants: tangent conventions for the JVP of F⁻ over (x, r, t) in the N2N loss.

Two-sided condition on f(x_r, r, t) = x_r + (t − r)·F(x_r, r, t):
  source side (Eulerian):   F = v(x_r, r) + (t − r)(∇ₓF·v + ∂ᵣF)
  target side (Lagrangian): F = v(f, t) − (t − r)·∂ₜF
γ·(source) + λ·(target) gives (λ+γ)F = γv + λv_ψ + (t − r)·(∇ₓF·γv + γ∂ᵣF − λ∂ₜF), i.e. the tangent
(γv, γ, −λ) on (x, r, t). The paper note writes (λv, λ, −γ); the two agree only when λ = γ.
"""

from __future__ import annotations

import torch

from decm.registry import register


@register("n2n_variants", "tangent_derived")
def tangent_derived(v: torch.Tensor, lam: float, gamma: float, r: torch.Tensor):
    """Default tangent (γ·v, γ, −λ) on (x, r, t), derived from γ·Eulerian + λ·Lagrangian.

    Args:
      v: teacher velocity at (x_r, r).
      lam: λ, weight of the target-side (Lagrangian) condition.
      gamma: γ, weight of the source-side (Eulerian) condition.
      r: source times (for shape and dtype).
    """
    return gamma * v, torch.full_like(r, gamma), torch.full_like(r, -lam)


@register("n2n_variants", "tangent_note")
def tangent_note(v: torch.Tensor, lam: float, gamma: float, r: torch.Tensor):
    """Paper-note tangent (λ·v, λ, −γ) on (x, r, t); equals the derived one only when λ = γ.

    Args:
      v: teacher velocity at (x_r, r).
      lam: λ.
      gamma: γ.
      r: source times.
    """
    return lam * v, torch.full_like(r, lam), torch.full_like(r, -gamma)
