"""`decm.evaluate --seeds` (metrics over disjoint sample-index ranges: each, the mean and the minimum) and
`--checkpoint` (evaluating a post-hoc EMA reconstruction with the run's configuration)."""

import json
import os

import numpy as np
import pytest
import torch

from decm import evaluate as evaluate_cli
from decm import launch, phema
from decm.eval.evaluate import generate

TINY = ["experiment.stages = ('distill',)", "distill/train.steps = 12", "distill/train.batch_size = 32",
        "distill/train.ckpt_every_steps = 6", "distill/train.log_every_steps = 2", "train.progress = False",
        "backbones.mlp.width = 32", "backbones.mlp.depth = 1"]


def tiny_run(tmp_path, extra=()):
    run_dir = str(tmp_path / "run")
    argv = ["--gin", "gin/toy2d_exact_teacher.gin", "--run-dir", run_dir]
    for b in TINY + list(extra):
        argv += ["--bind", b]
    assert launch.main(argv) == 0
    return run_dir


def test_seed_ranges_parse_and_bad_ranges_are_refused():
    assert evaluate_cli.parse_seeds(["0-9", "10-19,20-29"]) == [(0, 10), (10, 20), (20, 30)]
    for bad, match in [(["0-9", "5-14"], "overlap"), (["0-9", "10-14"], "equally long"), (["7"], "not a range"),
                       (["3-3"], "not a range"), (["a-9"], "not a range"), (["9-0"], "not a range")]:
        with pytest.raises(ValueError, match=match):
            evaluate_cli.parse_seeds(bad)


def test_a_sample_range_draws_the_samples_of_those_indices():
    from decm.data.builtin import GaussianMixture2D
    from decm.models.mlp import mlp
    from decm.sampling import Chain, CMRenoise

    torch.manual_seed(0)
    ds = GaussianMixture2D(conditional=True)
    net = mlp(width=16, depth=1, dim=2, num_classes=8).eval()
    for p in net.parameters():
        p.data.normal_(0, 0.3)
    idx, whole = generate(Chain(), net, ds, 30, 2, seed=5, batch=7)
    part_idx, part = generate(Chain(), net, ds, 10, 2, seed=5, batch=4, first=20)
    assert list(part_idx) == list(range(20, 30)) and list(idx) == list(range(30))
    torch.testing.assert_close(part, whole[20:], rtol=0, atol=1e-6)  # noise and label per index, any batching
    assert not torch.allclose(part, whole[:10])
    _, whole = generate(CMRenoise(), net, ds, 30, 2, seed=5, batch=10)  # re-noising: per batch start, absolute
    _, part = generate(CMRenoise(), net, ds, 10, 2, seed=5, batch=10, first=20)
    assert torch.equal(part, whole[20:])


def test_seeds_cli_prints_each_range_the_mean_and_the_minimum(tmp_path, capsys):
    run_dir = tiny_run(tmp_path)
    out = str(tmp_path / "eval")
    argv = [run_dir, "--nfe", "1", "--teacher-nfe", "--seeds", "0-299", "300-599", "600-899", "--no-wandb",
            "--out", out]
    assert evaluate_cli.main(argv) == 0
    printed = capsys.readouterr().out
    summary = json.load(open(os.path.join(out, "seeds.json")))
    assert summary["ranges"] == [[0, 299], [300, 599], [600, 899]] and summary["samples_per_range"] == [300] * 3
    (row,) = summary["rows"]
    assert (row["model"], row["sampler"], row["nfe"]) == ("student", "chain", 1)
    per = row["sw2"]["per_range"]
    for (a, b), v in zip(summary["ranges"], per):
        cell = json.load(open(os.path.join(out, f"seeds-{a}-{b}", "metrics.json")))
        assert cell["first_index"] == a and cell["n_samples"] == 300 and cell["rows"][0]["sw2"] == v
    assert len(set(per)) == 3  # three different draws
    assert row["sw2"]["mean"] == pytest.approx(np.mean(per), rel=1e-12) and row["sw2"]["min"] == min(per)
    line = next(x for x in printed.splitlines() if "sw2:" in x)
    assert f"mean {np.mean(per):.4f}" in line and f"min {min(per):.4f}" in line
    assert evaluate_cli.main(argv + ["--n", "100"]) == 2
    assert evaluate_cli.main([run_dir, "--seeds", "0-9", "5-14", "--no-wandb"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "drop --n" in err[0] and "overlap" in err[1]


def test_checkpoint_flag_evaluates_a_posthoc_ema_reconstruction(tmp_path, capsys):
    run_dir = tiny_run(tmp_path, ["distill/train.phema_sigma_rels = (0.05, 0.2)", "distill/train.phema_every_steps = 3"])
    assert phema.main(["--run-dir", run_dir, "--sigma-rel", "0.1"]) == 0
    target = os.path.join(run_dir, "posthoc", "sigma_rel-0.100")
    common = ["--nfe", "1", "--teacher-nfe", "--n", "300", "--no-wandb"]
    assert evaluate_cli.main([run_dir, "--checkpoint", target] + common) == 0
    assert evaluate_cli.main([run_dir] + common) == 0
    rec = json.load(open(os.path.join(target, "eval-step12", "metrics.json")))
    ema = json.load(open(os.path.join(run_dir, "eval-step12", "metrics.json")))
    assert rec["step"] == ema["step"] == 12
    assert rec["student"]["1"]["sw2"] != ema["student"]["1"]["sw2"]  # other weights, other samples
    capsys.readouterr()
    assert evaluate_cli.main([run_dir, "--checkpoint", str(tmp_path / "absent")] + common) == 2
    assert "--checkpoint" in capsys.readouterr().err
