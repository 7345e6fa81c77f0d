"""The ablation rows are gin diffs that build; the table script runs rows end to end and checks the
paper's relations with the right logic."""

import glob
import importlib.util
import json
import os

import pytest

from decm.job import build, parse

spec = importlib.util.spec_from_file_location("ablation_table", "analysis/ablation_table.py")
ablation = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ablation)


@pytest.mark.parametrize("row", sorted(os.path.basename(p)[:-4] for p in glob.glob("gin/ablations/*.gin")))
@pytest.mark.parametrize("bench", ["gin/toy2d.gin", "gin/toy2d_cond.gin", "gin/toy2d_exact_teacher.gin",
                                   "gin/quickstart.gin"])
def test_every_row_is_a_diff_that_builds_on_both_benchmarks(row, bench):
    parse([bench, f"gin/ablations/{row}.gin"], [])
    build("/nonexistent/dry-run")


def describe(bench: str, row: str | None) -> dict:
    """Every setting an ablation row could change, read from the built distillation objective and gin."""
    import gin

    from decm.registry import import_all

    import_all()
    parse([bench] + ([f"gin/ablations/{row}.gin"] if row else []), [])
    with gin.config_scope("distill"):
        obj = gin.query_parameter("distill/train.objective").scoped_configurable_fn()
    out = {"guidance": (type(obj.guidance).__name__, getattr(obj.guidance, "scale", None),
                        getattr(obj.guidance, "clip_norm", None)),
           "train.steps": gin.query_parameter("distill/train.steps"),
           "evaluate.student_nfe": gin.query_parameter("evaluate.student_nfe") if gin_has("evaluate.student_nfe") else None}
    for term in obj.terms:
        loss, sel = term.loss, term.selector
        out[f"{term.term_name}.term"] = (type(sel).__name__, type(loss).__name__, term.weight, term.every)
        out[f"{term.term_name}.loss"] = {k: (v.__name__ if callable(v) else v) for k, v in vars(loss).items()
                                         if not k.startswith("_") and k != "training"}
        out[f"{term.term_name}.loss"]["logvar"] = getattr(loss, "logvar", None) is not None
        out[f"{term.term_name}.selector"] = dict(vars(sel))
    return out


def gin_has(name: str) -> bool:
    import gin

    try:
        gin.query_parameter(name)
        return True
    except ValueError:
        return False


def diff(a: dict, b: dict) -> dict:
    """{key: (a value, b value)} for every top-level and nested key that differs."""
    out = {}
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out.update({f"{k}.{kk}": v for kk, v in diff(va, vb).items()})
        elif va != vb:
            out[k] = (va, vb)
    return out


# What each row must change relative to the full DE-CM configuration, and nothing else.
EXPECTED_DIFF = {
    "decm": set(),
    "cd_only": {"fm.term", "fm.loss", "fm.selector", "n2n.term", "n2n.loss", "n2n.selector"},
    "fm_cd": {"n2n.term", "n2n.loss", "n2n.selector"},
    "fm_n2n": {"cm.term", "cm.loss", "cm.selector"},
    "fm_only": {"cm.term", "cm.loss", "cm.selector", "n2n.term", "n2n.loss", "n2n.selector"},
    "n2n_only": {"cm.term", "cm.loss", "cm.selector", "fm.term", "fm.loss", "fm.selector", "n2n.term"},
    "lambda0": {"n2n.loss.lam"},
    "lambda1": {"n2n.loss.lam"},
    "r_decay_off": {"n2n.selector.decay_steps"},
    "n2n_every1": {"n2n.term"},
    "n2n_every5": {"n2n.term"},
    "n2n_tmax05": {"n2n.selector.t_max"},
    "teacher": {"train.steps", "evaluate.student_nfe"},
    "clip_on": {"guidance"},
    "clip_off": set(),  # = the default η (not recovered): the pair is clip_on (see the row's header)
}


