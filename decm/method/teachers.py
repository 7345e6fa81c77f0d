"""Teachers: the frozen velocity field v_φ(x, t, y) that DE-CM distils.

Analytic teachers give the exact velocity (and, for a Gaussian, the exact flow map) of the linear
path x_t = (1 − t)·z + t·x₁, z ~ N(0, I), so the method can be tested and studied without training
a teacher. A network teacher wraps a trained backbone. The mixtures' exact velocity lives beside the
data (decm.data.mixture_flow, re-exported here), so the datasets need nothing from the method.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from decm.data.mixture_flow import AnalyticTeacher, GaussianMixtureTeacher, ode_flow  # noqa: F401  (public names)
from decm.method.shapes import bcast
from decm.registry import register


def _gauss_scale(t, sigma2):
    """S_t = sqrt((1 − t)² + t²σ²): the per-dimension std of x_t for x₁ ~ N(μ, σ²I)."""
    return torch.sqrt((1 - t) ** 2 + t ** 2 * sigma2)


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
