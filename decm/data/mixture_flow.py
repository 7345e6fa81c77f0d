"""The exact velocity of Gaussian-mixture data under the linear path, beside the data it describes.

For x_t = (1 − t)·z + t·x₁, z ~ N(0, I), and x₁ ~ Σ_k w_k N(m_k, s_k²I), the marginal velocity is
closed-form, so the built-in 2-D mixtures can serve as their own exact teacher and exact reference
(the analytic-teacher benchmarks, the error-accumulation and N2N studies). This module imports only
torch and the registry: datasets use it without depending on the method, and
`decm.method.teachers` re-exports its names.
"""

from __future__ import annotations

import torch
from torch import nn

from decm.registry import register


def _per_sample(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-sample values (B,) → (B, 1, ..., 1) in x's dtype."""
    return t.view(-1, *([1] * (x.dim() - 1))).to(x.dtype)


class AnalyticTeacher(nn.Module):
    """Base for closed-form teachers (no parameters; `num_classes` for CFG plumbing)."""

    num_classes = 0

    def forward(self, x, t, y=None):  # pragma: no cover - abstract
        raise NotImplementedError


@register("teachers", "gaussian_mixture")
class GaussianMixtureTeacher(AnalyticTeacher):
    """x₁ ~ Σ_k w_k N(m_k, s_k²I): v = Σ_k π_k(x,t)·v_k(x,t), π_k ∝ w_k N(x; t·m_k, S_k,t² I).

    v_k is the Gaussian velocity of component k. Labels select a component (class-conditional
    teacher); the null label `num_classes` (or y = None) gives the mixture, so CFG is well defined.
    The flow map has no closed form: `flow_map` solves the ODE with fine RK4.

    Args:
      means: K × D component means.
      stds: K component standard deviations (or one scalar).
      weights: K mixture weights (normalised; default uniform).
    """

    def __init__(self, means=((-1.0, -1.0), (1.0, 1.0)), stds=0.1, weights=None):
        super().__init__()
        m = torch.as_tensor(means, dtype=torch.float64)
        k = m.shape[0]
        s = torch.as_tensor(stds, dtype=torch.float64).expand(k).clone()
        w = torch.ones(k, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        self.register_buffer("means", m)
        self.register_buffer("stds", s)
        self.register_buffer("weights", w / w.sum())
        self.num_classes = k
        self.shape = (m.shape[1],)

    def forward(self, x, t, y=None):
        m, s2 = self.means.to(x.dtype), (self.stds ** 2).to(x.dtype)
        tb = t.to(x.dtype).view(-1, 1, 1)                          # (B, 1, 1)
        xb = x.unsqueeze(1)                                        # (B, 1, D)
        var = (1 - tb) ** 2 + tb ** 2 * s2.view(1, -1, 1)          # (B, K, 1)
        diff = xb - tb * m.unsqueeze(0)                             # (B, K, D)
        v_k = m.unsqueeze(0) + ((tb * s2.view(1, -1, 1) - (1 - tb)) / var) * diff
        d = x.shape[1]
        logp = (-0.5 * (diff ** 2).sum(-1) / var.squeeze(-1) - 0.5 * d * torch.log(var.squeeze(-1))
                + torch.log(self.weights.to(x.dtype)).unsqueeze(0))  # (B, K)
        if y is not None:
            onehot = torch.nn.functional.one_hot(y.clamp(max=self.num_classes - 1), self.num_classes).bool()
            cond = (y < self.num_classes).unsqueeze(1)
            logp = torch.where(cond & ~onehot, torch.full_like(logp, -torch.inf), logp)
        post = torch.softmax(logp, dim=1).unsqueeze(-1)
        return (post * v_k).sum(1)

    def log_density(self, x):
        """log p₁(x) of the data mixture itself (float64), for exact-density checks of samples."""
        x = x.double()
        diff = x.unsqueeze(1) - self.means.unsqueeze(0)                           # (B, K, D)
        var = (self.stds ** 2).unsqueeze(0)                                        # (1, K)
        d = x.shape[1]
        logp = (-0.5 * (diff ** 2).sum(-1) / var - 0.5 * d * torch.log(2 * torch.pi * var)
                + torch.log(self.weights).unsqueeze(0))
        return torch.logsumexp(logp, dim=1)

    def sample(self, n, generator=None, y=None):
        if y is None:
            y = torch.multinomial(self.weights.float(), n, replacement=True, generator=generator)
        noise = torch.randn((n, self.shape[0]), generator=generator, dtype=torch.float64)
        return (self.means[y] + self.stds[y].unsqueeze(1) * noise).float()

    def flow_map(self, x, t, s, y=None, steps: int = 200):
        """f(x, t, s) by RK4 on the exact velocity with `steps` steps (float64)."""
        return ode_flow(self, x, t, s, y, steps)


def ode_flow(velocity, x, t, s, y=None, steps: int = 200):
    """Integrates dx/dτ = velocity(x, τ, y) from τ = t to τ = s (per-sample times) with RK4."""
    dtype = x.dtype
    x = x.double()
    t, s = t.double(), s.double()
    h = (s - t) / steps
    hb = _per_sample(h, x)
    tau = t.clone()
    for _ in range(steps):
        k1 = velocity(x, tau, y)
        k2 = velocity(x + 0.5 * hb * k1, tau + 0.5 * h, y)
        k3 = velocity(x + 0.5 * hb * k2, tau + 0.5 * h, y)
        k4 = velocity(x + hb * k3, tau + h, y)
        x = x + hb * (k1 + 2 * k2 + 2 * k3 + k4) / 6
        tau = tau + h
    return x.to(dtype)
