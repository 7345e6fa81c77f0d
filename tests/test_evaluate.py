"""Evaluation and reporting: torch-fidelity metrics against an independent reference, reference-stats
files, deterministic distributed generation, the NFE-sweep CLI, offline W&B, the local report."""

import glob
import json
import os
import re

import numpy as np
import pytest
import scipy.linalg
import torch
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

from decm import distributed, evaluate as evaluate_cli, launch, report
from decm.eval import fidelity
from decm.eval.evaluate import generate
from decm.eval.ref_stats import main as ref_stats_main

TEST_EXTRACTOR = "decm-test-linear"


class LinearExtractor(FeatureExtractorBase):
    """A fixed random projection of the pixels: 16 features, 5 logits (deterministic, weight-free)."""

    def __init__(self, name, features_list, **kwargs):
        super().__init__(name, features_list)
        g = torch.Generator().manual_seed(0)
        self.proj = torch.randn(3 * 8 * 8, 16, generator=g) / 8
        self.head = torch.randn(16, 5, generator=g)

    @staticmethod
    def get_provided_features_list():
        return ("feat", "logits")

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"fid": "feat", "kid": "feat", "prc": "feat", "isc": "logits"}[metric]

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, 8, 8, dtype=torch.uint8)

    def forward(self, x):
        f = torch.tanh((x.float() / 255.0).flatten(1) @ self.proj)
        out = {"feat": f, "logits": f @ self.head}
        return tuple(out[n] for n in self.features_list)


if TEST_EXTRACTOR not in FEATURE_EXTRACTORS_REGISTRY:
    register_feature_extractor(TEST_EXTRACTOR, LinearExtractor)


def images(n, seed, shift=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 200, (n, 3, 8, 8), generator=g) + shift).clamp(0, 255).to(torch.uint8)


def numpy_frechet(a, b):
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def test_fid_equals_an_independent_frechet_distance_and_torch_fidelity_itself():
    import torch_fidelity

    gen, ref = images(300, 0, shift=30), images(400, 1)
    fidelity._extractor.cache_clear()
    fg = fidelity.features(gen, TEST_EXTRACTOR, None)
    fr = fidelity.features(ref, TEST_EXTRACTOR, None)
    assert fidelity._extractor.cache_info().misses == 1  # the extractor is built once, then reused
    stats = fidelity.ReferenceStats.from_features(fr, TEST_EXTRACTOR)
    ours = fidelity.metrics(fg, stats, TEST_EXTRACTOR, None, which=("fid", "kid", "isc", "prc"))
    expected = numpy_frechet(fg["feat"].numpy(), fr["feat"].numpy())
    assert ours["fid"] > 0.05
    assert abs(ours["fid"] - expected) < 1e-6 * max(1.0, expected)
    full = torch_fidelity.calculate_metrics(input1=fidelity._Images(gen), input2=fidelity._Images(ref),
                                            feature_extractor=TEST_EXTRACTOR, fid=True, cache=False, cuda=False,
                                            verbose=False)
    assert abs(ours["fid"] - full["frechet_inception_distance"]) < 1e-6 * max(1.0, expected)
    assert {"kid", "isc", "precision", "recall", "f_score"} <= set(ours)
    same = fidelity.metrics(fr, stats, TEST_EXTRACTOR, None, which=("fid",))
    assert abs(same["fid"]) < 1e-6  # identical sets: FID vanishes


def test_reference_stats_round_trip_adm_layout_and_clear_errors(tmp_path):
    fr = fidelity.features(images(200, 1), TEST_EXTRACTOR, None)
    stats = fidelity.ReferenceStats.from_features(fr, TEST_EXTRACTOR, keep_features=150)
    path = str(tmp_path / "ref.npz")
    stats.save(path)
    back = fidelity.ReferenceStats.load(path, TEST_EXTRACTOR)
    assert np.array_equal(back.mu, stats.mu) and np.array_equal(back.sigma, stats.sigma)
    assert back.features.shape == (150, 16) and back.n == 200 and back.extractor == TEST_EXTRACTOR
    with pytest.raises(fidelity.EvaluationSetupError, match="made with extractor"):
        fidelity.ReferenceStats.load(path, "inception-v3-compat")
    # ADM layout: mu, sigma and the reference images as arr_0 (NHWC uint8); KID comes from the images.
    adm = str(tmp_path / "VIRTUAL_test.npz")
    np.savez(adm, mu=stats.mu, sigma=stats.sigma, arr_0=images(200, 1).permute(0, 2, 3, 1).numpy())
    loaded = fidelity.ReferenceStats.load(adm, TEST_EXTRACTOR)
    m = fidelity.metrics(fidelity.features(images(100, 2), TEST_EXTRACTOR, None), loaded, TEST_EXTRACTOR, None,
                         which=("fid", "kid"))
    assert np.isfinite(m["fid"]) and np.isfinite(m["kid"])
    with pytest.raises(fidelity.EvaluationSetupError, match="evaluate.ref_stats"):
        fidelity.ReferenceStats.load(str(tmp_path / "absent.npz"))
    np.savez(str(tmp_path / "mu_only.npz"), mu=stats.mu, sigma=stats.sigma)
    with pytest.raises(fidelity.EvaluationSetupError, match="need reference features"):
        fidelity.metrics(fr, fidelity.ReferenceStats.load(str(tmp_path / "mu_only.npz")), TEST_EXTRACTOR, None,
                         which=("kid",))


