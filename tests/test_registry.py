"""Every registered component builds from gin and returns finite values of the right shape;
every shipped .gin file parses with unknown keys treated as errors."""

import glob

import gin
import pytest
import torch

from decm import registry
from decm.job import build, parse
from decm.method.guidance import NoGuidance
from decm.method.objective import Context
from decm.method.teachers import GaussianTeacher

registry.import_all()


def test_every_kind_has_components():
    for kind in registry.KINDS:
        assert registry.names(kind), kind


@pytest.mark.parametrize("path", sorted(glob.glob("gin/**/*.gin", recursive=True)))
def test_shipped_gin_files_parse_strictly(path):
    parse([path], [])
    if not path.startswith(("gin/method/", "gin/cluster/", "gin/ablations/")):  # ablations: diffs, built in test_ablation.py
        build("/nonexistent/dry-run")  # builds every object (models on the meta device)


@pytest.mark.parametrize("name", registry.names("time_samplers"))
def test_time_samplers_from_gin(name):
    gin.parse_config(f"S = @time_samplers.{name}()")
    t = gin.query_parameter("%S").scoped_configurable_fn()(512, torch.Generator().manual_seed(0))
    assert t.shape == (512,) and torch.isfinite(t).all() and (t >= 0).all() and (t <= 1).all()


@pytest.mark.parametrize("name", registry.names("selectors"))
def test_selectors_from_gin(name):
    sel = registry.get("selectors", name)()
    u = torch.rand(64)
    t, s = sel(u, step=100, generator=torch.Generator().manual_seed(0))
    assert t.shape == s.shape == (64,) and (t <= s + 1e-7).all() and (t >= 0).all() and (s <= 1).all()


def _ctx(student, shape=(2,)):
    teacher = GaussianTeacher(mean=0.3, std=0.5, shape=shape)
    g = torch.Generator().manual_seed(0)
    return Context(student, teacher, NoGuidance(), teacher.sample(16, g), torch.randn((16, *shape), generator=g), None, 7)


@pytest.mark.parametrize("name", registry.names("losses"))
def test_losses_from_gin_are_finite_per_sample(name):
    torch.manual_seed(0)
    gin.parse_config(f"L = @losses.{name}()")
    loss = gin.query_parameter("%L").scoped_configurable_fn()
    student = registry.get("backbones", "mlp")(width=16, depth=1, dim=2)
    ctx = _ctx(student)
    u = torch.rand(16)
    sel = {"cm_loss": "consistency", "cm_supervised": "consistency", "cm_selfsupervised": "consistency",
           "fm_loss": "instantaneous", "n2n_loss": "noise_to_noisy", "meanflow_loss": "general_pairs"}[name]
    t, s = registry.get("selectors", sel)()(u, 0)
    out = loss(ctx, t, s)
    assert out.shape == (16,) and torch.isfinite(out).all()
    # per sample: the first 6 samples alone give the same 6 losses (no batch statistic couples them) …
    half = Context(student, ctx.teacher, NoGuidance(), ctx.x1[:6], ctx.z[:6], None, ctx.step)
    assert torch.allclose(loss(half, t[:6], s[:6]), out[:6], rtol=1e-5, atol=1e-7)
    # … and moving sample 0's noise leaves every other sample's loss as it was
    z = ctx.z.clone()
    z[0] += 0.5
    moved = loss(Context(student, ctx.teacher, NoGuidance(), ctx.x1, z, None, ctx.step), t, s)
    assert torch.allclose(moved[1:], out[1:], rtol=1e-5, atol=1e-7)
    out.mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())


@pytest.mark.parametrize("name", registry.names("samplers"))
def test_samplers_return_finite_samples(name):
    sampler = registry.get("samplers", name)()
    z = torch.randn(8, 2)
    if sampler.uses_teacher:
        net = GaussianTeacher(mean=0.3, std=0.5)
    else:
        net = registry.get("backbones", "mlp")(width=16, depth=1, dim=2)
    nfe = 1 if name == "one_step" else 4
    x = sampler(net, z, None, nfe=nfe)
    assert x.shape == z.shape and torch.isfinite(x).all()


@pytest.mark.parametrize("name", registry.names("datasets"))
def test_datasets_batches(name, tmp_path):
    from conftest import write_latents

    kwargs = dict(path=write_latents(tmp_path / "lat"), shape=(4, 8, 8), num_classes=3) if name == "latents" else {}
    ds = registry.get("datasets", name)(**kwargs)
    x, y = ds.batch(10, torch.Generator().manual_seed(0))
    assert tuple(x.shape) == (10, *ds.shape) and torch.isfinite(x).all()
    assert (y is None) == (ds.num_classes == 0)


def test_metrics_vanish_on_identical_samples():
    x = torch.randn(500, 2, generator=torch.Generator().manual_seed(0))
    assert registry.get("metrics", "sliced_wasserstein")(x, x) == 0.0
    assert abs(registry.get("metrics", "energy_distance")(x, x)) < 1e-12
    assert registry.get("metrics", "sliced_wasserstein")(x, x + 1.0) > 0.9
    # the order of the samples does not matter (both sides are sorted / all pairs are used)
    perm = x[torch.randperm(500, generator=torch.Generator().manual_seed(1))]
    assert registry.get("metrics", "sliced_wasserstein")(x, perm) < 1e-12
    assert abs(registry.get("metrics", "energy_distance")(x, perm)) < 1e-12


def test_energy_distance_and_sliced_wasserstein_by_hand():
    """Two 1-D point sets (embedded in 2-D on the first axis): energy distance
    2·E|X−Y| − E|X−X′| − E|Y−Y′| over all pairs (V-statistic), and W₂ of sorted points along θ = ±e₁."""
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    y = torch.tensor([[3.0, 0.0], [5.0, 0.0]])
    exy = (3 + 5 + 2 + 4) / 4
    exx, eyy = (0 + 1 + 1 + 0) / 4, (0 + 2 + 2 + 0) / 4
    assert abs(registry.get("metrics", "energy_distance")(x, y) - (2 * exy - exx - eyy)) < 1e-12
    # along any direction θ the sorted projections pair 0↔3 and 1↔5: W₂² = θ₁²·(9 + 16)/2
    swapped = y.flip(0)
    assert abs(registry.get("metrics", "sliced_wasserstein")(x, swapped)
               - registry.get("metrics", "sliced_wasserstein")(x, y)) < 1e-12
