"""Peers' arithmetic, checked against values computed by hand from their code.

- CFG on three channels: willisma/SiT `models.py` and hustvl/LightningDiT `lightningdit.py`
  `forward_with_cfg` (`eps, rest = model_out[:, :3], model_out[:, 3:]`).
- FACM's CM loss: ali-vilab/FACM `losses.py`, `cm_loss = norm_l2_loss(F_avg, target) * beta`.
- sCM: FACM's `sCMLoss` (g = cos(πt/2)·(F⁻ − v̄), RMS norm `g_norm * sqrt(g_norm.numel() / g.numel())`);
  the sCM paper's plain L2 norm as the 'l2' option.
"""

import math

import gin
import pytest
import torch

from decm.method.guidance import CFG
from decm.method.losses import CMLoss, CMSelfSupervised, CMSupervised, LogVarianceWeight, N2NLoss
from decm.method.n2n import tangent_note
from decm.method.teachers import NetworkTeacher
from decm.models.sit import sit
from decm.sampling import TeacherEuler, TeacherHeun


pytestmark = pytest.mark.usefixtures("float64_default")  # exact references in float64 (tests/conftest.py)


def random_teacher(in_channels=4, learn_sigma=False, seed=0):
    """A tiny SiT velocity teacher with every weight random (the zero-initialised layers included)."""
    torch.manual_seed(seed)
    net = sit("tiny", input_size=8, in_channels=in_channels, num_classes=10, flow_map=False, hidden_size=64,
              depth=2, learn_sigma=learn_sigma)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.2)
    return NetworkTeacher(net)


def official_forward_with_cfg(teacher, x, t, y, cfg_scale):
    """Independent re-implementation of the official SiT `forward_with_cfg` on one (x, t, y) batch.

    half = x; combined = [half, half]; labels [y, null]; model_out = forward(combined);
    eps, rest = model_out[:, :3], model_out[:, 3:]; half_eps = uncond + s·(cond − uncond);
    output channels: [half_eps, rest of the conditional half].
    """
    combined = torch.cat([x, x], 0)
    labels = torch.cat([y, torch.full_like(y, teacher.num_classes)], 0)
    model_out = teacher(combined, torch.cat([t, t], 0), labels)
    eps, rest = model_out[:, :3], model_out[:, 3:]
    cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
    half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
    return torch.cat([half_eps, rest[: len(x)]], dim=1)


def batch(n=6, channels=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, channels, 8, 8, generator=g, dtype=torch.float64)
    t = torch.rand(n, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (n,), generator=g)
    return x, t, y


def test_three_channel_cfg_equals_the_official_formula():
    teacher = random_teacher()
    x, t, y = batch()
    ours = CFG(scale=4.0, guided_channels=3)(teacher, x, t, y)
    official = official_forward_with_cfg(teacher, x, t, y, 4.0)
    assert torch.allclose(ours, official, atol=1e-12, rtol=0)
    v_c = teacher(x, t, y)
    assert torch.allclose(ours[:, 3:], v_c[:, 3:], atol=1e-12, rtol=0)  # channel 3 stays conditional
    everything = CFG(scale=4.0)(teacher, x, t, y)
    assert (everything[:, 3] - official[:, 3]).abs().max() > 0.1  # all-channel guidance is a different field


def test_official_cfg_with_learned_sigma_teacher_guides_channels_0_to_2():
    """SiT-XL/2 style: 8 output channels, the velocity is the first 4 (our backbone returns those)."""
    teacher = random_teacher(learn_sigma=True)
    x, t, y = batch()
    ours = CFG(scale=1.5, guided_channels=3)(teacher, x, t, y)
    assert ours.shape == x.shape
    assert torch.allclose(ours, official_forward_with_cfg(teacher, x, t, y, 1.5), atol=1e-12, rtol=0)


def test_all_channel_cfg_is_unchanged():
    """guided_channels = None keeps the formula v_c + (w − 1)·Δ on every channel, bit for bit."""
    teacher = random_teacher()
    x, t, y = batch()
    v_c, v_u = teacher(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, 10)])).chunk(2)
    assert torch.equal(CFG(scale=1.75)(teacher, x, t, y), v_c + 0.75 * (v_c - v_u))


