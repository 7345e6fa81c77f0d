"""Core math checks against exact references (docs/method.md, "Exact references")."""

import math

import pytest
import torch

from decm.method.guidance import CFG, NoGuidance
from decm.method.jvp import flow_map_jvp
from decm.method.losses import CMLoss, FMLoss, MeanFlowLoss, N2NLoss
from decm.method.n2n import tangent_derived, tangent_note
from decm.method.objective import Context
from decm.method.teachers import ExactFlowMap, GaussianMixtureTeacher, GaussianTeacher, ode_flow



pytestmark = pytest.mark.usefixtures("float64_default")  # exact references in float64 (tests/conftest.py)


def gaussian(shape=(2,)):
    mu = torch.linspace(-0.7, 1.1, math.prod(shape)).reshape(shape).tolist()
    return GaussianTeacher(mean=mu, std=0.6, shape=shape)


def make_ctx(student, teacher, shape=(2,), batch=64, seed=0, step=0):
    g = torch.Generator().manual_seed(seed)
    x1 = teacher.sample(batch, g).double()
    z = torch.randn((batch, *shape), generator=g)
    return Context(student, teacher, NoGuidance(), x1, z, None, step), g


def test_gaussian_velocity_matches_exact_flow_map_ode():
    teacher = gaussian()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 2, generator=g)
    t, s = torch.rand(16, generator=g) * 0.5, 0.5 + torch.rand(16, generator=g) * 0.5
    exact = x + (s - t).unsqueeze(1) * teacher.average_velocity(x, t, s)
    solved = ode_flow(teacher, x, t, s, steps=400)
    assert torch.allclose(exact, solved, atol=1e-9)
    # F(x, t, t) is the velocity.
    assert torch.allclose(teacher.average_velocity(x, t, t), teacher(x, t), atol=1e-12)


def mixture_velocity_from_the_score(teacher, x, t):
    """v(x, t) = (x + (1 − t)·∇ log p_t(x)) / t, with p_t = Σ w_k N(t·m_k, ((1−t)² + t²s_k²) I) and the
    score from autograd: Tweedie's E[z | x_t] = −(1 − t)·∇ log p_t, and x_t = t·E[x₁|x_t] + (1 − t)·E[z|x_t]
    give v = E[x₁ − z | x_t] = (x − E[z | x_t]) / t. Independent of the teacher's per-component formula."""
    x = x.clone().requires_grad_(True)
    d = x.shape[1]
    var = (1 - t) ** 2 + t ** 2 * teacher.stds ** 2                      # (K,)
    diff = x.unsqueeze(1) - t * teacher.means.unsqueeze(0)               # (B, K, D)
    log_comp = (torch.log(teacher.weights) - 0.5 * d * torch.log(2 * math.pi * var)
                - 0.5 * (diff ** 2).sum(-1) / var)
    logp = torch.logsumexp(log_comp, dim=1)
    (score,) = torch.autograd.grad(logp.sum(), x)
    return (x + (1 - t) * score).detach() / t


def test_gaussian_mixture_velocity_is_posterior_expectation():
    teacher = GaussianMixtureTeacher(means=[[-1.0, 0.0], [1.5, 0.5]], stds=[0.3, 0.2], weights=[0.3, 0.7])
    g = torch.Generator().manual_seed(0)
    x = 1.5 * torch.randn(64, 2, generator=g)
    for t in (0.05, 0.3, 0.6, 0.95):
        exact = mixture_velocity_from_the_score(teacher, x, t)
        ours = teacher(x, torch.full((64,), t))
        assert torch.allclose(ours, exact, atol=1e-10, rtol=0), (t, float((ours - exact).abs().max().detach()))


def perturbed_pair(shape=(2,)):
    teacher = gaussian(shape)
    return teacher, ExactFlowMap(teacher, 0.0), ExactFlowMap(teacher, 0.1)


@pytest.mark.parametrize("target", ["facm", "scm", "plain"])
def test_cm_loss_vanishes_on_exact_map(target):
    teacher, exact, bad = perturbed_pair()
    loss = CMLoss(target=target, weighting="none", robust_c=0.0)
    t = torch.rand(64, generator=torch.Generator().manual_seed(3)) * 0.95
    s = torch.ones_like(t)
    ctx, _ = make_ctx(exact, teacher)
    val = loss(ctx, t, s).mean()
    ctx_b, _ = make_ctx(bad, teacher)
    val_bad = loss(ctx_b, t, s).mean()
    assert val_bad > 1e-4
    assert val < 1e-10 * max(1.0, float(val_bad)) or val < 1e-12


