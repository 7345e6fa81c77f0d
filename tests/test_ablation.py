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


def synthetic(values):
    return {row: {col: (v, 0.0, 1) for col, v in zip(ablation.COLUMNS, vals)} for row, vals in values.items()}


def test_relations_logic_on_a_synthetic_table():
    # columns: chain 1, 2, 4, 50, Euler 50
    table = synthetic({"cd_only": [1, 1, 1, 5, 5], "fm_cd": [1, 1, 2, 1, 1], "decm": [0.5, 0.5, 0.5, 0.5, 0.5],
                       "scm": [2, 1, 1, 1, 1], "meanflow": [3, 1, 1, 1, 1], "fm_only": [9, 9, 9, 1, 1],
                       "fm_n2n": [9, 9, 9, 1, 1]})
    rel = {r["relation"][:3]: r["holds"] for r in ablation.relations(table)}
    assert rel == {"(a)": True, "(b)": True, "(c)": True, "(d)": True}
    table["decm"][("chain", 4)] = (3.0, 0.0, 1)
    table["scm"][("chain", 1)] = (0.1, 0.0, 1)
    rels = ablation.relations(table)
    assert [r["holds"] for r in rels if r["relation"].startswith("(c)")][0] is False
    assert [r["holds"] for r in rels if r["relation"].startswith("(d)")][0] is False


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
    assert ablation.main(["--rows", "nope"]) == 2


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