def test_missing_inception_weights_name_the_setting(monkeypatch):
    monkeypatch.delenv("DECM_INCEPTION_WEIGHTS", raising=False)
    with pytest.raises(fidelity.EvaluationSetupError, match=r"evaluate.feature_weights_path or \$DECM_INCEPTION_WEIGHTS"):
        fidelity.resolve_weights("inception", None)


def test_generation_is_identical_for_any_world_size():
    from decm.data.builtin import GaussianMixture2D
    from decm.models.mlp import mlp
    from decm.sampling import CMRenoise

    torch.manual_seed(0)
    ds = GaussianMixture2D(conditional=True)
    net = mlp(width=16, depth=1, dim=2, num_classes=8).eval()
    for p in net.parameters():
        p.data.normal_(0, 0.3)
    _, one = generate(CMRenoise(), net, ds, 250, 2, seed=5, batch=50)
    parts = [generate(CMRenoise(), net, ds, 250, 2, seed=5, info=distributed.DistInfo(r, 2), batch=50) for r in (0, 1)]
    idx = np.concatenate([p[0] for p in parts])
    two = torch.cat([p[1] for p in parts])[np.argsort(idx)]
    assert torch.equal(one, two)


TINY = ["experiment.stages = ('distill',)", "distill/train.steps = 12", "distill/train.batch_size = 32",
        "distill/train.ckpt_every_steps = 6", "distill/train.log_every_steps = 2", "train.progress = False",
        "backbones.mlp.width = 32", "backbones.mlp.depth = 1"]


def tiny_run(tmp_path, name, extra=()):
    run_dir = str(tmp_path / name)
    argv = ["--gin", "gin/toy2d_exact_teacher.gin", "--run-dir", run_dir]
    for b in TINY + list(extra):
        argv += ["--bind", b]
    assert launch.main(argv) == 0
    return run_dir


