"""Analysis scripts: the CM gradient split, per-hop errors of the exact flow map, produced files."""

import importlib.util
import json
import math
import os
import sys

import torch


def load(name):
    spec = importlib.util.spec_from_file_location(name, f"analysis/{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, "analysis")
    spec.loader.exec_module(mod)
    return mod


loss_divergence = load("loss_divergence")
error_accumulation = load("error_accumulation")


def test_recorded_part_gradients_sum_to_the_cm_gradient_at_f_equals_f_minus():
    """part_grad_norms' sup and self gradients add up to the plain CM loss gradient (eq. 8)."""
    from decm.data.builtin import GaussianMixture2D
    from decm.method.diagnostics import part_grad_norms
    from decm.method.losses import CMLoss
    from decm.method.objective import Objective, Term
    from decm.method.selectors import Consistency
    from decm.models.mlp import mlp

    torch.manual_seed(0)
    ds = GaussianMixture2D()
    student = mlp(width=32, depth=2, dim=2, num_classes=0).double()
    for p in student.parameters():
        p.data.normal_(0, 0.3)
    obj = Objective([Term("cm", Consistency(), CMLoss(target="plain", weighting="none", robust_c=0.0))]).double()
    x1, _ = ds.batch(64, torch.Generator().manual_seed(1))
    params = list(student.parameters())
    g = torch.Generator().manual_seed(2)
    loss, _, ctx = obj(student, ds.analytic_teacher(), x1.double(), None, 5, g)
    full = torch.autograd.grad(loss, params, retain_graph=True)
    stats = part_grad_norms(obj, ctx, params)
    t, s = ctx.selected["cm"]
    sup, self_sup = obj.terms[0].loss.parts(ctx, t, s)
    g_sup = torch.autograd.grad(sup.mean(), params, retain_graph=True)
    g_self = torch.autograd.grad(self_sup.mean(), params)
    for a, b, c in zip(full, g_sup, g_self):  # the MLP embeds t in float32: F vs F⁻ agree to ~1e-7
        torch.testing.assert_close(a, b + c, rtol=1e-5, atol=1e-8)
    flat = lambda gs: torch.cat([x.flatten() for x in gs])  # noqa: E731
    assert abs(stats["grad/cm_sup"] - float(flat(g_sup).norm())) < 1e-9
    assert abs(stats["grad/cm_self"] - float(flat(g_self).norm())) < 1e-9
    assert stats["grad/cm_self"] > 0 and stats["grad/cm_sup"] > 0


def test_divergence_events_detect_spikes_and_nonfinite_steps():
    values = [1.0] * 60 + [10.0] + [1.0] * 10 + [float("nan")]
    ev = loss_divergence.running_median_events(values, window=50, factor=3.0)
    assert ev.sum() == 2 and ev[60] and ev[-1]


class ClosedFormFlowMap(torch.nn.Module):
    """The Gaussian's exact average velocity in closed form (method.md), no ODE solver involved."""

    def __init__(self, teacher):
        super().__init__()
        self.teacher = teacher

    def forward(self, x, t, s, y=None):
        return self.teacher.average_velocity(x, t, s)


def closed_form_point(teacher, z, tau):
    """x*(τ) = f(z, 0, τ) = τμ + S_τ·z for x₁ ~ N(μ, σ²I) (S_0 = 1)."""
    s_tau = math.sqrt((1 - tau) ** 2 + tau ** 2 * teacher.sigma2)
    return tau * teacher.mu + s_tau * z


def test_hop_errors_against_the_closed_form_gaussian_flow_map():
    """Reference independent of `ode_flow`: the Gaussian's closed-form trajectory. The exact student has
    zero error; an Euler student F(x, t, s) = v(x, t) has the closed-form local and accumulated errors."""
    from decm.method.teachers import GaussianTeacher

    teacher = GaussianTeacher(mean=[0.7, -0.4], std=0.3, shape=(2,))
    z = torch.randn(256, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for nfe in (1, 2, 4):
        rows = error_accumulation.hop_errors(ClosedFormFlowMap(teacher), teacher, z, None, nfe, "chain",
                                             ode_steps=200)
        assert max(r["accumulated"] for r in rows) < 1e-8 and max(r["local"] for r in rows) < 1e-8
    # Euler student: one hop x + (b − a)·v(x, a). Expected errors from the closed form alone.
    euler = lambda x, t, s, y: teacher(x, t)  # noqa: E731
    rows = error_accumulation.hop_errors(euler, teacher, z, None, 2, "chain", ode_steps=200)
    x = z
    for row in rows:
        a, b = row["t_from"], row["t_to"]
        ta = torch.full((256,), a, dtype=torch.float64)
        exact_a, exact_b = closed_form_point(teacher, z, a), closed_form_point(teacher, z, b)
        x = x + (b - a) * teacher(x, ta)
        local = exact_a + (b - a) * teacher(exact_a, ta)
        assert abs(row["accumulated"] - error_accumulation.rms(x, exact_b)) < 1e-8
        assert abs(row["local"] - error_accumulation.rms(local, exact_b)) < 1e-8
        assert row["local"] > 0.01  # Euler is not exact: the check has something to see


def test_scripts_produce_their_files(tmp_path):
    out = tmp_path / "ld"
    common = ["--bind", "backbones.mlp.width = 16", "--bind", "distill/train.batch_size = 32",
              "--bind", "wandb.enabled = False"]
    assert loss_divergence.main(["--configs", "cd_only", "cd_fm", "instantaneous", "--steps", "8", "--seeds", "2",
                                 "--runs-root", str(tmp_path / "runs"), "--out", str(out)] + common) == 0
    for f in ("summary.md", "summary.csv", "summary.json", "grad_parts.png", "losses.png", "divergence.png"):
        assert (out / f).stat().st_size > 0, f
    assert "grad/cm_self/median" in (out / "summary.json").read_text()
    over = json.loads((out / "over_seeds.json").read_text())
    assert over["meta"]["seeds"] == [0, 1] and over["meta"]["threads"] >= 1 and over["meta"]["torch"]
    assert len(over["table"]["cd_only"]["divergence_events"]["values"]) == 2
    assert " ± " in (out / "over_seeds.md").read_text()
    out2 = tmp_path / "ea"
    assert error_accumulation.main(["--nfe", "1", "2", "--n", "64", "--final-n", "500", "--steps", "8", "--ode-steps", "50", "--seeds", "2",
                                    "--runs-root", str(tmp_path / "abl"), "--out", str(out2),
                                    "--bind", "evaluate.n_samples = 100"] + common) == 0
    for f in ("table.md", "table.csv", "results.json", "hop_errors.png", "final_vs_nfe.png", "over_seeds.md"):
        assert (out2 / f).stat().st_size > 0, f
    assert {r["final_n"] for r in json.loads((out2 / "results.json").read_text()).values()} == {500}
    ea = json.loads((out2 / "over_seeds.json").read_text())
    assert ea["meta"]["seeds"] == [0, 1] and ea["meta"]["torch"]
    hop = ea["runs"]["with N2N (DE-CM)"]["hops"]["2"][0]["local"]
    assert len(hop["values"]) == 2 and hop["values"][0] != hop["values"][1]  # two trainings, not one twice
    assert abs(hop["mean"] - sum(hop["values"]) / 2) < 1e-12
    assert loss_divergence.main(["--configs", "nope"]) == 2
    assert error_accumulation.main(["--runs", str(tmp_path / "absent")]) == 2


def test_a_rerun_with_new_settings_trains_anew_and_the_default_output_is_fresh(tmp_path):
    """Run directories depend on every setting: --steps 4 then --steps 6 are two runs, and the second
    table reports 6 steps (the old runs are never presented as new). Without --out nothing under
    analysis/results/ is touched."""
    import glob
    import os

    committed = {p: os.path.getmtime(p) for p in glob.glob("analysis/results/**/*", recursive=True)}
    common = ["--configs", "instantaneous", "--seeds", "1", "--runs-root", str(tmp_path / "runs"),
              "--bind", "backbones.mlp.width = 16", "--bind", "distill/train.batch_size = 16",
              "--bind", "wandb.enabled = False"]
    assert loss_divergence.main(common + ["--steps", "4", "--out", str(tmp_path / "a")]) == 0
    before = set(glob.glob("runs/analysis/loss_divergence-*"))
    assert loss_divergence.main(common + ["--steps", "6"]) == 0  # default --out
    fresh = set(glob.glob("runs/analysis/loss_divergence-*")) - before
    try:
        assert len(fresh) == 1
        steps = json.loads(open(os.path.join(fresh.pop(), "summary.json")).read())["instantaneous"]["steps"]
        assert steps == 6
    finally:
        import shutil

        for d in set(glob.glob("runs/analysis/loss_divergence-*")) - before:
            shutil.rmtree(d)
    assert len(glob.glob(str(tmp_path / "runs" / "toy2d" / "instantaneous-seed0-*"))) == 2
    assert {p: os.path.getmtime(p) for p in committed} == committed


def test_n2n_diagnostic_runs_end_to_end_and_its_measures_are_exact_for_the_oracle(tmp_path):
    n2n = load("n2n_diagnostic")
    out = tmp_path / "out"
    argv = ["--variants", "fm_cd", "decm", "--seeds", "2", "--steps", "8", "--ckpt-every", "4", "--n", "64",
            "--ode-steps", "8", "--runs-root", str(tmp_path / "runs"), "--out", str(out),
            "--bind", "backbones.mlp.width = 16", "--bind", "distill/train.batch_size = 16",
            "--bind", "evaluate.n_samples = 100", "--bind", "wandb.enabled = False"]
    assert n2n.main(argv) == 0
    md = (out / "table.md").read_text()
    assert "## Headline" in md and "| decm |" in md and " ± " in md
    res = json.loads((out / "results.json").read_text())
    run = res["runs"]["decm/seed0"]
    assert [c["step"] for c in run["checkpoints"]] == [4, 8]
    assert set(run["checkpoints"][-1]["targets"]) == {"cm", "fm", "n2n"}
    assert set(run["checkpoints"][-1]["by_t"]) == {"n2n (0→t)", "cm (t→1)"}
    assert (out / "trace.png").stat().st_size > 0
    # the exact average velocity it compares against: the Gaussian's closed form, to solver precision
    from decm.method.teachers import GaussianTeacher

    teacher = GaussianTeacher(mean=[0.5, -0.3], std=0.4, shape=(2,))
    x = torch.randn(32, 2, dtype=torch.float64)
    t, s = torch.full((32,), 0.2, dtype=torch.float64), torch.full((32,), 0.9, dtype=torch.float64)
    assert torch.allclose(n2n.exact_average_velocity(teacher, x, t, s, 200), teacher.average_velocity(x, t, s),
                          atol=1e-8)
    assert n2n.main(["--variants", "nope"]) == 2


def test_digits_nfe_study_grids_samplers_and_per_hop_errors(tmp_path):
    """analysis/digits_nfe.py on a tiny digits run: the shift binding reaches the chain (NFE 1 is the same jump
    on every grid, NFE 2 is not), the per-hop errors start at the same noise (first hop: local = accumulated)."""
    from decm import launch

    run_dir = str(tmp_path / "digits")
    argv = ["--gin", "gin/quickstart.gin", "--run-dir", run_dir]
    for b in ["experiment.stages = ('teacher', 'distill')", "teacher/train.steps = 20", "distill/train.steps = 4",
              "distill/train.ckpt_every_steps = 2", "train.batch_size = 16", "train.progress = False",
              f"experiment.cache_root = '{tmp_path}/cache'"]:
        argv += ["--bind", b]
    assert launch.main(argv) == 0
    digits_nfe = load("digits_nfe")
    out = tmp_path / "study"
    assert digits_nfe.main([run_dir, "--steps", "2", "4", "--n", "64", "--hop-n", "8", "--ode-steps", "4",
                            "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())["results"]
    assert [e["step"] for e in res] == [2, 4]
    for e in res:
        fid = e["fid"]
        uniform, near_data = fid["chain, uniform grid"], fid["chain, shift 0.5 (near data)"]
        assert uniform["1"] == near_data["1"] and uniform["2"] != near_data["2"]
        hops = e["hops_nfe4"]
        assert len(hops) == 4 and hops[0]["local"] == hops[0]["accumulated"] > 0
        assert [h["t_to"] for h in hops] == [0.25, 0.5, 0.75, 1.0]
        assert len(e["hops_nfe1"]) == 1 and e["hops_nfe1"][0]["local"] == e["hops_nfe1"][0]["accumulated"]
    assert res[0]["fid"]["chain, uniform grid"]["2"] != res[1]["fid"]["chain, uniform grid"]["2"]  # other weights
    assert "| digits | 4 | CM re-noise, uniform |" in (out / "table.md").read_text()
    assert digits_nfe.main([str(tmp_path / "absent")]) == 2


def test_study_nfe_lists_every_finished_trial_per_nfe_and_counts_the_rising_ones(tmp_path, capsys):
    """Built from a hand-made study: a finished trial that gets worse with NFE, one that gets better, a failed
    one (left out) — the table shows each trial's parameters and metric per NFE, and the count is 1 of 2."""
    import csv

    study_nfe = load("study_nfe")
    sweep = tmp_path / "decm-abc"
    sweep.mkdir()
    rows = [(0, "COMPLETE", {"1": 30.0, "2": 35.0, "4": 41.0}, "0.5"), (1, "COMPLETE", {"1": 50.0, "2": 44.0, "4": 40.0}, "1.0"),
            (2, "FAIL", {"1": 9.0, "2": 9.0, "4": 9.0}, "0.2")]  # e.g. evaluated, then killed: not a result
    with open(sweep / "trials.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["number", "state", "value", "param:losses.n2n_loss.lam", "run_dir", "job_id", "wandb_id", "seconds"])
        for n, state, fid, lam in rows:
            run = tmp_path / f"trial-{n}"
            run.mkdir()
            if fid:
                (run / "metrics.json").write_text(json.dumps({"student": {k: {"fid": v} for k, v in fid.items()}}))
            w.writerow([n, state, sum(fid.values()) / 3 if state == "COMPLETE" else "", lam, str(run), "", "", 1.0])
    out = tmp_path / "out"
    assert study_nfe.main([str(sweep), "--out", str(out)]) == 0
    md = (out / "table.md").read_text()
    assert "| 0 | 0.5 | 30.0 | 35.0 | 41.0 | yes |" in md and "| 1 | 1 | 50.0 | 44.0 | 40.0 | no |" in md
    assert "| 2 |" not in md and "1 of 2 trials get worse" in md
    results = json.loads((out / "results.json").read_text())
    assert results["rising"] == 1 and results["trials"] == 2 and results["seconds"] >= 0
    assert study_nfe.main([str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert "has no trials.csv" in capsys.readouterr().err


# --- paired statistics over training seeds (decm.eval.paired) -------------------------------------------------

def test_paired_t_interval_matches_the_hand_computed_value_and_excludes_zero():
    """d = [0.09, 0.11, 0.10, 0.12, 0.08]: mean 0.1, sd √(0.001/4) = 0.0158114, t_{0.975,4} = 2.7764451,
    half-width 2.7764451·0.0158114/√5 = 0.0196324 → [0.0803676, 0.1196324], wholly above 0: 'worse'."""
    from decm.eval.paired import paired_difference

    ref = [1.0, 2.0, 3.0, 4.0, 5.0]
    row = [r + d for r, d in zip(ref, [0.09, 0.11, 0.10, 0.12, 0.08])]
    st = paired_difference(row, ref)
    assert st["n"] == 5 and math.isclose(st["mean"], 0.1, abs_tol=1e-12)
    assert math.isclose(st["low"], 0.0803676, abs_tol=1e-6) and math.isclose(st["high"], 0.1196324, abs_tol=1e-6)
    assert st["verdict"] == "worse" and st["boot_low"] is None  # 5 seeds: no bootstrap
    assert paired_difference(ref, row)["verdict"] == "better"      # the same pairs the other way round
    assert paired_difference(row, ref, lower_is_better=False)["verdict"] == "better"


def test_paired_interval_includes_zero_when_the_differences_straddle_it():
    from decm.eval.paired import paired_difference

    ref = [0.5, 0.7, 0.2, 0.9, 0.4]
    row = [r + d for r, d in zip(ref, [0.10, -0.10, 0.05, -0.05, 0.02])]
    st = paired_difference(row, ref)
    assert st["low"] < 0 < st["high"] and st["verdict"] == "not separated"
    one = paired_difference([1.0], [0.5])
    assert one["verdict"] == "too few seeds" and one["low"] is None and one["mean"] == 0.5


def test_an_unpaired_shuffle_widens_the_interval_and_the_bootstrap_appears_from_eight_seeds():
    """The seed moves both rows alike (seed effects 0.1 … 0.8 ≫ the 0.02 gap): paired, the gap is separated;
    with the row's seeds shuffled against the reference's the seed effect no longer cancels and the
    interval widens past 0."""
    from decm.eval.paired import paired_difference

    seed_effect = [0.1, 0.5, 0.3, 0.8, 0.2, 0.7, 0.4, 0.6]
    ref = [1.0 + s for s in seed_effect]
    row = [r + 0.02 + e for r, e in zip(ref, [0.001, -0.002, 0.0, 0.002, -0.001, 0.001, 0.0, -0.001])]
    paired = paired_difference(row, ref)
    shuffled = paired_difference([row[i] for i in (3, 0, 6, 1, 7, 2, 5, 4)], ref)
    assert paired["verdict"] == "worse" and shuffled["verdict"] == "not separated"
    assert shuffled["high"] - shuffled["low"] > 20 * (paired["high"] - paired["low"])
    assert paired["boot_low"] is not None and paired["boot_low"] > 0               # 8 seeds: bootstrap reported
    assert paired["low"] - 0.01 < paired["boot_low"] < paired["boot_high"] < paired["high"] + 0.01
    assert paired_difference(row[:7], ref[:7])["boot_low"] is None


def test_paired_differences_match_seeds_by_name_and_skip_missing_ones():
    from decm.eval.paired import paired_difference

    st = paired_difference({0: 1.0, 1: 2.5, 3: 9.0}, {0: 0.5, 1: 2.0, 2: 7.0})  # seeds 0 and 1 are the pairs
    assert st["n"] == 2 and st["mean"] == 0.5 and st["sd"] == 0.0


# --- the uneven 2-D benchmark and where the mixtures' exact velocity lives ----------------------------------

def test_uneven_benchmark_samples_its_weights_and_widths_and_its_exact_density_and_velocity_agree():
    """gin/toy2d_uneven.gin: 6 modes, weights spread ≥ 5×, widths 0.05–0.2. Samples follow the weights and
    per-mode widths; the exact density integrates to 1; the exact velocity at t = 0, x = 0 is the data mean
    Σ_k w_k m_k (every component's posterior is its weight there)."""
    import gin

    from decm.job import parse

    parse(["gin/toy2d_uneven.gin"], [])
    ds = gin.query_parameter("train.dataset").scoped_configurable_fn()
    w, s = ds.weights, ds.stds
    assert ds.modes == 6 and float(w.max() / w.min()) >= 5 and float(s.min()) == 0.05 and float(s.max()) == 0.2
    x, _ = ds.batch(200_000, torch.Generator().manual_seed(0))
    k = ((x.double().unsqueeze(1) - ds.means.unsqueeze(0)) ** 2).sum(-1).argmin(1)  # nearest mode (modes 2.0 apart)
    freq = torch.bincount(k, minlength=6).double() / len(x)
    assert torch.allclose(freq, w, atol=0.005), (freq, w)
    for j in range(6):  # per-mode std, each coordinate
        assert abs(float((x.double()[k == j] - ds.means[j]).std()) - float(s[j])) < 0.05 * float(s[j]) + 2e-3
    teacher = ds.analytic_teacher()
    assert torch.equal(teacher.weights, w) and torch.equal(teacher.stds, s)
    g = torch.linspace(-3, 3, 1201, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
    mass = float(teacher.log_density(grid).exp().sum()) * float(g[1] - g[0]) ** 2
    assert abs(mass - 1.0) < 1e-3
    v0 = teacher(torch.zeros(3, 2, dtype=torch.float64), torch.zeros(3, dtype=torch.float64))  # x_0 = z: v = E[x₁]
    assert torch.allclose(v0, (w.unsqueeze(1) * ds.means).sum(0).expand(3, 2), atol=1e-12)


def test_the_data_package_imports_nothing_from_the_method():
    """Layering: datasets (and the mixtures' exact velocity they carry) never import decm.method."""
    import ast
    import glob

    offenders = []
    for path in glob.glob("decm/data/*.py"):
        for node in ast.walk(ast.parse(open(path).read())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{path}: {n}" for n in names if n == "decm.method" or n.startswith("decm.method.")]
    assert offenders == []
    from decm.data.mixture_flow import GaussianMixtureTeacher, ode_flow
    from decm.method import teachers

    assert teachers.GaussianMixtureTeacher is GaussianMixtureTeacher and teachers.ode_flow is ode_flow


def test_n2n_diagnostic_pairs_variants_with_the_reference_seed_by_seed(tmp_path):
    """--from-results rewrites the committed study's tables without runs; each variant − decm difference is
    taken per seed (here checked for SW2 at NFE 1 against the per-seed values in the saved runs)."""
    import numpy as np
    from scipy.stats import t as student_t

    n2n = load("n2n_diagnostic")
    saved = "analysis/results/n2n_diagnostic/results.json"
    out = tmp_path / "n2n"
    assert n2n.main(["--from-results", saved, "--out", str(out)]) == 0
    runs = json.loads(open(saved).read())["runs"]
    d = np.array([runs[f"fm_cd/seed{k}"]["sw2"]["1"] - runs[f"decm/seed{k}"]["sw2"]["1"] for k in range(3)])
    half = student_t.ppf(0.975, 2) * d.std(ddof=1) / math.sqrt(3)
    st = json.loads((out / "results.json").read_text())["paired"]["rows"]["fm_cd"]["SW2 NFE 1"]
    assert st["n"] == 3 and math.isclose(st["mean"], d.mean(), abs_tol=1e-12)
    assert math.isclose(st["low"], d.mean() - half, abs_tol=1e-12) and math.isclose(st["high"], d.mean() + half, abs_tol=1e-12)
    assert "## Paired differences vs decm (same seed)" in (out / "table.md").read_text()
    assert n2n.main(["--from-results", saved, "--reference", "nope", "--out", str(out)]) == 2


def test_error_accumulation_pairs_the_two_runs_of_each_seed():
    """over_seeds: with N2N − without N2N per seed; a shared seed effect cancels, a constant gap is separated."""
    seed_effect = [0.0, 0.4, -0.3]

    def run(final):
        return {"hops": {"chain": {"1": [{"t_from": 0.0, "t_to": 1.0, "accumulated": final, "local": final}]}},
                "final": {"chain": {"1": final}}}

    by_seed = {k: {"without N2N (FM + CD)": run(1.0 + e), "with N2N (DE-CM)": run(1.1 + e + 0.01 * (k - 1))}
               for k, e in enumerate(seed_effect)}
    table, md = error_accumulation.over_seeds(by_seed, [1])
    st = table["paired"]["final"]["chain"]["1"]
    assert table["paired"]["reference"] == "without N2N (FM + CD)" and st["n"] == 3
    assert math.isclose(st["mean"], 0.1, abs_tol=1e-12) and st["verdict"] == "worse"
    assert "## Paired: with N2N (DE-CM) − without N2N (FM + CD) (same seed)" in md


def test_seed_variance_separates_late_fluctuation_from_the_spread_across_seeds(tmp_path):
    """checkpoint_spread: a run oscillating late has a within-run sd the hand value gives; run_statistics
    reads per-term late losses, gradient spikes and the NFE-1 metric from a run directory."""
    seed_variance = load("seed_variance")

    def run(trace, sw2):
        return {"sw2": {"1": sw2}, "checkpoints": [{"step": 500 * (i + 1), "student": {"0→1": e}}
                                                   for i, e in enumerate(trace)]}

    results = {"decm/seed0": run([0.5, 0.3, 0.7, 0.3], 0.2), "decm/seed1": run([0.5, 0.4, 0.6, 0.4], 0.3),
               "calm/seed0": run([0.5, 0.35, 0.35, 0.35], 0.1), "calm/seed1": run([0.5, 0.36, 0.36, 0.36], 0.1)}
    spread = seed_variance.checkpoint_spread(results, last=3)
    d = spread["decm"]
    assert math.isclose(d["within_run_sd"]["seed0"], math.sqrt(((0.3 - 13 / 30) ** 2 + (0.7 - 13 / 30) ** 2
                                                                + (0.3 - 13 / 30) ** 2) / 2), abs_tol=1e-12)
    assert math.isclose(d["largest_late_jump_mean"], (0.4 + 0.2) / 2, abs_tol=1e-12)
    assert math.isclose(d["final_err_sd_across_seeds"], math.sqrt(2 * 0.05 ** 2), abs_tol=1e-12)
    assert spread["calm"]["within_run_sd_mean"] < 1e-12 and spread["calm"]["within_run_sd_vs_reference"]["n"] == 2
    run_dir = tmp_path / "runs" / "toy2d" / "decm-seed3-abcdef012345"
    run_dir.mkdir(parents=True)
    stats = [{"step": 10 * i, "grad_norm": 50.0 if i == 4 else 1.0, "loss/cm": 0.5, **({"loss/n2n": float(i)} if i % 3 == 0 else {})}
             for i in range(1, 11)]
    (run_dir / "stats.jsonl").write_text("\n".join(json.dumps(s) for s in stats) + "\n")
    (run_dir / "metrics.json").write_text(json.dumps({"rows": [
        {"model": "student", "sampler": "chain", "nfe": 1, "sw2": 0.25, "energy": 0.01},
        {"model": "student", "sampler": "chain", "nfe": 2, "sw2": 0.5, "energy": 0.02}]}))
    runs = seed_variance.ablation_runs(str(tmp_path / "runs"), "toy2d", ["decm"])
    st = runs["decm"][3]
    assert st["grad_spikes"] == 1 and st["grad_norm_max"] == 50.0 and st["grad_norm_median"] == 1.0
    assert st["last_spike_step"] == 40
    assert st["late loss/n2n"] == 9.0 and st["late loss/cm"] == 0.5  # late: steps > 80 → 90, 100; n2n at 90 only
    assert st["NFE 1 sw2"] == 0.25 and st["NFE 1 energy"] == 0.01
    out = tmp_path / "sv"
    assert seed_variance.main(["--n2n-results", "", "--benchmark", "toy2d", "--runs-root", str(tmp_path / "runs"),
                               "--rows", "decm", "--out", str(out)]) == 0
    assert "| decm | 3 |" in (out / "table.md").read_text()
    assert seed_variance.main(["--n2n-results", "", "--benchmark", "nope", "--runs-root", str(tmp_path / "runs"),
                               "--out", str(out)]) == 2


def test_seed_variance_trajectories_part_ways_and_fluctuate_as_computed_by_hand(monkeypatch):
    """trajectories(): across-seed sd at each checkpoint, the within-run sd over the second half of training
    and the correlation of the final value with the late N2N loss, from checkpoint values given by hand."""
    seed_variance = load("seed_variance")
    values = {"a0": {1000: 0.10, 2000: 0.02, 3000: 0.04}, "a1": {1000: 0.10, 2000: 0.06, 3000: 0.02},
              "a2": {1000: 0.10, 2000: 0.03, 3000: 0.09}}
    monkeypatch.setattr(seed_variance, "checkpoint_metrics",
                        lambda run_dir, evals: {k: {"energy": v} for k, v in values[run_dir].items()})
    stats = {"decm": {0: {"late loss/n2n": 1.0}, 1: {"late loss/n2n": 0.5}, 2: {"late loss/n2n": 2.0}}}
    traj = seed_variance.trajectories({"decm": {0: "a0", 1: "a1", 2: "a2"}}, "evals", "energy", stats)["decm"]
    assert traj["steps"] == [1000, 2000, 3000] and traj["late_steps"] == [2000, 3000]
    assert traj["sd_across_seeds"][1000] < 1e-12
    assert math.isclose(traj["sd_across_seeds"][3000], float(torch.tensor([0.04, 0.02, 0.09]).std()), rel_tol=1e-6)
    within = [abs(0.02 - 0.04) / math.sqrt(2), abs(0.06 - 0.02) / math.sqrt(2), abs(0.03 - 0.09) / math.sqrt(2)]
    assert math.isclose(traj["within_run_sd_late_mean"], sum(within) / 3, rel_tol=1e-9)
    finals, n2n = [0.04, 0.02, 0.09], [1.0, 0.5, 2.0]
    r = float(torch.corrcoef(torch.tensor([finals, n2n], dtype=torch.float64))[0, 1])
    assert math.isclose(traj["corr final vs late loss/n2n"], r, rel_tol=1e-9) and traj["corr n (late loss/n2n)"] == 3
    assert "corr final vs grad_spikes" not in traj  # no spike counts given: no correlation claimed


def test_checkpoint_metrics_at_the_last_step_reproduce_the_runs_own_evaluation(tmp_path):
    """seed_variance --checkpoints evaluates each checkpoint with the run's own settings: at the final step
    it gives exactly the NFE-1 numbers of the run's metrics.json; earlier checkpoints give other numbers."""
    from decm import launch

    seed_variance = load("seed_variance")
    run_dir = str(tmp_path / "runs" / "toy2d_exact" / "decm-seed0-000000000000")
    argv = ["--gin", "gin/toy2d_exact_teacher.gin", "--run-dir", run_dir]
    for b in ["experiment.stages = ('distill', 'evaluate')", "distill/train.steps = 12", "distill/train.batch_size = 32",
              "distill/train.ckpt_every_steps = 6", "distill/train.log_every_steps = 2", "train.progress = False",
              "backbones.mlp.width = 32", "backbones.mlp.depth = 1", "evaluate.n_samples = 300",
              "evaluate.teacher_nfe = ()"]:
        argv += ["--bind", b]
    assert launch.main(argv) == 0
    got = seed_variance.checkpoint_metrics(run_dir, str(tmp_path / "evals"))
    assert sorted(got) == [6, 12]
    with open(os.path.join(run_dir, "metrics.json")) as f:
        own = next(r for r in json.load(f)["rows"] if r["model"] == "student" and r["sampler"] == "chain" and r["nfe"] == 1)
    assert got[12] == {"energy": float(own["energy"]), "sw2": float(own["sw2"])}
    assert got[6]["energy"] != got[12]["energy"]
    assert seed_variance.checkpoint_metrics(run_dir, str(tmp_path / "evals")) == got  # cached, identical