@pytest.mark.parametrize("row", sorted(os.path.basename(p)[:-4] for p in glob.glob("gin/ablations/*.gin")))
def test_every_row_changes_exactly_the_objective_it_names(row):
    base = describe("gin/toy2d_cond.gin", None)
    mine = describe("gin/toy2d_cond.gin", row)
    changed = diff(base, mine)
    if row == "meanflow":
        assert {k: v for k, v in changed.items() if k.startswith("meanflow.")}
        assert [k for k in mine if k.endswith(".term")] == ["meanflow.term"]
        assert mine["meanflow.term"][1] == "MeanFlowLoss"
        return
    if row == "scm":
        assert mine["cm.loss"]["kind"] == "scm" and mine["cm.loss"]["logvar"] is True
        assert mine["cm.loss"]["tangent_norm"] == "rms" and mine["cm.loss"]["weighting"] == "none"
        assert [k for k in mine if k.endswith(".term")] == ["cm.term"]
        return
    assert set(changed) == EXPECTED_DIFF[row], changed
    if row in ("lambda0", "lambda1"):
        assert mine["n2n.loss"]["lam"] == {"lambda0": 0.0, "lambda1": 1.0}[row]
    if row == "n2n_tmax05":
        assert mine["n2n.selector"]["t_max"] == 0.5
    if row.startswith("n2n_every"):
        assert mine["n2n.term"][3] == int(row[len("n2n_every"):])
    if row == "clip_on":
        assert mine["guidance"][2] == 1.0 and mine["guidance"][1] > 1.0


def test_clip_rows_give_different_targets_on_the_conditional_benchmark():
    """On the CFG benchmark (w > 1) η changes the guided teacher velocity, hence every target."""
    import gin
    import torch

    from decm.method.objective import Context

    def velocity(row):
        parse(["gin/toy2d_cond.gin", f"gin/ablations/{row}.gin"], [])
        with gin.config_scope("distill"):
            obj = gin.query_parameter("distill/train.objective").scoped_configurable_fn()
            dataset = gin.query_parameter("train.dataset").scoped_configurable_fn()
        teacher = dataset.analytic_teacher()
        x1, y = dataset.batch(256, torch.Generator().manual_seed(0))
        z = torch.randn(x1.shape, generator=torch.Generator().manual_seed(1))
        ctx = Context(None, teacher, obj.guidance, x1, z, y, 0)
        t = torch.rand(256, generator=torch.Generator().manual_seed(2))
        return ctx.velocity(ctx.point(t), t)

    on, off = velocity("clip_on"), velocity("clip_off")
    assert (on - off).abs().max() > 0.1
    assert ablation.main(["--benchmark", "toy2d", "--rows", "clip_on"]) == 2  # no CFG there: refused


SEED_NOISE = (0.0, 0.3, -0.2)  # a seed effect shared by every row of that seed (cancels in the paired differences)


def synthetic(values, gaps=None):
    """Per-seed values {row: {col: {seed: v}}}: the row's value plus the seed's shared effect, plus `gaps`
    {(row, col index): (per-seed offsets)} where a row's own per-seed scatter is wanted."""
    gaps = gaps or {}
    return {row: {col: {k: v + SEED_NOISE[k] + gaps.get((row, i), (0.0,) * 3)[k] for k in range(3)}
                  for i, (col, v) in enumerate(zip(ablation.COLUMNS, vals))} for row, vals in values.items()}


VALUES = {"cd_only": [1, 1, 1, 5, 5], "fm_cd": [1, 1, 2, 1, 1], "decm": [0.5, 0.5, 0.5, 0.5, 0.5],
          "scm": [2, 1, 1, 1, 1], "meanflow": [3, 1, 1, 1, 1], "fm_only": [9, 9, 9, 1, 1], "fm_n2n": [9, 9, 9, 1, 1]}


def test_relations_are_decided_by_paired_intervals_over_seeds():
    # columns: chain 1, 2, 4, 50, Euler 50; each row offset by the same seed effects (paired gaps are exact)
    scatter = (0.01, -0.02, 0.012)  # a little per-seed scatter so the t intervals have width
    values = synthetic(VALUES, {("decm", i): scatter for i in range(5)})
    rels = {r["relation"][:3]: r for r in ablation.relations(values)}
    assert {k: r["verdict"] for k, r in rels.items()} == {"(a)": "holds", "(b)": "holds", "(c)": "holds", "(d)": "holds"}
    assert rels["(a)"]["paired"]["n"] == 3 and rels["(a)"]["paired"]["low"] > 0
    # DE-CM's 4-NFE value now worse than FM + CD's by a margin the seed scatter cannot hide → (c) does not hold;
    # sCM better at 1 NFE → (d) does not hold
    values = synthetic(dict(VALUES, decm=[0.5, 0.5, 3.0, 0.5, 0.5], scm=[0.1, 1, 1, 1, 1]),
                       {("decm", i): scatter for i in range(5)})
    rels = ablation.relations(values)
    assert [r["verdict"] for r in rels if r["relation"].startswith("(c)")][0] == "does not hold"
    assert [r["holds"] for r in rels if r["relation"].startswith("(d)")][0] is False
    # a gap smaller than the per-seed scatter: not separated, although the means alone say "holds"
    values = synthetic(dict(VALUES, scm=[0.52, 1, 1, 1, 1], meanflow=[0.52, 1, 1, 1, 1]),
                       {("decm", 0): (0.1, -0.1, 0.05)})
    d = [r for r in ablation.relations(values) if r["relation"].startswith("(d)")][0]
    assert d["verdict"] == "not separated" and d["holds"] is None and d["means"] is True
    # one seed: no interval, no verdict
    one = {row: {col: {0: v[0]} for col, v in cols.items()} for row, cols in values.items()}
    assert [r["verdict"] for r in ablation.relations(one) if r["relation"].startswith("(a)")][0] == "too few seeds"


