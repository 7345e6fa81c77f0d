"""Built-in offline datasets.

A dataset exposes `shape` (one sample), `num_classes` (0: unconditional), `batch(n, generator)` →
(x, y or None), and `reference(n, generator)` for evaluation. 2-D sets are sampled fresh each step
from the per-step generator (infinite data); the digits are a fixed tensor indexed by the generator.
"""

from __future__ import annotations

import math

import torch

from decm.data.mixture_flow import GaussianMixtureTeacher
from decm.registry import register


class Dataset:
    """Base class (see module docstring)."""

    shape: tuple = ()
    num_classes: int = 0

    def batch(self, n: int, generator=None):  # pragma: no cover - abstract
        raise NotImplementedError

    def reference(self, n: int, generator=None):
        return self.batch(n, generator)

    def analytic_teacher(self):
        raise ValueError(f"{type(self).__name__} has no analytic teacher; set train.teacher_source = 'checkpoint'")


@register("datasets", "gaussian_mixture_2d")
class GaussianMixture2D(Dataset):
    """Mixture of `modes` isotropic Gaussians on a circle of `radius`; exact teacher and density available.

    Equal weights and one `std` by default (the 8-mode benchmark); `weights` and `stds` make the modes
    uneven (gin/toy2d_uneven.gin). Samples, the exact velocity (`analytic_teacher`) and the exact
    density (`analytic_teacher().log_density`) all come from the same weights and widths.

    Args:
      modes: number of components.
      radius: radius of the circle of means (data units).
      std: component standard deviation (data units) when `stds` is not given.
      conditional: labels are the component index (CFG well defined with the analytic teacher).
      weights: one mixture weight per mode (normalised to sum 1); None: equal weights.
      stds: one standard deviation per mode (data units); None: `std` for every mode.
    """

    def __init__(self, modes: int = 8, radius: float = 2.0, std: float = 0.1, conditional: bool = False,
                 weights=None, stds=None):
        if weights is not None and (len(weights) != modes or min(weights) <= 0):
            raise ValueError(f"gaussian_mixture_2d.weights needs {modes} positive entries (one per mode), got {weights!r}")
        if stds is not None and (len(stds) != modes or min(stds) <= 0):
            raise ValueError(f"gaussian_mixture_2d.stds needs {modes} positive entries (one per mode), got {stds!r}")
        ang = torch.arange(modes, dtype=torch.float64) * 2 * math.pi / modes
        self.means = torch.stack([radius * ang.cos(), radius * ang.sin()], 1)
        self.std, self.modes = std, modes
        self.stds = torch.full((modes,), float(std), dtype=torch.float64) if stds is None else \
            torch.tensor([float(s) for s in stds], dtype=torch.float64)
        w = None if weights is None else torch.tensor([float(v) for v in weights], dtype=torch.float64)
        self.weights = None if w is None else w / w.sum()
        self.shape = (2,)
        self.num_classes = modes if conditional else 0
        self._teacher = GaussianMixtureTeacher(self.means, self.stds, self.weights)

    def batch(self, n, generator=None):
        if self.weights is None:  # equal weights: the draw the 8-mode benchmark has always used
            y = torch.randint(0, self.modes, (n,), generator=generator)
        else:
            y = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        x = self.means[y] + self.stds[y].unsqueeze(1) * torch.randn((n, 2), generator=generator, dtype=torch.float64)
        return x.float(), (y if self.num_classes else None)

    def analytic_teacher(self):
        return self._teacher


@register("datasets", "checkerboard")
class Checkerboard(Dataset):
    """2-D checkerboard on [−2, 2]² with 4×4 cells (half of them filled), uniform in each cell."""

    shape = (2,)

    def batch(self, n, generator=None):
        x1 = torch.rand(n, generator=generator) * 4 - 2
        x2_ = torch.rand(n, generator=generator) - torch.randint(0, 2, (n,), generator=generator).float() * 2
        x2 = x2_ + (torch.floor(x1) % 2)
        return torch.stack([x1, x2], 1) * 1.0, None


@register("datasets", "two_moons")
class TwoMoons(Dataset):
    """Two interleaving half circles (scaled to ~[−2, 2]) with Gaussian noise.

    Args:
      noise: std of the added noise.
    """

    shape = (2,)

    def __init__(self, noise: float = 0.05):
        self.noise = noise

    def batch(self, n, generator=None):
        side = torch.randint(0, 2, (n,), generator=generator)
        ang = torch.rand(n, generator=generator) * math.pi
        x = torch.where(side.bool(), 1 - ang.cos(), ang.cos())
        y = torch.where(side.bool(), 0.5 - ang.sin(), ang.sin())
        pts = torch.stack([x - 0.5, y - 0.25], 1) * 1.6
        return pts + self.noise * torch.randn((n, 2), generator=generator), None


@register("datasets", "spirals")
class Spirals(Dataset):
    """Two interleaved spirals (radius ≤ ~2) with Gaussian noise.

    Args:
      noise: std of the added noise.
    """

    shape = (2,)

    def __init__(self, noise: float = 0.05):
        self.noise = noise

    def batch(self, n, generator=None):
        arm = torch.randint(0, 2, (n,), generator=generator).float()
        r = torch.sqrt(torch.rand(n, generator=generator)) * 2.0
        ang = r * 2.5 + arm * math.pi
        pts = torch.stack([r * ang.cos(), r * ang.sin()], 1)
        return pts + self.noise * torch.randn((n, 2), generator=generator), None


@register("datasets", "digits")
class Digits(Dataset):
    """scikit-learn's bundled handwritten digits: 1,797 real 8×8 images, 10 classes, scaled to [−1, 1].

    Args:
      image_size: 8 (native) or larger (bilinear upsampling, e.g. 16).
      conditional: use the class labels (10 classes + a null class for CFG).
    """

    def __init__(self, image_size: int = 8, conditional: bool = True):
        from sklearn.datasets import load_digits

        data = load_digits()
        x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
        if image_size != 8:
            x = torch.nn.functional.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
        self.images = x.clamp(-1, 1)
        self.labels = torch.tensor(data.target, dtype=torch.long)
        self.shape = tuple(self.images.shape[1:])
        self.num_classes = 10 if conditional else 0

    def batch(self, n, generator=None):
        idx = torch.randint(0, len(self.images), (n,), generator=generator)
        return self.images[idx], (self.labels[idx] if self.num_classes else None)

    def reference(self, n, generator=None):
        n = min(n, len(self.images))
        idx = torch.randperm(len(self.images), generator=generator)[:n]
        return self.images[idx], (self.labels[idx] if self.num_classes else None)
