"""Every sampler against a closed form: the Gaussian teacher's exact flow map f(z, 0, 1) = μ + σ·z.

- teacher Euler converges at first order, teacher Heun at second order (halving the step size divides the
  error by 2 and by 4);
- with the exact flow map as the student, one step and the chain are exact at every NFE, Euler on F(x, t, t)
  equals Euler on the teacher, and CM re-noise's intermediate points have the marginal of the next time,
  N(t·μ, ((1 − t)² + t²σ²)·I).
"""

import math

import pytest
import torch

from decm.method.teachers import ExactFlowMap, GaussianTeacher
from decm.sampling import Chain, CMRenoise, EulerInstant, OneStep, TeacherEuler, TeacherHeun, time_grid

pytestmark = pytest.mark.usefixtures("float64_default")  # exact references in float64 (tests/conftest.py)

SIGMA = 0.6


def setup(n=64, dim=4, seed=0):
    mu = torch.linspace(-0.8, 1.2, dim).tolist()
    teacher = GaussianTeacher(mean=mu, std=SIGMA, shape=(dim,))
    z = torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))
    exact = teacher.mu + SIGMA * z  # f(z, 0, 1) = 1·μ + (S₁/S₀)(z − 0·μ)
    return teacher, z, exact


def max_error(sampler, net, z, exact, nfe):
    return float((sampler(net, z, None, nfe=nfe) - exact).abs().max())


def test_time_grid_shift_by_hand():
    # t ↦ u / (u + shift·(1 − u)) on u = 0, 1/4, ..., 1
    got = time_grid(4, shift=3.0)
    by_hand = [u / (u + 3.0 * (1 - u)) for u in (0.0, 0.25, 0.5, 0.75, 1.0)]
    assert all(abs(a - b) < 1e-12 for a, b in zip(got, by_hand))
    assert time_grid(2) == [0.0, 0.5, 1.0]


def test_teacher_euler_is_first_order_and_heun_second_order():
    teacher, z, exact = setup()
    e32, e64 = (max_error(TeacherEuler(), teacher, z, exact, n) for n in (32, 64))
    assert 1.8 < e32 / e64 < 2.2, (e32, e64)  # measured 1.98
    # Heun: nfe = 2 × steps (asymptotic from ~32 steps on: 3.56 at 16 → 32, 3.79 at 32 → 64)
    h32, h64 = (max_error(TeacherHeun(), teacher, z, exact, 2 * n) for n in (32, 64))
    assert 3.5 < h32 / h64 < 4.5, (h32, h64)
    assert h64 < e64 / 100


def test_exact_flow_map_samplers_are_exact():
    teacher, z, exact = setup()
    student = ExactFlowMap(teacher)
    assert max_error(OneStep(), student, z, exact, 1) < 1e-12
    for nfe in (1, 2, 3, 5):
        traj = []
        out = Chain()(student, z, None, nfe=nfe, trajectory=traj)
        assert float((out - exact).abs().max()) < 1e-12
        for t, x in traj:  # every intermediate point is f(z, 0, t) = t·μ + S_t·z
            s_t = math.sqrt((1 - t) ** 2 + t ** 2 * SIGMA ** 2)
            assert float((x - (t * teacher.mu + s_t * z)).abs().max()) < 1e-12
    shifted = Chain(shift=0.3)(student, z, None, nfe=3)
    assert float((shifted - exact).abs().max()) < 1e-12


def test_euler_on_the_instantaneous_velocity_equals_teacher_euler():
    teacher, z, _ = setup()
    student = ExactFlowMap(teacher)  # F(x, t, t) = v(x, t)
    for nfe in (3, 8):
        a = EulerInstant()(student, z, None, nfe=nfe)
        b = TeacherEuler()(teacher, z, None, nfe=nfe)
        assert float((a - b).abs().max()) < 1e-12


def test_cm_renoise_points_have_the_marginal_of_the_next_time():
    teacher, z, exact = setup(n=8000, dim=4, seed=1)
    student = ExactFlowMap(teacher)
    traj = []
    out = CMRenoise()(student, z, None, nfe=3, generator=torch.Generator().manual_seed(2), trajectory=traj)
    assert [round(t, 6) for t, _ in traj] == [round(1 / 3, 6), round(2 / 3, 6), 1.0]
    for t, x in traj:
        mean, var = x.mean(0), x.var(0)
        s_t2 = (1 - t) ** 2 + t ** 2 * SIGMA ** 2
        # n = 8000 per dimension: standard errors ≈ 0.01 (mean) and ≈ 1.6 % (variance)
        assert float((mean - t * teacher.mu).abs().max()) < 0.04, (t, mean)
        assert float((var / s_t2 - 1).abs().max()) < 0.07, (t, var, s_t2)
    # the last jump starts from re-noised points, so the output is a fresh exact sample, not f(z, 0, 1)
    assert float((out - teacher.mu).mean(0).abs().max()) < 0.04
    assert float((out.var(0) / SIGMA ** 2 - 1).abs().max()) < 0.07
    assert float((out - exact).abs().mean()) > 0.1
    one = CMRenoise()(student, z[:64], None, nfe=1)
    assert float((one - exact[:64]).abs().max()) < 1e-12  # one jump from z is the exact map