def test_clip_uses_the_guided_channels_only():
    teacher = random_teacher()
    x, t, y = batch()
    eta, w = 0.5, 3.0
    v_c, v_u = teacher(x, t, y), teacher(x, t, torch.full_like(y, 10))
    delta3 = (v_c - v_u)[:, :3]
    factor = torch.clamp(eta / delta3.flatten(1).norm(dim=1), max=1.0).view(-1, 1, 1, 1)
    expected = torch.cat([v_c[:, :3] + (w - 1) * factor * delta3, v_c[:, 3:]], 1)
    ours = CFG(scale=w, clip_norm=eta, guided_channels=3)(teacher, x, t, y)
    assert (factor < 1).any()  # the clip is active on some samples
    assert torch.allclose(ours, expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("sampler_cls,nfe", [(TeacherEuler, 4), (TeacherHeun, 4)])
def test_teacher_samplers_use_the_guided_channels(sampler_cls, nfe):
    teacher = random_teacher()
    x, _, y = batch()
    sampler = sampler_cls(guidance=CFG(scale=2.0, guided_channels=3))
    ours = sampler(teacher, x, y, nfe=nfe)

    class Official:  # the same sampler stepping with the official formula
        def __call__(self, net, xx, tt, yy):
            return official_forward_with_cfg(net, xx, tt, yy, 2.0)

    reference = sampler_cls(guidance=Official())(teacher, x, y, nfe=nfe)
    assert torch.allclose(ours, reference, atol=1e-10, rtol=0)
    assert not torch.allclose(ours, sampler_cls(guidance=CFG(scale=2.0))(teacher, x, y, nfe=nfe), atol=1e-3)


def test_guided_channels_bad_values():
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="guided_channels"):
            CFG(guided_channels=bad)
    teacher = random_teacher()
    x, t, y = batch()
    with pytest.raises(ValueError, match="at least 5 channels"):
        CFG(scale=2.0, guided_channels=5)(teacher, x, t, y)


def test_facm_cm_reduction_normalises_then_weights_by_time():
    """FACM: e / (e + c)^q, then × cos(πt/2). e = 4, t = 0.5, c = 1e-3, q = 0.5:
    4 / sqrt(4.001) · cos(π/4) = 1.4140368, where weighting first gives cos(π/4)·4 / sqrt(2.8294) = 1.68159."""
    loss = CMLoss()  # FACM defaults: cos weighting, robust c = 1e-3, q = 0.5
    got = loss.reduce(torch.tensor([4.0], dtype=torch.float64), torch.tensor([0.5], dtype=torch.float64))
    by_hand = 4.0 / math.sqrt(4.001) * math.cos(math.pi / 4)
    assert abs(float(got) - by_hand) < 1e-12
    weighting_first = math.cos(math.pi / 4) * 4.0 / math.sqrt(math.cos(math.pi / 4) * 4.0 + 1e-3)
    assert abs(float(got) - weighting_first) > 0.2  # the order matters at this point


def test_facm_cm_reduction_is_per_sample():
    """A batch of three errors at three times: each reduced with its own e and t (FACM's
    `norm_l2_loss` is per sample, `beta` per sample), so a batch-wide normaliser would fail."""
    e = torch.tensor([4.0, 0.01, 0.5], dtype=torch.float64)
    t = torch.tensor([0.5, 0.1, 0.9], dtype=torch.float64)
    got = CMLoss().reduce(e, t)
    for i in range(3):
        by_hand = float(e[i]) / math.sqrt(float(e[i]) + 1e-3) * math.cos(math.pi * float(t[i]) / 2)
        assert abs(float(got[i]) - by_hand) < 1e-12


class StubCtx:
    """A context with fixed x, v, F⁻ and dF⁻/dt, so a target can be computed by hand."""

    def __init__(self, x, v, f_minus, df_dt, step=10**9):
        self.x, self.v, self.f_minus, self.df_dt, self.step = x, v, f_minus, df_dt, step

    def point(self, t):
        return self.x

    def velocity(self, x, t):
        return self.v

    def jvp(self, x, t, s, dx, dt, ds):
        return self.f_minus, self.df_dt

    def record(self, name, value):
        pass


def scm_case(t_value):
    """One 4×32×32 sample (D = 4096) with residual g = F⁻ − (v + (1 − t)·dF/dt) = 2 everywhere."""
    shape = (1, 4, 32, 32)
    f_minus = torch.full(shape, 3.0, dtype=torch.float64)
    v = torch.full(shape, 1.0, dtype=torch.float64)
    df_dt = torch.zeros(shape, dtype=torch.float64)
    return StubCtx(torch.zeros(shape, dtype=torch.float64), v, f_minus, df_dt), torch.tensor([t_value],
                                                                                               dtype=torch.float64)