def test_fm_loss_vanishes_on_exact_map():
    teacher, exact, bad = perturbed_pair((1, 4, 4))
    loss = FMLoss()
    t = torch.rand(32, generator=torch.Generator().manual_seed(4))
    ctx, _ = make_ctx(exact, teacher, shape=(1, 4, 4), batch=32)
    assert loss(ctx, t, t).abs().max() < 1e-12
    ctx_b, _ = make_ctx(bad, teacher, shape=(1, 4, 4), batch=32)
    assert loss(ctx_b, t, t).mean() > 1e-4


@pytest.mark.parametrize("lam,gamma,tangent", [
    (0.5, 1.0, tangent_derived), (1.0, 1.0, tangent_derived), (1.0, 1.0, tangent_note),
    (0.5, 0.5, tangent_note), (0.0, 1.0, tangent_derived), (1.0, 0.0, tangent_derived)])
def test_n2n_loss_vanishes_on_exact_map(lam, gamma, tangent):
    teacher, exact, bad = perturbed_pair()
    loss = N2NLoss(lam=lam, gamma=gamma, tangent=tangent)
    g = torch.Generator().manual_seed(5)
    r = torch.full((64,), 0.05)
    t = r + (1 - r) * torch.rand(64, generator=g)
    ctx, _ = make_ctx(exact, teacher)
    _, res, _ = loss.residual(ctx, r, t)
    assert res.abs().max() < 1e-9
    assert loss(ctx, r, t).max() < 1e-16
    ctx_b, _ = make_ctx(bad, teacher)
    assert loss(ctx_b, r, t).mean() > 1e-5


def test_n2n_note_tangent_is_wrong_when_lambda_differs_from_gamma():
    """docs/method.md: with λ = 0.5, γ = 1 the note's tangent leaves a residual on the exact map."""
    teacher, exact, _ = perturbed_pair()
    g = torch.Generator().manual_seed(6)
    r = torch.full((64,), 0.05)
    t = r + (1 - r) * torch.rand(64, generator=g)
    ctx, _ = make_ctx(exact, teacher)
    _, res_note, _ = N2NLoss(lam=0.5, gamma=1.0, tangent=tangent_note).residual(ctx, r, t)
    _, res_derived, _ = N2NLoss(lam=0.5, gamma=1.0, tangent=tangent_derived).residual(ctx, r, t)
    assert res_derived.abs().max() < 1e-9
    assert res_note.norm(dim=1).mean() > 1e-3


def test_meanflow_loss_vanishes_on_exact_map():
    teacher, exact, bad = perturbed_pair()
    g = torch.Generator().manual_seed(7)
    a, b = torch.rand(64, generator=g), torch.rand(64, generator=g)
    t, s = torch.minimum(a, b), torch.maximum(a, b)
    loss = MeanFlowLoss(adaptive_p=0.0)
    ctx, _ = make_ctx(exact, teacher)
    assert loss(ctx, t, s).max() < 1e-16
    ctx_b, _ = make_ctx(bad, teacher)
    assert loss(ctx_b, t, s).mean() > 1e-5


def test_n2n_lambda0_gamma1_is_meanflow_target():
    teacher, _, bad = perturbed_pair()
    g = torch.Generator().manual_seed(8)
    r = torch.full((32,), 0.08)
    t = r + (1 - r) * torch.rand(32, generator=g)
    ctx, _ = make_ctx(bad, teacher, batch=32)
    _, n2n_target = N2NLoss(lam=0.0, gamma=1.0).target(ctx, r, t)
    _, mf_target = MeanFlowLoss().target(ctx, r, t)
    assert torch.allclose(n2n_target, mf_target, atol=1e-12)


