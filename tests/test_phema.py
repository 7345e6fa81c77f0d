"""Post-hoc EMA (decm.phema): the power-function EMA against EDM2's closed forms, reconstruction of a
profile that was also tracked directly, kill/resume keeping the snapshots exact, FSDP-sharded profiles,
and the reconstruction command. Reference numbers were computed with NVlabs/edm2 `training/phema.py`
(`std_to_exp`, `power_function_beta`, `power_function_correlation`, `solve_posthoc_coefficients`)."""

import os

import numpy as np
import pytest
import torch

from decm import checkpoint, phema
from decm.method.objective import decm_objective
from decm.train import train


def test_sigma_rel_gamma_beta_and_coefficients_equal_edm2():
    # EDM2 std_to_exp([0.05, 0.1, 0.2]); the paper quotes γ = 16.97 and 6.94 for σ_rel 0.05 and 0.10
    np.testing.assert_allclose(phema.sigma_rel_to_gamma(np.array([0.05, 0.1, 0.2])),
                               [16.972198602303447, 6.937203937601809, 1.8262137798958404], rtol=1e-13)
    np.testing.assert_allclose(phema.gamma_to_sigma_rel(np.array([6.94, 16.97])),
                               [0.09997226695670997, 0.050005488615774], rtol=1e-13)
    for s in (0.01, 0.05, 0.1, 0.2, 0.28):
        assert abs(phema.gamma_to_sigma_rel(phema.sigma_rel_to_gamma(s)) - s) < 1e-12
    assert phema.beta(0.1, 10, 1) == pytest.approx(0.4333247206821348, rel=1e-13)   # power_function_beta
    assert phema.beta(0.05, 3, 1) == pytest.approx(0.0006843100529755934, rel=1e-12)
    assert phema.beta(0.2, 1, 1) == 0.0  # the first update copies the weights
    assert phema.profile_inner(30.0, 0.05, 50.0, 0.2) == pytest.approx(0.020186573380255916, rel=1e-13)
    x = phema.solve_coefficients([10, 10, 20, 20, 30, 30], [0.05, 0.2] * 3, 30, 0.1)[:, 0]
    np.testing.assert_allclose(x, [6.7620645491531367e-05, -4.0435860392195357e-03, 1.5812792941763958e-02,
                                   -2.4791612793214296e-01, 3.6358049824715916e-01, 8.7249880213694786e-01],
                               rtol=1e-9, atol=1e-15)
    assert x.sum() == pytest.approx(1.0, abs=1e-14)


def test_profile_inner_product_is_the_integral_of_the_two_weight_functions():
    """Eq. 151's closed form against ∫ p_a p_b dτ with p(τ) = (γ+1) τ^γ / t^(γ+1) on [0, t] (numerically)."""
    def p(tau, t, s):
        g = phema.sigma_rel_to_gamma(s)
        return (g + 1) * tau ** g / t ** (g + 1)

    for (ta, sa, tb, sb) in [(30.0, 0.05, 50.0, 0.2), (80.0, 0.1, 40.0, 0.15), (50.0, 0.2, 50.0, 0.05)]:
        tau = np.linspace(0, min(ta, tb), 400_001)  # the product is zero beyond the shorter profile
        numeric = np.trapezoid(p(tau, ta, sa) * p(tau, tb, sb), tau)
        assert phema.profile_inner(ta, sa, tb, sb) == pytest.approx(numeric, rel=1e-7)


def test_tracked_profile_equals_the_closed_form_weighted_average_of_the_trajectory():
    """Unrolling θ̂_t = β_t θ̂_{t−1} + (1 − β_t) θ_t with β_t = (1 − 1/t)^(γ+1) telescopes to
    θ̂_t = Σ_k [k^(γ+1) − (k−1)^(γ+1)] / t^(γ+1) · θ_k: the discrete power-function profile."""
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 4).double()
    tracker = phema.PowerFunctionEMA(net, (0.05, 0.2))
    thetas = []
    for k in range(1, 61):
        with torch.no_grad():
            for q in net.parameters():
                q.add_(torch.randn_like(q) + 0.05 * k)  # a drifting, noisy trajectory
        thetas.append(torch.cat([q.detach().flatten().clone() for q in net.parameters()]))
        tracker.update(net, k)
    thetas = torch.stack(thetas)
    for s, profile in zip((0.05, 0.2), tracker.profiles):
        g = float(phema.sigma_rel_to_gamma(s))
        k = torch.arange(1, 61, dtype=torch.float64)
        w = (k ** (g + 1) - (k - 1) ** (g + 1)) / 60 ** (g + 1)
        expected = (w[:, None] * thetas).sum(0)
        got = torch.cat([q.flatten() for q in profile.parameters()])
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)
        spread = (thetas[-1] - expected).abs().max()
        assert spread > 1.0  # the average is not the last point


