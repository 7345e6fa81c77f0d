"""Teachers: the frozen velocity field v_φ(x, t, y) that DE-CM distils.

Analytic teachers give the exact velocity (and, for a Gaussian, the exact flow map) of the linear
path x_t = (1 − t)·z + t·x₁, z ~ N(0, I), so the method can be tested and studied without training
a teacher. A network teacher wraps a trained backbone.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from decm.method.shapes import bcast
from decm.registry import register


def _gauss_scale(t, sigma2):
    """S_t = sqrt((1 − t)² + t²σ²): the per-dimension std of x_t for x₁ ~ N(μ, σ²I)."""
    return torch.sqrt((1 - t) ** 2 + t ** 2 * sigma2)


class AnalyticTeacher(nn.Module):
    """Base for closed-form teachers (no parameters; `num_classes` for CFG plumbing)."""

    num_classes = 0

    def forward(self, x, t, y=None):  # pragma: no cover - abstract
        raise NotImplementedError


@register("teachers", "gaussian")
class GaussianTeacher(AnalyticTeacher):
    """x₁ ~ N(μ, σ²I): v(x,t) = μ + ((tσ² − (1−t))/S_t²)(x − tμ), S_t² = (1−t)² + t²σ².

    Exact flow map: f(x,t,s) = sμ + (S_s/S_t)(x − tμ), i.e. the average velocity
    F(x,t,s) = μ + [((s+t)(1+σ²) − 2) / ((S_s + S_t)·S_t)]·(x − tμ), smooth through s = t (= v there).

    Args:
      mean: μ, a list (one entry per data dimension) or a scalar broadcast to `shape`.
      std: σ (scalar).
      shape: data shape of one sample, e.g. [2] or [1, 8, 8].
    """

    def __init__(self, mean=0.0, std: float = 0.5, shape=(2,)):
        super().__init__()
        mu = torch.as_tensor(mean, dtype=torch.float64)
        mu = mu.expand(tuple(shape)).clone() if mu.dim() == 0 else mu.reshape(tuple(shape))
        self.register_buffer("mu", mu)
        self.sigma2 = float(std) ** 2
        self.shape = tuple(shape)

    def forward(self, x, t, y=None):
        mu, tb = self.mu.to(x.dtype), bcast(t, x)
        s_t2 = (1 - tb) ** 2 + tb ** 2 * self.sigma2
        return mu + ((tb * self.sigma2 - (1 - tb)) / s_t2) * (x - tb * mu)

    def average_velocity(self, x, t, s, y=None):
        """Exact F(x, t, s) = (f(x,t,s) − x)/(s − t), closed form, valid at s = t."""
        mu, tb, sb = self.mu.to(x.dtype), bcast(t, x), bcast(s, x)
        st, ss = _gauss_scale(tb, self.sigma2), _gauss_scale(sb, self.sigma2)
        coef = ((sb + tb) * (1 + self.sigma2) - 2) / ((ss + st) * st)
        return mu + coef * (x - tb * mu)

    def sample(self, n, generator=None, y=None):
        noise = torch.randn((n, *self.shape), generator=generator, dtype=torch.float64)
        return (self.mu + math.sqrt(self.sigma2) * noise).float()


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
    hb = bcast(h, x)
    tau = t.clone()
    for _ in range(steps):
        k1 = velocity(x, tau, y)
        k2 = velocity(x + 0.5 * hb * k1, tau + 0.5 * h, y)
        k3 = velocity(x + 0.5 * hb * k2, tau + 0.5 * h, y)
        k4 = velocity(x + hb * k3, tau + h, y)
        x = x + hb * (k1 + 2 * k2 + 2 * k3 + k4) / 6
        tau = tau + h
    return x.to(dtype)


class ExactFlowMap(nn.Module):
    """Student-shaped wrapper of an analytic teacher's exact average velocity F(x, t, s).

    Used as the oracle student in tests and analysis: every DE-CM loss must vanish for it. A
    `perturbation` ε adds ε·sin(x + t + 2s) so tests can check losses are clearly > 0 off the
    exact map (ε is a parameter so gradients can be taken).
    """

    def __init__(self, teacher: GaussianTeacher, perturbation: float = 0.0):
        super().__init__()
        self.teacher = teacher
        self.eps = nn.Parameter(torch.tensor(float(perturbation), dtype=torch.float64))
        self.num_classes = 0

    def forward(self, x, t, s, y=None):
        f = self.teacher.average_velocity(x, t, s, y)
        tb, sb = bcast(t, x), bcast(s, x)
        return f + self.eps.to(x.dtype) * torch.sin(x + tb + 2 * sb)


@register("teachers", "network")
class NetworkTeacher(nn.Module):
    """A frozen trained backbone as teacher: v_φ(x, t, y) = backbone(x, t, t, y).

    Args:
      backbone: the network (its s input, if any, is set to t).
    """

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.net = backbone.eval().requires_grad_(False)
        self.num_classes = getattr(backbone, "num_classes", 0)

    def forward(self, x, t, y=None):
        return self.net(x, t, t, y)
