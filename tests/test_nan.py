"""NaN/inf targets are masked per sample and counted ('mask') or abort the step ('skip')."""

import pytest
import torch

from decm.method.objective import NonFiniteTargetError, decm_objective
from decm.method.teachers import GaussianTeacher
from decm.models.mlp import mlp


class NaNTeacher(GaussianTeacher):
    """Gaussian teacher whose velocity is NaN for samples with x[:, 0] > 1 (a deterministic subset)."""

    def forward(self, x, t, y=None):
        v = super().forward(x, t, y)
        return torch.where((x[:, :1] > 1.0).expand_as(v), torch.full_like(v, float("nan")), v)


def run(policy):
    torch.manual_seed(0)
    student = mlp(width=16, depth=1)
    teacher = NaNTeacher(mean=0.5, std=1.0)
    obj = decm_objective(nan_policy=policy)
    x1 = teacher.sample(64, torch.Generator().manual_seed(1))
    return student, obj(student, teacher, x1, None, 0, torch.Generator().manual_seed(2))


def test_mask_counts_and_keeps_loss_and_gradients_finite():
    student, (loss, stats, _) = run("mask")
    assert stats["nan/masked_samples"] > 0
    assert torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in student.parameters() if p.grad is not None)
    print(f"masked samples: {stats['nan/masked_samples']}")


def test_skip_policy_raises_for_the_step():
    with pytest.raises(NonFiniteTargetError):
        run("skip")


class NaNAtRTeacher(GaussianTeacher):
    """NaN velocity only at τ = r = 0.1 (N2N's source time at step 0): the CM and FM terms, evaluated at
    stratified base times, stay finite, so only the last term (N2N) is bad."""

    def forward(self, x, t, y=None):
        v = super().forward(x, t, y)
        bad = ((t - 0.1).abs() < 1e-6).view(-1, 1).expand_as(v)
        return torch.where(bad, torch.full_like(v, float("nan")), v)


def test_per_term_backward_agrees_on_a_bad_term_before_its_backward():
    """With per-term backward, a non-finite term raises before its own backward on every rank (`agree`
    sees the verdict), and the terms before it have already put their finite gradients in .grad:
    exactly the gradients of L_cm + L_fm, with nothing of the bad term."""
    torch.manual_seed(0)
    student = mlp(width=16, depth=1)
    teacher = NaNAtRTeacher(mean=0.5, std=1.0)
    obj = decm_objective(nan_policy="skip")
    x1 = teacher.sample(64, torch.Generator().manual_seed(1))
    verdicts = []
    with pytest.raises(NonFiniteTargetError, match="term 'n2n'.*step skipped"):
        obj(student, teacher, x1, None, 0, torch.Generator().manual_seed(2), backward=True,
            agree=lambda bad: verdicts.append(bad) or bad)
    assert verdicts == [False, False, True]  # cm, fm fine; n2n bad
    grads = [p.grad.clone() for p in student.parameters()]
    assert all(torch.isfinite(g).all() for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0
    # the same two terms without the N2N term, in one backward: the same gradients
    student.zero_grad()
    obj.terms[2].weight = 0.0  # inactive
    loss, stats, _ = obj(student, teacher, x1, None, 0, torch.Generator().manual_seed(2))
    loss.backward()
    for g, p in zip(grads, student.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-7)
    obj.terms[2].weight = 1.0
    clean = GaussianTeacher(mean=0.5, std=1.0)
    student.zero_grad()
    loss, stats, _ = obj(student, clean, x1, None, 0, torch.Generator().manual_seed(2), backward=True,
                         agree=lambda bad: verdicts.append(bad) or bad)
    assert not loss.requires_grad and torch.isfinite(loss) and stats["loss/n2n"] > 0
    assert all(torch.isfinite(p.grad).all() for p in student.parameters() if p.grad is not None)


def test_a_masked_sample_has_zero_loss_and_no_gradient():
    """The masked target is sg(prediction): a masked sample's loss is exactly 0 and sends no gradient,
    while the other samples keep theirs."""
    from decm.method.guidance import NoGuidance
    from decm.method.losses import FMLoss
    from decm.method.objective import Context

    torch.manual_seed(0)
    student = mlp(width=16, depth=1)
    teacher = NaNTeacher(mean=0.5, std=1.0)
    g = torch.Generator().manual_seed(1)
    x1, z = teacher.sample(64, g), torch.randn(64, 2, generator=g)
    ctx = Context(student, teacher, NoGuidance(), x1, z, None, 0)
    t = torch.full((64,), 0.9)
    per_sample = FMLoss(cosine_weight=0.0)(ctx, t, t)  # the squared error alone: exactly 0 when masked
    bad = ~torch.isfinite(teacher(ctx.point(t), t)).all(1)
    assert bad.any() and (~bad).any() and ctx.nan_masked == int(bad.sum())
    assert torch.equal(per_sample[bad].detach(), torch.zeros(int(bad.sum())))
    grads = torch.autograd.grad(per_sample[bad].sum(), list(student.parameters()), allow_unused=True)
    assert all(gr is None or float(gr.abs().max()) == 0.0 for gr in grads)
    assert (per_sample[~bad] > 0).all()