def test_cm_gradient_equals_supervised_plus_selfsupervised_gradient():
    """At F = F⁻, ∇ L_cm(plain) = ∇ (‖F − v‖² + ‖F − ṽ‖²) (eq. 8 decomposition)."""
    teacher, _, bad = perturbed_pair()
    net = torch.nn.Sequential(torch.nn.Linear(4, 32), torch.nn.Tanh(), torch.nn.Linear(32, 2)).double()

    class Student(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x, t, s, y=None):
            return teacher(x, t) + self.net(torch.cat([x, t[:, None], s[:, None]], 1))

    student = Student()
    t = torch.rand(32, generator=torch.Generator().manual_seed(9)) * 0.9
    s = torch.ones_like(t)
    loss = CMLoss(target="plain", weighting="none", robust_c=0.0)
    ctx, _ = make_ctx(student, teacher, batch=32)
    g_cm = torch.autograd.grad(loss(ctx, t, s).mean(), list(student.parameters()))
    ctx, _ = make_ctx(student, teacher, batch=32)
    sup, self_sup = loss.parts(ctx, t, s)
    g_parts = torch.autograd.grad((sup + self_sup).mean(), list(student.parameters()))
    for a, b in zip(g_cm, g_parts):
        assert torch.allclose(a, b, atol=1e-12)
    assert max(float(a.abs().max()) for a in g_cm) > 1e-6


def test_cfg_clipping_and_interval():
    teacher = GaussianMixtureTeacher(means=[[-1.0, 0.0], [1.0, 0.0]], stds=0.2)
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(0))
    y = torch.zeros(8, dtype=torch.long)
    t = torch.linspace(0.05, 0.95, 8)
    v_c, v_u = teacher(x, t, y), teacher(x, t, torch.full_like(y, 2))
    plain = CFG(scale=2.0)(teacher, x, t, y)
    assert torch.allclose(plain, v_c + (v_c - v_u), atol=1e-12)
    # clipped: v_c + (w − 1)·min(1, η/‖Δ‖)·Δ, exactly (w = 2, η = 0.01)
    delta = v_c - v_u
    factor = torch.clamp(0.01 / delta.norm(dim=1, keepdim=True), max=1.0)
    assert (factor < 1).sum() >= 6  # the clip is active on most samples
    clipped = CFG(scale=2.0, clip_norm=0.01)(teacher, x, t, y)
    assert torch.allclose(clipped, v_c + factor * delta, atol=1e-12, rtol=0)
    interval = CFG(scale=2.0, interval=(0.5, 1.0))(teacher, x, t, y)
    assert torch.allclose(interval[t < 0.5], v_c[t < 0.5]) and torch.allclose(interval[t >= 0.5], plain[t >= 0.5])
    assert torch.allclose(CFG(scale=1.0)(teacher, x, t, y), v_c)


def test_finite_difference_jvp_matches_autograd_on_exact_map():
    teacher, _, bad = perturbed_pair()
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(1))
    t, s = torch.full((8,), 0.3), torch.full((8,), 0.9)
    dx, dt, ds = torch.randn(8, 2), torch.ones(8), -0.5 * torch.ones(8)
    _, a = flow_map_jvp(bad, x, t, s, None, dx, dt, ds, method="autograd")
    _, b = flow_map_jvp(bad, x, t, s, None, dx, dt, ds, method="fd", fd_eps=1e-5)
    assert torch.allclose(a, b, atol=1e-8)


def test_noise_to_noisy_t_max_limits_the_end_time():
    from decm.method.selectors import NoiseToNoisy

    u = torch.linspace(0, 1, 101)
    r, t = NoiseToNoisy(delta=0.1, decay_steps=0)(u, 0)
    assert torch.allclose(t, 0.1 + 0.9 * u)  # the paper's: any t up to 1
    r, t = NoiseToNoisy(delta=0.1, decay_steps=0, t_max=0.5)(u, 0)
    assert float(t.max()) == pytest.approx(0.5) and float(t.min()) == pytest.approx(0.1) and (r == 0.1).all()
    with pytest.raises(ValueError, match="t_max"):
        NoiseToNoisy(delta=0.1, t_max=0.05)


def test_context_point_is_the_linear_path_from_noise_to_data():
    """x_t = (1 − t)·z + t·x₁ with t = 0 noise and t = 1 data (the losses vanish on the exact map at any
    point, so they cannot tell which end is which; this can)."""
    g = torch.Generator().manual_seed(0)
    x1, z = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    ctx = Context(None, None, NoGuidance(), x1, z, None, 0)
    t = torch.tensor([0.0, 0.25, 0.5, 0.8, 1.0])
    for i in range(5):
        assert torch.allclose(ctx.point(t)[i], (1 - t[i]) * z[i] + t[i] * x1[i], atol=1e-15)
    assert torch.equal(ctx.point(torch.zeros(5)), z) and torch.equal(ctx.point(torch.ones(5)), x1)