def toy_run(run_dir, steps=60, sigma_rels=(0.05, 0.2), every=3, dataset=None, **kw):
    from decm.data.builtin import GaussianMixture2D
    from decm.models.mlp import mlp

    return train(str(run_dir), stage="distill", dataset=dataset or GaussianMixture2D(),
                 backbone=lambda **k: mlp(width=32, depth=2, **k), objective=decm_objective(),
                 teacher_source="analytic", steps=steps, batch_size=16, lr=3e-3, ckpt_every_steps=10,
                 log_every_steps=10, progress=False, phema_sigma_rels=sigma_rels, phema_every_steps=every,
                 keep_last=0, **kw)


def flat(state, names):
    return torch.cat([state[n].double().flatten() for n in names])


# Tolerance of a reconstruction against the directly tracked profile, relative to how far apart the two
# input profiles are (the size of what choosing the EMA length changes): 60 steps, a snapshot every 3.
# Measured: 8.3e-5 (σ_rel 0.1 from 0.05 and 0.2); reconstructing 0.15 instead lands 0.34 away.
RECONSTRUCTION_RTOL = 1e-3


def test_reconstruction_of_a_directly_tracked_sigma_rel_equals_it(tmp_path):
    toy_run(tmp_path, sigma_rels=(0.05, 0.1, 0.2))
    ckpt_dir = str(tmp_path / "checkpoints")
    last = torch.load(phema.list_snapshots(ckpt_dir)[-1][1], weights_only=True)
    names = last["param_names"]
    direct = flat(last["profile_1"], names)
    spread = (flat(last["profile_0"], names) - flat(last["profile_2"], names)).norm()
    rec, info = phema.reconstruct(ckpt_dir, 0.1, inputs=(0.05, 0.2))
    assert info["tracked_sigma_rels"] == [0.05, 0.2] and info["step"] == 60 and len(info["snapshot_steps"]) == 20
    err = (flat(rec, names) - direct).norm()
    assert float(spread) > 1e-2  # the EMA length matters in this run
    assert float(err) < RECONSTRUCTION_RTOL * float(spread), (float(err), float(spread))
    # and a wrong target is visibly worse: reconstructing 0.15 instead is far from the tracked 0.1
    other, _ = phema.reconstruct(ckpt_dir, 0.15, inputs=(0.05, 0.2))
    assert float((flat(other, names) - direct).norm()) > 5 * float(err)
    # a tracked input reconstructs (almost) itself
    own, _ = phema.reconstruct(ckpt_dir, 0.2, inputs=(0.05, 0.2))
    assert float((flat(own, names) - flat(last["profile_2"], names)).norm()) < 1e-6 * float(spread)


class CrashingData:
    """The 2-D mixture whose batch at step `crash_at` raises: the process dies between checkpoints."""

    def __init__(self, crash_at=None):
        from decm.data.builtin import GaussianMixture2D

        self.base, self.crash_at, self.calls = GaussianMixture2D(), crash_at, 0
        self.shape, self.num_classes = self.base.shape, self.base.num_classes

    def batch(self, n, g=None):
        if self.crash_at is not None and self.calls == self.crash_at:
            raise KeyboardInterrupt("killed")
        self.calls += 1
        return self.base.batch(n, g)

    def analytic_teacher(self):
        return self.base.analytic_teacher()


def test_kill_and_resume_keeps_the_snapshots_and_profiles_exact(tmp_path):
    toy_run(tmp_path / "whole", steps=40, every=4, dataset=CrashingData())
    with pytest.raises(KeyboardInterrupt):  # dies during step 34: checkpoint 30, snapshots up to 32 written
        toy_run(tmp_path / "cut", steps=40, every=4, dataset=CrashingData(crash_at=34))
    cut = tmp_path / "cut" / "checkpoints"
    assert checkpoint.step_of(checkpoint.latest_valid(str(cut), verbose=False)[0]) == 30
    assert [s for s, _, _ in phema.list_snapshots(str(cut))][-1] == 32
    os.remove(cut / "phema" / "ckpt-00000032.ok")  # as if killed after the file, before its sentinel
    (cut / "phema" / "ckpt-00000036.pt.tmp.999").write_bytes(b"partial")  # as if killed mid-write
    assert [s for s, _, _ in phema.list_snapshots(str(cut))][-1] == 28  # neither counts
    toy_run(tmp_path / "cut", steps=40, every=4, dataset=CrashingData())
    whole = phema.list_snapshots(str(tmp_path / "whole" / "checkpoints"))
    resumed = phema.list_snapshots(str(cut))
    assert [s for s, _, _ in whole] == [s for s, _, _ in resumed] == list(range(4, 41, 4))
    for (_, a, _), (_, b, _) in zip(whole, resumed):
        sa, sb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
        for key in ("profile_0", "profile_1"):
            for n in sa[key]:
                assert torch.equal(sa[key][n], sb[key][n]), (a, key, n)
    ca = checkpoint.latest_valid(str(tmp_path / "whole" / "checkpoints"))[1]["phema"]
    cb = checkpoint.latest_valid(str(cut))[1]["phema"]
    for n in ca["profile_0"]:
        assert torch.equal(ca["profile_0"][n], cb["profile_0"][n])