def test_paired_table_against_the_reference_row():
    values = synthetic({"decm": [0.5] * 5, "fm_cd": [0.6] * 5, "teacher": [1.0] * 5},
                       {("fm_cd", 0): (0.01, -0.01, 0.0)})
    paired = ablation.paired_table(values, "decm")
    assert set(paired) == {"fm_cd"}  # neither the reference nor the teacher (another sampler) is compared
    st = paired["fm_cd"][("chain", 1)]
    assert st["n"] == 3 and abs(st["mean"] - 0.1) < 1e-12 and st["verdict"] == "worse"


def test_table_script_runs_rows_and_writes_every_output(tmp_path):
    out = tmp_path / "out"
    argv = ["--benchmark", "toy2d", "--rows", "teacher", "fm_cd", "decm", "--steps", "6", "--seeds", "2",
            "--runs-root", str(tmp_path / "runs"), "--out", str(out),
            "--bind", "backbones.mlp.width = 16", "--bind", "evaluate.n_samples = 300",
            "--bind", "wandb.enabled = False", "--bind", "teacher/train.steps = 20",
            "--bind", f"experiment.cache_root = '{tmp_path / 'cache'}'"]
    assert ablation.main(argv) == 0
    md = (out / "table.md").read_text()
    assert "| DE-CM (full) |" in md and " ± " in md and "## Relations" in md
    rows = (out / "table.csv").read_text().strip().splitlines()
    assert len(rows) == 4 and rows[0].startswith("row,chain_1_mean")
    results = json.loads((out / "results.json").read_text())
    assert len(results["runs"]) == 6  # 3 rows × 2 seeds
    assert (out / "plot.png").stat().st_size > 0
    assert "## Paired differences vs DE-CM (full)" in md and "| FM + CD (≈FACM) | " in md.split("## Paired")[1]
    st = results["paired"]["rows"]["fm_cd"]["chain_1"]
    assert results["paired"]["reference"] == "decm" and st["n"] == 2 and st["low"] <= st["mean"] <= st["high"]
    assert st["verdict"] in ("better", "worse", "not separated")
    assert "teacher" not in results["paired"]["rows"]
    rels = json.loads((out / "relations.json").read_text())
    assert all(r["verdict"] in ("holds", "does not hold", "not separated", "too few seeds", "n/a") for r in rels)
    # --finished-only with one more seed trains nothing and says which runs are missing; FM + CD as the reference
    partial = tmp_path / "partial"
    again = list(argv)
    again[again.index("--seeds") + 1], again[again.index("--out") + 1] = "3", str(partial)
    assert ablation.main(again + ["--finished-only", "--reference", "fm_cd", "--metric", "energy"]) == 0
    pmd = (partial / "table.md").read_text()
    assert "Partial: 3 of the runs have not finished" in pmd and "energy" in pmd.splitlines()[0]
    assert sorted(glob.glob(str(tmp_path / "runs" / "toy2d" / "*seed2*"))) == []  # nothing trained for seed 2
    presults = json.loads((partial / "results.json").read_text())
    assert len(presults["runs"]) == 6 and set(presults["paired"]["rows"]) == {"decm"}
    assert presults["paired"]["rows"]["decm"]["chain_1"]["n"] == 2
    assert ablation.main(["--rows", "nope"]) == 2
    assert ablation.main(["--rows", "fm_cd", "--reference", "decm"]) == 2  # the reference must be one of the rows