@pytest.mark.parametrize("norm,weight,t_value,expected_step", [
    # FACM sCMLoss: g′ = cos(πt/2)·g; rms(g′) = |g′|; step g′/(rms + 0.1)
    ("rms", "cos", 0.0, 2.0 / (2.0 + 0.1)),                                   # 0.952381
    ("rms", "cos", 0.5, 2 * math.cos(math.pi / 4) / (2 * math.cos(math.pi / 4) + 0.1)),  # 0.933959
    # the sCM paper: the L2 norm over all D = 4096 dims is 64 × the RMS
    ("l2", "none", 0.5, 2.0 / (2.0 * 64 + 0.1)),                              # 0.0156128
])
def test_scm_target_by_hand(norm, weight, t_value, expected_step):
    ctx, t = scm_case(t_value)
    _, target = CMLoss(target="scm", tangent_norm=norm, tangent_weight=weight).target(ctx, t, torch.ones_like(t))
    # target = F⁻ − step: F⁻ = 3 everywhere
    assert torch.allclose(3.0 - target, torch.full_like(target, expected_step), atol=1e-12)


def test_robust_normalisation_stops_the_gradient_of_its_denominator():
    """FACM `norm_l2_loss`: e / (e + c).pow(p).detach(), so d/dθ = e′(θ) / (e + c)^p — the value alone
    cannot tell it from e / (e + c)^p, the gradient can (that one would be e′·(e + c − p·e)/(e + c)^(p+1))."""
    theta = torch.tensor([0.7, 1.9], dtype=torch.float64, requires_grad=True)
    e = theta ** 2
    t = torch.tensor([0.3, 0.6], dtype=torch.float64)
    CMLoss().reduce(e, t).sum().backward()
    for i in range(2):
        th, ti = float(theta[i]), float(t[i])
        by_hand = 2 * th / math.sqrt(th ** 2 + 1e-3) * math.cos(math.pi * ti / 2)
        assert abs(float(theta.grad[i]) - by_hand) < 1e-12, (i, float(theta.grad[i]), by_hand)


def residual_batch():
    """Three samples (3×2×2×2, D = 8) with their own times and residuals that differ inside each sample
    and from sample to sample: some entries of g beyond ±1 (FACM's clamp is active), some inside."""
    t = torch.tensor([0.16, 0.49, 0.81], dtype=torch.float64)
    k = torch.arange(24, dtype=torch.float64).reshape(3, 2, 2, 2)
    f_minus = 0.3 * torch.sin(k) + 0.1 * k / 24
    v = torch.cos(1.7 * k)
    df_dt = 0.25 * (k % 5) - 1.5 * torch.arange(3, dtype=torch.float64).view(3, 1, 1, 1) ** 2
    return StubCtx(torch.zeros_like(k), v, f_minus, df_dt), t, f_minus, v, df_dt


def facm_target_by_hand(t, f, v, dfdt, p=0.5):
    """ali-vilab/FACM `losses.py`, `FACMLoss.__call__`, element by element in Python floats:
    v_bar = v + (t_end − t)·F_avg_grad; g = F_avg_sg − v_bar; alpha = 1 − alpha_t ** p (alpha_t = t);
    target = F_avg_sg − alpha·g.clamp(min=−1, max=1)."""
    v_bar = v + (1.0 - t) * dfdt
    g = f - v_bar
    alpha = 1.0 - t ** p
    return f - alpha * max(-1.0, min(1.0, g)), g


def test_facm_target_by_hand_on_a_batch():
    ctx, t, f, v, dfdt = residual_batch()
    _, target = CMLoss(target="facm").target(ctx, t, torch.ones_like(t))
    clamped = 0
    for idx in torch.cartesian_prod(*(torch.arange(n) for n in f.shape)).tolist():
        i = tuple(idx)
        expected, g = facm_target_by_hand(float(t[i[0]]), float(f[i]), float(v[i]), float(dfdt[i]))
        clamped += abs(g) > 1
        assert abs(float(target[i]) - expected) < 1e-12, (i, float(target[i]), expected)
    assert 0 < clamped < f.numel()  # the clamp is active on some entries and not on others
    # alpha_power is FACM's p
    _, target_p = CMLoss(target="facm", alpha_power=2.0).target(ctx, t, torch.ones_like(t))
    i = (2, 1, 0, 1)
    assert abs(float(target_p[i]) - facm_target_by_hand(float(t[2]), float(f[i]), float(v[i]), float(dfdt[i]), 2.0)[0]) < 1e-12


