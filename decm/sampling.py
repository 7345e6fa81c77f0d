"""Samplers. Students are called as F(x, t, s, y); teachers as v(x, t, y). t = 0 noise, t = 1 data.

Every sampler is `sampler(net, z, y, nfe, generator) -> x₁` and counts one network call per NFE.
"""

from __future__ import annotations

import torch

from decm.registry import register


def time_grid(nfe: int, shift: float = 1.0, grid=None) -> list[float]:
    """nfe + 1 times from 0 to 1: uniform, or warped by a timestep shift t ↦ t/(t + shift·(1 − t)).

    shift < 1 spends more steps near data, shift > 1 near noise (LightningDiT uses 0.3 in its
    convention); a given `grid` (list) is used as is after validation.
    """
    if grid is not None:
        grid = [float(v) for v in grid]
        if len(grid) != nfe + 1 or grid[0] != 0.0 or grid[-1] != 1.0 or any(b <= a for a, b in zip(grid, grid[1:])):
            raise ValueError(f"time grid must increase from 0 to 1 with nfe + 1 = {nfe + 1} points, got {grid}")
        return grid
    u = torch.linspace(0, 1, nfe + 1, dtype=torch.float64)
    warped = u / (u + shift * (1 - u))
    return [float(v) for v in warped]


class Sampler:
    """Base class for samplers (`uses_teacher` tells whether `net` is a teacher v(x, t, y))."""

    uses_teacher = False

    def __call__(self, net, z, y=None, nfe: int = 1, generator=None):  # pragma: no cover - abstract
        raise NotImplementedError


@register("samplers", "one_step")
class OneStep(Sampler):
    """1 NFE: x̂ = f(z, 0, 1) = z + F(z, 0, 1). `nfe` must be 1."""

    @torch.no_grad()
    def __call__(self, net, z, y=None, nfe=1, generator=None):
        if nfe != 1:
            raise ValueError(f"one_step sampler takes nfe=1, got {nfe}")
        t0, t1 = torch.zeros(z.shape[0], device=z.device), torch.ones(z.shape[0], device=z.device)
        return z + net(z, t0, t1, y)


@register("samplers", "chain")
class Chain(Sampler):
    """Flow-map chain: x_{k+1} = x_k + (t_{k+1} − t_k)·F(x_k, t_k, t_{k+1}); the first hop is N2N.

    Args:
      shift: timestep shift of the grid (1.0: uniform).
      grid: explicit times (length nfe + 1), overrides shift.
    """

    def __init__(self, shift: float = 1.0, grid=None):
        self.shift, self.grid = shift, grid

    @torch.no_grad()
    def __call__(self, net, z, y=None, nfe=1, generator=None, trajectory: list | None = None):
        ts = time_grid(nfe, self.shift, self.grid)
        x = z
        for a, b in zip(ts[:-1], ts[1:]):
            ta = torch.full((z.shape[0],), a, device=z.device)
            tb = torch.full((z.shape[0],), b, device=z.device)
            x = x + (b - a) * net(x, ta, tb, y)
            if trajectory is not None:
                trajectory.append((b, x.clone()))
        return x


@register("samplers", "cm_renoise")
class CMRenoise(Sampler):
    """CM jump + re-noise (FACM): x̂ = f(x_k, t_k, 1), x_{k+1} = t_{k+1}·x̂ + (1 − t_{k+1})·ε.

    With an exact flow map, x_{k+1} has the marginal of time t_{k+1} (tested); `trajectory`, when a list,
    receives (t_{k+1}, x_{k+1}) after each re-noise and (1.0, x̂) at the end.

    Args:
      shift: timestep shift of the grid.
    """

    def __init__(self, shift: float = 1.0):
        self.shift = shift

    @torch.no_grad()
    def __call__(self, net, z, y=None, nfe=1, generator=None, trajectory: list | None = None):
        ts = time_grid(nfe, self.shift)
        x, one = z, torch.ones(z.shape[0], device=z.device)
        x_hat = z
        for k, a in enumerate(ts[:-1]):
            ta = torch.full((z.shape[0],), a, device=z.device)
            x_hat = x + (1 - a) * net(x, ta, one, y)
            b = ts[k + 1]
            if b < 1.0:
                eps = torch.randn(z.shape, generator=generator, dtype=z.dtype).to(z.device)
                x = b * x_hat + (1 - b) * eps
                if trajectory is not None:
                    trajectory.append((b, x.clone()))
        if trajectory is not None:
            trajectory.append((1.0, x_hat.clone()))
        return x_hat


@register("samplers", "euler_instant")
class EulerInstant(Sampler):
    """Euler on the student's instantaneous velocity F(x, t, t) (many-step sampling, e.g. 50 NFE).

    Args:
      shift: timestep shift of the grid.
    """

    def __init__(self, shift: float = 1.0):
        self.shift = shift

    @torch.no_grad()
    def __call__(self, net, z, y=None, nfe=50, generator=None):
        ts = time_grid(nfe, self.shift)
        x = z
        for a, b in zip(ts[:-1], ts[1:]):
            ta = torch.full((z.shape[0],), a, device=z.device)
            x = x + (b - a) * net(x, ta, ta, y)
        return x


@register("samplers", "teacher_euler")
class TeacherEuler(Sampler):
    """Euler on the teacher velocity v(x, t, y) (with the teacher's guidance if given).

    Args:
      shift: timestep shift of the grid.
      guidance: optional guidance component applied to the teacher (e.g. cfg).
    """

    uses_teacher = True

    def __init__(self, shift: float = 1.0, guidance=None):
        self.shift, self.guidance = shift, guidance

    def velocity(self, net, x, t, y):
        return self.guidance(net, x, t, y) if self.guidance is not None else net(x, t, y)

    @torch.no_grad()
    def __call__(self, net, z, y=None, nfe=50, generator=None):
        ts = time_grid(nfe, self.shift)
        x = z
        for a, b in zip(ts[:-1], ts[1:]):
            x = x + (b - a) * self.velocity(net, x, torch.full((z.shape[0],), a, device=z.device), y)
        return x


@register("samplers", "teacher_heun")
class TeacherHeun(TeacherEuler):
    """Heun (2nd order) on the teacher velocity: nfe/2 steps of two calls each (nfe must be even).

    Args:
      shift: timestep shift of the grid.
      guidance: optional guidance component applied to the teacher.
    """

    @torch.no_grad()
    def __call__(self, net, z, y=None, nfe=50, generator=None):
        if nfe < 2 or nfe % 2:
            raise ValueError(f"teacher_heun needs an even nfe >= 2, got {nfe}")
        ts = time_grid(nfe // 2, self.shift)
        x, n = z, z.shape[0]
        for a, b in zip(ts[:-1], ts[1:]):
            va = self.velocity(net, x, torch.full((n,), a, device=z.device), y)
            vb = self.velocity(net, x + (b - a) * va, torch.full((n,), b, device=z.device), y)
            x = x + (b - a) * 0.5 * (va + vb)
        return x