def test_tuning_gives_every_row_the_same_budget_resumes_and_reports_the_chosen_values(tmp_path):
    import optuna

    from decm import sweep

    out = tmp_path / "out"
    base = ["--benchmark", "toy2d_exact", "--rows", "fm_only", "fm_cd", "--steps", "6", "--seeds", "2",
            "--tune-steps", "6", "--runs-root", str(tmp_path / "runs"), "--out", str(out),
            "--bind", "backbones.mlp.width = 16", "--bind", "evaluate.n_samples = 200", "--bind", "wandb.enabled = False"]
    assert ablation.main(base + ["--tune", "2"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["tuned"]) == {"fm_only", "fm_cd"}
    for row, t in results["tuned"].items():
        study = optuna.load_study(study_name=row, storage=sweep.storage_for(sweep.SweepSpec((), (), {}, t["sweep_dir"], row)))
        assert len(study.trials) == 2  # the same budget for every row
        assert set(t["params"]) == set(sweep.load_space(ablation.space_path(row)))
        assert "evaluate.seed = 777" in open(study.trials[0].user_attrs["run_dir"] + "/config.gin").read() or \
            "evaluate.seed = 777" in "".join(open(study.trials[0].user_attrs["run_dir"] + "/gin/bindings.gin"))
    md = (out / "table.md").read_text()
    assert "## Tuned values" in md and "`distill/train.lr` = " in md
    # the final runs use the tuned values and the final evaluation seed
    final = [d for d in results["runs"] if "fm_cd-seed1-" in d][0]
    bindings = open(final + "/gin/bindings.gin").read()
    assert "evaluate.seed = 1235" in bindings and "losses.cm_loss.clamp = " in bindings
    assert ablation.main(base + ["--tune", "3"]) == 0  # rerun: the studies continue to 3 trials
    t = json.loads((out / "results.json").read_text())["tuned"]["fm_cd"]
    study = optuna.load_study(study_name="fm_cd", storage=sweep.storage_for(sweep.SweepSpec((), (), {}, t["sweep_dir"], "fm_cd")))
    assert len(study.trials) == 3


def test_digits_tuning_scores_a_held_out_reference_half_and_sizes_step_ranges_to_its_run():
    """Digits has one finite reference (the 1,797 images): tuning trials score against the 'tune' half and every
    final row (the teacher's too) against the 'final' half; the 2-D benchmarks draw fresh references and keep
    'all'. The digits spaces tune the same settings as the 2-D ones, with step ranges inside the digits run."""
    from decm import sweep

    assert "evaluate.reference_part = 'tune'" in ablation.tune_bindings("digits", 400)
    assert not any("reference_part" in b for b in ablation.tune_bindings("toy2d", 400))
    for row in ("teacher", "decm", "fm_only"):
        assert "evaluate.reference_part = 'final'" in ablation.row_spec("digits", row, 1, 400, "runs").bindings
        assert not any("reference_part" in b for b in ablation.row_spec("toy2d", row, 1, 400, "runs").bindings)
    own = sorted(os.path.basename(p) for p in glob.glob("gin/ablations/digits/*.space.yaml"))
    assert own == ["decm.space.yaml", "fm_n2n.space.yaml", "scm.space.yaml"]
    for name in own:
        row = name[:-len(".space.yaml")]
        assert ablation.space_path(row, "digits") == f"gin/ablations/digits/{name}"
        digits, base = sweep.load_space(f"gin/ablations/digits/{name}"), sweep.load_space(f"gin/ablations/{name}")
        assert set(digits) == set(base)
        for key, dist in digits.items():
            if "steps" in key:
                assert dist["high"] <= 400 < base[key]["high"], key
            else:
                assert dist == base[key], key
    assert ablation.space_path("fm_only", "digits") == ablation.space_path("fm_only") == "gin/ablations/fm_only.space.yaml"


def test_from_results_recomputes_a_committed_table_with_paired_statistics(tmp_path):
    """--from-results rebuilds the committed 3-seed table from its results.json alone: the same means, and
    each row's paired difference is taken seed by seed from the saved runs."""
    import numpy as np

    saved = "analysis/results/ablation-toy2d-tuned/results.json"
    out = tmp_path / "re"
    assert ablation.main(["--benchmark", "toy2d", "--from-results", saved, "--out", str(out)]) == 0
    first = lambda text: text.split("\n\n")[1]  # noqa: E731  the first table (after the title)
    assert first((out / "table.md").read_text()) == first(open("analysis/results/ablation-toy2d-tuned/table.md").read())
    runs = json.loads(open(saved).read())["runs"]

    def chain1(row, k):
        d = next(d for d in runs if os.path.basename(d).startswith(f"{row}-seed{k}-"))
        return next(r["sw2"] for r in runs[d]["rows"] if r["sampler"] == "chain" and r["nfe"] == 1)

    d = np.array([chain1("fm_cd", k) - chain1("decm", k) for k in range(3)])
    st = json.loads((out / "results.json").read_text())["paired"]["rows"]["fm_cd"]["chain_1"]
    assert st["n"] == 3 and abs(st["mean"] - d.mean()) < 1e-12 and abs(st["sd"] - d.std(ddof=1)) < 1e-12
    assert ablation.main(["--from-results", str(tmp_path / "absent.json")]) == 2