def test_nfe_sweep_cli_writes_table_plot_and_rejects_bad_input(tmp_path, capsys):
    run_dir = tiny_run(tmp_path, "sweep")
    argv = [run_dir, "--nfe", "1", "2", "--sampler", "chain", "cm_renoise", "--teacher-nfe", "1", "4", "--n", "400",
            "--no-wandb"]
    assert evaluate_cli.main(argv) == 0
    out = os.path.join(run_dir, "eval-step12")
    rows = open(os.path.join(out, "metrics.csv")).read().strip().splitlines()
    assert rows[0].startswith("model,sampler,nfe") and len(rows) == 1 + 2 * 2 + 2
    assert os.path.getsize(os.path.join(out, "nfe.png")) > 0 and os.path.exists(os.path.join(out, "samples.png"))
    m = json.load(open(os.path.join(out, "metrics.json")))
    assert set(m["student"]) == {"1", "2"} and set(m["teacher"]) == {"1", "4"} and m["step"] == 12
    assert m["teacher"]["4"]["sw2"] < m["teacher"]["1"]["sw2"]  # the exact teacher improves with steps
    capsys.readouterr()
    assert evaluate_cli.main([run_dir, "--sampler", "nope", "--no-wandb"]) == 2
    assert evaluate_cli.main([str(tmp_path / "absent"), "--no-wandb"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "unknown sampler 'nope'" in err[0] and "not a run directory" in err[1]


def test_digits_reference_stats_script_and_image_metrics(tmp_path):
    stats = str(tmp_path / "digits_ref.npz")
    assert ref_stats_main(["--source", "digits", "--extractor", "digits", "--out", stats, "--n", "300"]) == 0
    ref = fidelity.ReferenceStats.load(stats, "decm-digits")
    assert ref.n == 300 and ref.mu.shape == (64,) and ref.features.shape == (300, 64)
    run_dir = str(tmp_path / "digits")
    binds = ["experiment.stages = ('teacher', 'distill')", "teacher/train.steps = 3", "distill/train.steps = 3",
             "train.batch_size = 16", "train.progress = False", f"experiment.cache_root = '{tmp_path}/cache'"]
    argv = ["--gin", "gin/quickstart.gin", "--run-dir", run_dir]
    for b in binds:
        argv += ["--bind", b]
    assert launch.main(argv) == 0
    assert evaluate_cli.main([run_dir, "--nfe", "1", "--teacher-nfe", "2", "--n", "200", "--ref-stats", stats,
                              "--metrics", "fid", "kid", "isc", "prc", "--no-wandb"]) == 0
    m = json.load(open(os.path.join(run_dir, "eval-step3", "metrics.json")))
    for who in ("student", "teacher"):
        cell = next(iter(m[who].values()))
        assert {"fid", "kid", "isc", "precision", "recall"} <= set(cell)
        assert all(np.isfinite(v) for v in cell.values())


def test_offline_wandb_run_layout_and_the_id_survives_resume(tmp_path):
    extra = ["wandb.mode = 'offline'", "distill/train.stop_after_steps = 6"]
    run_dir = tiny_run(tmp_path, "wb", extra)
    run_id = open(os.path.join(run_dir, "wandb_id")).read().strip()
    tiny_run(tmp_path, "wb", extra)  # resumes from step 6 to 12
    folders = sorted(glob.glob(os.path.join(run_dir, "wandb", "offline-run-*")))
    # wandb names a folder offline-run-<YYYYmmdd_HHMMSS>-<id>, and appends -<n> when two
    # attempts start within the same second; the id is what must survive the resume.
    pattern = re.compile(r"offline-run-\d{8}_\d{6}-" + re.escape(run_id) + r"(-\d+)?$")
    assert len(folders) == 2 and all(pattern.search(f) for f in folders), folders
    for f in folders:  # what `wandb sync <folder>` reads: the run's binary log, plus its files
        log = os.path.join(f, f"run-{run_id}.wandb")
        assert os.path.getsize(log) > 0
        assert os.path.exists(os.path.join(f, "files", "config.gin"))
    assert open(os.path.join(run_dir, "wandb_id")).read().strip() == run_id


def test_wandb_config_uses_the_names_users_bind_and_mode_resolution(monkeypatch):
    import gin

    from decm.job import parse
    from decm.wandb_log import bound_config, operative_defaults, resolve_mode

    parse(["gin/toy2d_exact_teacher.gin"], ["distill/train.lr = 0.0001"])
    cfg = bound_config()
    assert cfg["distill/train.lr"] == 0.0001 and cfg["cm/objectives.term.weight"] == 1.0
    assert cfg["losses.cm_loss.target"] == "facm" and cfg["n2n/objectives.term.every"] == 3
    assert cfg["distill/train.objective"] == "@objectives.objective()"
    gin.query_parameter("cm/objectives.term.loss").scoped_configurable_fn()  # called: in the operative config
    assert operative_defaults()["losses.cm_loss.tangent_norm"] == "rms"  # unbound: a default
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", "/nonexistent/netrc")
    monkeypatch.setenv("HOME", "/nonexistent")
    assert resolve_mode(None) == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_mode(None) == "online" and resolve_mode("disabled") == "disabled"


def test_local_report_from_two_runs_and_the_wandb_report_object(tmp_path):
    a = tiny_run(tmp_path, "base")
    b = tiny_run(tmp_path, "lr", ["distill/train.lr = 0.003"])
    for d in (a, b):
        assert evaluate_cli.main([d, "--nfe", "1", "2", "--teacher-nfe", "2", "--n", "300", "--no-wandb"]) == 0
    out = str(tmp_path / "report")
    assert report.main([a, b, "--out", out]) == 0
    md = open(os.path.join(out, "report.md")).read()
    assert "| base | student | chain | 1 |" in md and "| lr | teacher | teacher_euler | 2 |" in md
    assert "+ distill/train.lr = 0.003" in md and "- distill/train.lr = 0.001" in md
    for fig in ("nfe.png", "losses.png", "base-samples.png", "lr-samples.png"):
        assert os.path.getsize(os.path.join(out, "figures", fig)) > 0
    rep = report.build_wandb_report([a, b], project="decm-test")
    kinds = [type(x).__name__ for x in rep.blocks]
    assert kinds[0] == "H1" and "PanelGrid" in kinds and "CodeBlock" in kinds
    assert any("| base | student | chain | 1 |" in getattr(x, "text", "") for x in rep.blocks)
    assert report.main([str(tmp_path / "absent"), "--out", out]) == 2


def test_tune_and_final_reference_halves_are_disjoint_and_bad_parts_are_refused(tmp_path):
    """Tuning on a finite dataset scores against one half of it and the final evaluation against the other:
    on digits (1,797 images) the halves are 898 distinct images each with no image in both; 'all' keeps the
    draw from seed + 1; an unknown part, or a split of fixed statistics, is a one-line error."""
    from decm.data.builtin import Digits
    from decm.eval.evaluate import draw_reference, evaluate

    data = Digits(image_size=8, conditional=True)
    tune, final = draw_reference(data, 1797, 5, "tune"), draw_reference(data, 1797, 9, "final")
    assert len(tune) == len(final) == 898
    rows = lambda x: {bytes(r.numpy().tobytes()) for r in x}  # noqa: E731
    assert len(rows(tune)) == 898 and len(rows(final)) == 898 and not rows(tune) & rows(final)
    assert rows(tune) | rows(final) <= rows(data.images)
    assert torch.equal(draw_reference(data, 1797, 123, "tune"), tune)  # the split does not move with the noise seed
    assert torch.equal(draw_reference(data, 100, 4, "all"), data.reference(100, torch.Generator().manual_seed(5))[0])
    with pytest.raises(ValueError, match="reference_part = 'val': choose one of all, tune, final"):
        evaluate(str(tmp_path), dataset=data, backbone=None, reference_part="val")
    with pytest.raises(ValueError, match="cannot split the fixed statistics"):
        evaluate(str(tmp_path), dataset=data, backbone=None, reference_part="tune", ref_stats="ref.npz")


def test_evaluate_scores_against_the_reference_part_it_is_given(tmp_path, monkeypatch):
    """`evaluate()` itself (not only `draw_reference`) uses the part: the 2-D metrics receive exactly
    draw_reference(…, part), and 'tune' and 'final' hand the metrics disjoint references; on images the
    reference statistics are computed from the part's images (the extractor replaced by a cheap one)."""
    import decm.eval.evaluate as ev
    from decm import registry
    from decm.data.builtin import Digits, GaussianMixture2D

    registry.import_all()
    seen = []
    real_sw2 = ev.sliced_wasserstein
    monkeypatch.setattr(ev, "sliced_wasserstein", lambda x, ref: (seen.append(ref.clone()), real_sw2(x, ref))[1])
    data = GaussianMixture2D()
    for part in ("tune", "final", "all"):
        ev.evaluate(str(tmp_path), dataset=data, backbone=None, student_nfe=(), teacher_nfe=(1,), n_samples=300,
                    seed=3, reference_part=part, out_dir=str(tmp_path / part))
        assert torch.equal(seen[-1], ev.draw_reference(data, 300, 3, part)), part
    tune, final, everything = seen
    rows = lambda x: {bytes(r.numpy().tobytes()) for r in x}  # noqa: E731
    assert not rows(tune) & rows(final) and rows(tune) != rows(everything)

    class Zero(torch.nn.Module):  # a student that returns the noise unchanged
        def forward(self, x, t, s, y=None):
            return torch.zeros_like(x)

    digits = Digits(image_size=8, conditional=True)
    refs = []
    monkeypatch.setattr(ev, "load_student", lambda *a, **k: (Zero(), 0))
    monkeypatch.setattr(fidelity, "resolve_weights", lambda ext, path: "")
    monkeypatch.setattr(fidelity, "features", lambda img, ext, w: {"feat": img.double().flatten(1)[:, :8]})
    monkeypatch.setattr(fidelity, "layers", lambda ext: {"fid": "feat"})
    monkeypatch.setattr(fidelity, "metrics", lambda gen, ref, *a, **k: (refs.append(ref.mu.copy()), {"fid": 0.0})[1])
    for part in ("tune", "final"):
        ev.evaluate(str(tmp_path), dataset=digits, backbone=None, student_nfe=(1,), teacher_nfe=(), n_samples=1797,
                    reference_part=part, out_dir=str(tmp_path / f"digits-{part}"))
        images = fidelity.to_uint8(ev.draw_reference(digits, 1797, 1234, part))
        assert np.allclose(refs[-1], images.double().flatten(1)[:, :8].mean(0).numpy(), atol=1e-12), part
    assert not np.allclose(refs[0], refs[1])


def test_sample_noise_is_a_function_of_the_seed_and_the_sample_index():
    from decm.eval.evaluate import sample_noise

    batch = sample_noise([0, 1, 2, 3], (2, 3), seed=5)
    assert torch.equal(sample_noise([2], (2, 3), seed=5)[0], batch[2])  # any batching draws the same z_i
    assert len({bytes(r.numpy().tobytes()) for r in batch}) == 4  # and every index its own
    assert not torch.equal(sample_noise([2], (2, 3), seed=6)[0], batch[2])