def scm_target_by_hand(t_all, f, v, dfdt, c=0.1):
    """ali-vilab/FACM `losses.py`, `sCMLoss.__call__` (r_factor = 1 after warm-up), per sample in floats:
    alpha = cos(alpha_t·π/2); g = alpha·(F_avg_sg − (v + (t_end − t)·F_avg_grad));
    g_norm = ‖g‖ over (1, 2, 3) · sqrt(g_norm.numel() / g.numel()) — g_norm has one entry per sample, so
    the factor is 1/√D: the per-sample RMS; target = F_avg_sg − g / (g_norm + 0.1)."""
    out = []
    for b in range(f.shape[0]):
        t = float(t_all[b])
        alpha = math.cos(t * math.pi / 2)
        fb, vb, db = f[b].flatten().tolist(), v[b].flatten().tolist(), dfdt[b].flatten().tolist()
        g = [alpha * (fi - (vi + (1.0 - t) * di)) for fi, vi, di in zip(fb, vb, db)]
        rms = math.sqrt(sum(gi * gi for gi in g)) * math.sqrt(1 / len(g))
        out.append([fi - gi / (rms + c) for fi, gi in zip(fb, g)])
    return torch.tensor(out, dtype=torch.float64).reshape(f.shape)


def test_scm_target_by_hand_on_a_batch_with_different_residuals():
    ctx, t, f, v, dfdt = residual_batch()
    _, target = CMLoss(target="scm").target(ctx, t, torch.ones_like(t))
    expected = scm_target_by_hand(t, f, v, dfdt)
    assert torch.allclose(target, expected, atol=1e-12, rtol=0)
    norms = (f - (v + (1 - t).view(-1, 1, 1, 1) * dfdt)).flatten(1).norm(dim=1)
    assert norms.max() > 1.5 * norms.min()  # the samples' residual norms differ


def test_learned_log_variance_weighting_by_hand():
    """exp(−u(t))·e + u(t), u(t) = w·[cos(2π f t), sin(2π f t)] + b over the seeded frequencies f
    (sCM's adaptive weighting, FACM `AdaLoss`), checked element by element with non-zero w and b."""
    loss = CMLoss(weighting="none", robust_c=0.0, learned_weighting=True, logvar_seed=3)
    lv = loss.logvar
    with torch.no_grad():
        lv.linear.weight.copy_(torch.linspace(-0.3, 0.4, lv.linear.weight.numel()).view_as(lv.linear.weight))
        lv.linear.bias.fill_(0.2)
    e = torch.tensor([0.5, 2.0, 0.01], dtype=torch.float64)
    t = torch.tensor([0.1, 0.5, 0.95], dtype=torch.float64)
    got = loss.reduce(e, t)
    freqs = lv.freqs.tolist()
    w = lv.linear.weight.flatten().tolist()
    for i in range(3):
        ti = float(t[i])
        feats = [math.cos(2 * math.pi * ti * f) for f in freqs] + [math.sin(2 * math.pi * ti * f) for f in freqs]
        u = sum(a * b for a, b in zip(w, feats)) + 0.2
        assert abs(float(got[i]) - (math.exp(-u) * float(e[i]) + u)) < 1e-6, (i, float(got[i]))


def test_scm_default_is_facms_rms_norm_with_cos_weight():
    ctx, t = scm_case(0.5)
    default = CMLoss(target="scm").target(ctx, t, torch.ones_like(t))[1]
    explicit = CMLoss(target="scm", tangent_norm="rms", tangent_weight="cos").target(ctx, t, torch.ones_like(t))[1]
    assert torch.equal(default, explicit)


def test_log_variance_frequencies_are_a_function_of_the_seed():
    torch.manual_seed(1)
    a = LogVarianceWeight(seed=0)
    torch.manual_seed(2)
    b = LogVarianceWeight(seed=0)
    assert torch.equal(a.freqs, b.freqs)
    assert not torch.equal(a.freqs, LogVarianceWeight(seed=1).freqs)
    assert "logvar.freqs" in CMLoss(learned_weighting=True).state_dict()


def test_cm_parts_take_no_options():
    CMSupervised(), CMSelfSupervised()
    with pytest.raises(TypeError):
        CMSupervised(learned_weighting=True)
    from decm.registry import import_all

    import_all()
    with pytest.raises(ValueError, match="learned_weighting"):
        gin.parse_config("losses.cm_selfsupervised.learned_weighting = True")


@pytest.mark.parametrize("kwargs,named", [({"lam": 0.0}, "lam"), ({"gamma": 0.5}, "gamma"),
                                          ({"tangent": tangent_note}, "tangent"), ({"w_prime": 0.5}, "w_prime")])
def test_discrete_n2n_refuses_the_options_it_does_not_use(kwargs, named):
    with pytest.raises(ValueError, match=f"n2n_loss: {named} not used by form='discrete'"):
        N2NLoss(form="discrete", **kwargs)
    N2NLoss(form="discrete")  # defaults are fine
    with pytest.raises(ValueError, match="discrete_dt not used by form='continuous'"):
        N2NLoss(discrete_dt=0.05)