def test_resume_refuses_other_sigma_rels_and_a_checkpoint_without_profiles(tmp_path):
    toy_run(tmp_path / "a", steps=10, every=5)
    with pytest.raises(ValueError, match="tracks post-hoc EMA σ_rel"):
        toy_run(tmp_path / "a", steps=20, sigma_rels=(0.05, 0.1), every=5)
    with pytest.raises(ValueError, match="tracks post-hoc EMA σ_rel"):  # another number of profiles
        toy_run(tmp_path / "a", steps=20, sigma_rels=(0.05, 0.1, 0.15), every=5)
    toy_run(tmp_path / "b", steps=10, sigma_rels=(), every=0)
    with pytest.raises(ValueError, match="has no post-hoc EMA profiles"):
        toy_run(tmp_path / "b", steps=20, every=5)


@pytest.mark.parametrize("kw,match", [({"sigma_rels": (0.05, 0.3)}, "must be in"),
                                      ({"every": 0}, "phema_every_steps = 0"),
                                      ({"sigma_rels": (), "every": 5}, "needs train.phema_sigma_rels")])
def test_bad_settings_are_one_clear_error(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        toy_run(tmp_path, steps=2, **kw)


def test_reconstruction_command_writes_an_evaluable_checkpoint(tmp_path, capsys):
    from decm.eval.evaluate import load_student
    from decm.data.builtin import GaussianMixture2D
    from decm.models.mlp import mlp

    toy_run(tmp_path, steps=20, every=5)
    assert phema.main(["--run-dir", str(tmp_path), "--sigma-rel", "0.15", "--step", "15"]) == 0
    out = tmp_path / "posthoc" / "sigma_rel-0.150"
    model, step = load_student(str(tmp_path), lambda **k: mlp(width=32, depth=2, **k), GaussianMixture2D(),
                               ckpt_dir=str(out))
    assert step == 15
    rec, info = phema.reconstruct(str(tmp_path / "checkpoints"), 0.15, step=15)
    assert info["snapshot_steps"] == [5, 10, 15]  # snapshots after the target step are not used
    for n, v in model.state_dict().items():
        assert torch.equal(v, rec[n])
    assert phema.main(["--run-dir", str(tmp_path), "--sigma-rel", "0.15", "--step", "12"]) == 2
    assert phema.main(["--run-dir", str(tmp_path), "--sigma-rel", "0.4"]) == 2
    assert phema.main(["--run-dir", str(tmp_path / "nope"), "--sigma-rel", "0.1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("decm.phema: error: ") for line in err), err


def parallel_worker(rank, world, port, run_dir, parallel, stop_after_steps):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from decm.distributed import shutdown

    try:
        toy_run(run_dir, steps=12, every=3, parallel=parallel, stop_after_steps=stop_after_steps)
    finally:
        shutdown()


def spawn(run_dir, parallel, stop_after_steps=0):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(parallel_worker, args=(2, port, str(run_dir), parallel, stop_after_steps), nprocs=2,
                       start_method="spawn")


def test_fsdp_shards_the_profiles_resumes_them_and_matches_ddp(tmp_path):
    """2 ranks on gloo: FSDP writes sharded snapshots (every rank its shards), resumes the sharded profiles
    from its sharded checkpoint, and its snapshots and reconstruction equal DDP's (FSDP vs DDP: 1e-5)."""
    spawn(tmp_path / "ddp", "ddp")
    spawn(tmp_path / "fsdp", "fsdp", stop_after_steps=7)  # stops after step 7: sharded checkpoint 7, snapshots 3, 6
    spawn(tmp_path / "fsdp", "fsdp")
    ddp = phema.list_snapshots(str(tmp_path / "ddp" / "checkpoints"))
    fsdp = phema.list_snapshots(str(tmp_path / "fsdp" / "checkpoints"))
    assert [(s, k) for s, _, k in ddp] == [(s, "pt") for s in (3, 6, 9, 12)]
    assert [(s, k) for s, _, k in fsdp] == [(s, "dcp") for s in (3, 6, 9, 12)]
    for (_, a, ka), (_, b, kb) in zip(ddp, fsdp):
        sa, sb = phema.read_snapshot(a, ka), phema.read_snapshot(b, kb)
        assert sa["param_names"] == sb["param_names"]
        for key in ("profile_0", "profile_1"):
            for n in sa["param_names"]:
                torch.testing.assert_close(sb[key][n], sa[key][n], rtol=0, atol=1e-5)
    ra, _ = phema.reconstruct(str(tmp_path / "ddp" / "checkpoints"), 0.1)
    rb, _ = phema.reconstruct(str(tmp_path / "fsdp" / "checkpoints"), 0.1)
    for n in ra:
        torch.testing.assert_close(rb[n], ra[n], rtol=0, atol=1e-4)
    moved = max(float((sa["profile_0"][n] - sa["profile_1"][n]).abs().max()) for n in sa["param_names"])
    assert moved > 1e-3  # the two profiles differ: the comparison is not between identical copies
