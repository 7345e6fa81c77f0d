"""The paper's ablation (Table 4 relations) at CPU scale, every row on the same budget.

    python analysis/ablation_table.py --benchmark toy2d [--seeds 1] [--extended] [--backend local]

Rows are gin diffs on the benchmark experiment (gin/ablations/*.gin): teacher, FM only, CD only,
FM + CD (≈ FACM), FM + N2N, full DE-CM, and the peers sCM and MeanFlow distilled from the same
teacher; `--extended` adds λ ∈ {0, 1}, r-decay off, CFG clipping off/on and N2N every 1 / 5 steps (the clip
rows only on benchmarks with CFG w > 1: toy2d_cond, digits; elsewhere they are refused).
Every row uses the benchmark's steps, batch and teacher (`--steps` overrides all rows alike) and seed
k for `distill/train.seed` (the teacher is shared). Students are evaluated with the flow-map chain at
NFE 1/2/4/50 and Euler on the instantaneous velocity F(x,t,t) at 50; the teacher with Euler.

Writes `<out>/table.md`, `table.csv` (mean ± std over seeds), `results.json` (every run's rows and the
paired statistics), `relations.json` (the paper's relations (a)–(d), each with a verdict) and `plot.png`.
Rows of one seed share the evaluation noise, reference draw and teacher, so they are compared as pairs:
against `--reference` (default DE-CM) every row gets the per-seed difference's mean, 95% Student-t interval
(and a bootstrap interval from 8 seeds on) and a verdict better / worse / not separated from that interval
(decm.eval.paired); the relations are decided the same way. Rows run in this process one after another
(`--backend local`) or as separate jobs (`local-subprocess`, `slurm`; resources from `--cluster-gin`),
seed by seed (all rows of seed 0 first). Finished runs (a summary.json with an evaluation) are reused as
they are; unfinished ones resume, so rerunning a command continues it; `--finished-only` writes the
tables from what has finished without training. A row's run directory is
`<runs-root>/<benchmark>/<row>-seed<k>-<config hash>`, so a rerun with any changed setting (steps,
bindings, an edited gin file) trains anew instead of presenting old results. Spreads are sample standard
deviations (ddof = 1). `--extended` also adds DE-CM with N2N's end time capped at 0.5 (n2n_tmax05).
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

# name: (benchmark gin, metric, teacher guided with CFG w > 1, finite reference). A finite reference (digits: the
# 1,797 images themselves) cannot be drawn afresh for tuning, so tuning scores against one half of it and every
# final evaluation against the other (evaluate.reference_part 'tune' / 'final'); a 2-D reference is drawn anew.
BENCHMARKS = {"toy2d": ("gin/toy2d.gin", "sw2", False, False), "toy2d_cond": ("gin/toy2d_cond.gin", "sw2", True, False),
              "toy2d_uneven": ("gin/toy2d_uneven.gin", "sw2", False, False),
              "toy2d_exact": ("gin/toy2d_exact_teacher.gin", "sw2", False, False),
              "digits": ("gin/quickstart.gin", "fid", True, True)}
CLIP_ROWS = ("clip_off", "clip_on")  # η only changes the targets where CFG w > 1
# Tuning (--tune): every row gets its own Optuna study with the same trials and steps per trial. The
# objective is the mean chain metric at NFE 1, 2 and 4 on *held-out* noise and reference samples
# (evaluate.seed 777, reference drawn from seed 778, or the 'tune' half of a finite reference); the final
# evaluation uses evaluate.seed 1234 + k (and the 'final' half).
TUNE_EVAL_SEED = 777
TUNE_METRIC = "student.1.{m},student.2.{m},student.4.{m}"
CORE = ["teacher", "fm_only", "cd_only", "fm_cd", "fm_n2n", "decm", "scm", "meanflow"]
EXTENDED = ["lambda0", "lambda1", "r_decay_off", "clip_off", "clip_on", "n2n_every1", "n2n_every5", "n2n_tmax05"]
LABELS = {"teacher": "teacher (Euler)", "fm_only": "FM only", "cd_only": "CD only", "fm_cd": "FM + CD (≈FACM)",
          "fm_n2n": "FM + N2N", "decm": "DE-CM (full)", "scm": "sCM", "meanflow": "MeanFlow",
          "lambda0": "DE-CM λ=0", "lambda1": "DE-CM λ=1", "r_decay_off": "DE-CM no r-decay",
          "clip_off": "DE-CM clip off", "clip_on": "DE-CM clip on (η=1)", "n2n_every1": "DE-CM N2N every 1",
          "n2n_every5": "DE-CM N2N every 5", "n2n_tmax05": "DE-CM N2N t_max=0.5"}
# (sampler, NFE) columns of the table; the teacher's are Euler at the same NFEs.
COLUMNS = [("chain", 1), ("chain", 2), ("chain", 4), ("chain", 50), ("euler_instant", 50)]
TEACHER_COLUMNS = {("chain", 1): 1, ("chain", 2): 2, ("chain", 4): 4, ("chain", 50): 50}
DISTILLED = ["fm_only", "cd_only", "fm_cd", "fm_n2n", "decm", "scm", "meanflow"]


def row_spec(benchmark: str, row: str, seed: int, steps: int | None, runs_root: str, extra=(), name: str | None = None):
    """The RunSpec of one row and seed (`name` labels the run directory; default: the row)."""
    from decm.job import RunSpec

    gin_file, _, _, finite_reference = BENCHMARKS[benchmark]
    bindings = [f"distill/train.seed = {seed}", f"evaluate.seed = {1234 + seed}", "train.progress = False",
                f"wandb.group = 'ablation-{benchmark}'", f"wandb.tags = ['{row}', 'seed{seed}']"]
    if finite_reference:
        bindings.append("evaluate.reference_part = 'final'")  # never the half that tuning scored against
    if row == "teacher":
        bindings += ["evaluate.teacher_nfe = (1, 2, 4, 50)", "evaluate.teacher_samplers = ('teacher_euler',)"]
    else:
        bindings += ["evaluate.student_nfe = (1, 2, 4, 50)", "evaluate.student_samplers = ('chain', 'euler_instant')",
                     "evaluate.teacher_nfe = ()"]
        if steps:
            bindings.append(f"distill/train.steps = {steps}")
    gin_files, bindings = (gin_file, f"gin/ablations/{row}.gin"), tuple(bindings) + tuple(extra)
    run_dir = os.path.join(runs_root, benchmark, f"{name or row}-seed{seed}-{config_key(gin_files, bindings)}")
    return RunSpec(gin_files, bindings, run_dir, force=True)


def config_key(gin_files, bindings) -> str:
    """12 hex digits of the parsed configuration (every included file and binding): a rerun with any
    changed setting gets a new run directory instead of resuming one trained with other settings."""
    import hashlib

    import gin

    from decm.job import parse

    parse(gin_files, bindings)
    return hashlib.sha256(gin.config_str().encode()).hexdigest()[:12]


def space_path(row: str, benchmark: str | None = None) -> str:
    """The row's search space, beside its gin diff: gin/ablations/<benchmark>/<row>.space.yaml where the
    benchmark has its own (step-valued ranges sized to its distillation length), else gin/ablations/<row>.space.yaml."""
    own = f"gin/ablations/{benchmark}/{row}.space.yaml"
    return own if benchmark and os.path.exists(own) else f"gin/ablations/{row}.space.yaml"


def tune_bindings(benchmark: str, steps: int | None, extra=()) -> tuple:
    """The bindings every tuning trial of `benchmark` runs with: held-out noise (and reference half), the chain
    at NFE 1/2/4 only, distillation seed 0."""
    finite_reference = BENCHMARKS[benchmark][3]
    return ("distill/train.seed = 0", f"evaluate.seed = {TUNE_EVAL_SEED}", "evaluate.student_nfe = (1, 2, 4)",
            "evaluate.student_samplers = ('chain',)", "evaluate.teacher_nfe = ()", "train.progress = False",
            f"wandb.group = 'tuning-{benchmark}'") + ((f"distill/train.steps = {steps}",) if steps else ()) + \
        (("evaluate.reference_part = 'tune'",) if finite_reference else ()) + tuple(extra)


def tune_row(benchmark: str, row: str, trials: int, steps: int | None, runs_root: str, extra=()) -> dict:
    """Runs (or resumes) the row's Optuna study and returns its best parameters, value and sweep dir."""
    import hashlib
    import json as json_

    from decm import sweep

    gin_file, metric = BENCHMARKS[benchmark][:2]
    gin_files, bindings = (gin_file, f"gin/ablations/{row}.gin"), tune_bindings(benchmark, steps, extra)
    space = sweep.load_space(space_path(row, benchmark))
    key = hashlib.sha256((config_key(gin_files, bindings) + json_.dumps(space, sort_keys=True)).encode()).hexdigest()[:12]
    sweep_dir = os.path.join(runs_root, "tuning", benchmark, f"{row}-{key}")
    spec = sweep.SweepSpec(gin_files, bindings, space, sweep_dir, row, "", trials, TUNE_METRIC.format(m=metric))
    sweep.validate(spec)
    os.makedirs(sweep_dir, exist_ok=True)
    with open(os.path.join(sweep_dir, "sweep.json"), "w") as f:
        f.write(spec.to_json())
    dead = sweep.reap(sweep.load_study(spec))  # a killed earlier attempt's RUNNING trial → FAIL (then retried)
    if dead:
        print(f"[ablation] tuning {row}: reaped trials {dead}", file=sys.stderr, flush=True)
    print(f"[ablation] tuning {row}: {trials} trials → {sweep_dir}", file=sys.stderr, flush=True)
    sweep.worker(spec, 0, 1)
    summary = sweep.finalize(spec)
    if summary["best"] is None:
        raise ValueError(f"tuning {row}: no trial completed ({summary['states']}); see {sweep_dir}")
    return {"params": summary["best"]["params"], "value": summary["best"]["value"], "sweep_dir": sweep_dir,
            "states": summary["states"], "trials": trials, "steps": steps, "metric": spec.metric,
            "seconds": trial_seconds(sweep_dir)}


def trial_seconds(sweep_dir: str) -> float:
    """Stage seconds summed over the study's finished trials, as each trial run measured them."""
    import glob

    total = 0.0
    for path in glob.glob(os.path.join(sweep_dir, "trials", "trial-*", "summary.json")):
        with open(path) as f:
            total += sum(v["seconds"] for v in json.load(f).values() if isinstance(v, dict) and "seconds" in v)
    return total


def row_seed(run_dir: str):
    """(row, seed) from a run directory named `<row>-seed<k>-<12 hex digits>`, else None."""
    import re

    m = re.fullmatch(r"(.+)-seed(\d+)-[0-9a-f]{12}", os.path.basename(run_dir.rstrip("/")))
    return (m.group(1), int(m.group(2))) if m else None


def load_saved(path: str):
    """(results, rows in order, seeds, tuned, seconds) of a results.json this script wrote."""
    with open(path) as f:
        saved = json.load(f)
    results, rows = saved["runs"], []
    for run_dir in results:
        rs = row_seed(run_dir)
        if rs is None:
            raise ValueError(f"{path}: run directory {run_dir!r} is not named <row>-seed<k>-<config hash>")
        if rs[0] not in rows:
            rows.append(rs[0])
    return results, rows, saved["seeds"], saved.get("tuned") or {}, saved.get("seconds")


def finished(run_dir: str) -> bool:
    """True when the run directory holds a completed experiment with its evaluation (summary.json is
    written last); the directory name carries the config hash, so its settings are these."""
    path = os.path.join(run_dir, "summary.json")
    if not os.path.exists(path) or not os.path.exists(os.path.join(run_dir, "metrics.json")):
        return False
    with open(path) as f:
        return "evaluate" in json.load(f)


def run_all(specs, backend: str, cluster_gin: str | None, finished_only: bool = False):
    """Runs every spec (in order locally, or as parallel jobs) and returns {run_dir: metrics dict}; with
    `finished_only`, trains nothing and returns the finished runs only."""
    from decm.job import parse, prepare, run

    done = [s for s in specs if finished(s.run_dir)]
    for spec in done:
        print(f"[ablation] reusing the finished run {spec.run_dir}", file=sys.stderr, flush=True)
    specs_all, specs = specs, [s for s in specs if s not in done]
    if finished_only:
        specs_all, specs = done, []
    for spec in specs:  # validate everything and write the snapshots before running anything
        prepare(spec)
    if backend == "local":
        from decm.progress import Countdown
        from decm.wandb_log import one_sync_line

        countdown = Countdown(len(specs), "ablation")
        with one_sync_line("ablation"):  # one W&B line after all the runs
            for spec in specs:
                countdown.start(spec.run_dir)
                parse(spec.gin_files, spec.bindings)
                run(spec)
                countdown.finish()
    else:
        from decm.cluster import ClusterSpec, cluster, submit, with_backend

        resources = ClusterSpec(backend=backend)
        if cluster_gin:
            parse([cluster_gin], [])
            resources = with_backend(cluster(), backend)
        jobs = [submit(spec, resources) for spec in specs]
        for spec, job in zip(specs, jobs):
            job.result()
            print(f"[ablation] done {spec.run_dir} (job {job.job_id})", file=sys.stderr, flush=True)
    out = {}
    for spec in specs_all:
        with open(os.path.join(spec.run_dir, "metrics.json")) as f:
            out[spec.run_dir] = json.load(f)
        with open(os.path.join(spec.run_dir, "summary.json")) as f:  # stage wall times, as the runs measured them
            summary = json.load(f)
        out[spec.run_dir]["seconds"] = {k: v["seconds"] for k, v in summary.items()
                                        if isinstance(v, dict) and "seconds" in v}
    return out


def cell(rows, row: str, sampler: str, nfe: int, metric: str):
    if row == "teacher":
        if (sampler, nfe) not in TEACHER_COLUMNS:
            return None
        sampler = "teacher_euler"
    for r in rows:
        if r["sampler"] == sampler and r["nfe"] == nfe and metric in r:
            return float(r[metric])
    return None


def per_seed(results: dict, rows_order, seeds, metric):
    """{row: {(sampler, nfe): {seed: value}}} over the seeds whose run finished (missing seeds left out); runs
    are found by their directory names (row_seed)."""
    index = {row_seed(run_dir): run_dir for run_dir in results}
    out = {}
    for row in rows_order:
        out[row] = {}
        for col in COLUMNS:
            vals = {}
            for seed in seeds:
                m = results.get(index.get((row, seed)))
                v = cell(m["rows"], row, col[0], col[1], metric) if m else None
                if v is not None:
                    vals[seed] = v
            out[row][col] = vals
    return out


def aggregate(values: dict):
    """{row: {(sampler, nfe): (mean, sd, n)}} from per_seed's values, sd the sample standard deviation (ddof = 1;
    0 for one seed)."""
    table = {}
    for row, cols in values.items():
        table[row] = {}
        for col, by_seed in cols.items():
            vals = list(by_seed.values())
            sd = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
            table[row][col] = (float(np.mean(vals)), sd, len(vals)) if vals else None
    return table


def paired_table(values: dict, reference: str):
    """{row: {(sampler, nfe): paired statistics of row − reference}} for every row but the reference and the
    teacher (whose columns are another sampler), pairs matched by seed (decm.eval.paired)."""
    from decm.eval.paired import paired_difference

    return {row: {col: paired_difference(values[row][col], values[reference][col]) for col in COLUMNS}
            for row in values if row not in (reference, "teacher")}


DECIMALS = {"sw2": 3, "energy": 4, "fid": 1}  # printed decimals per metric (FID's seed spread is several units)


def fmt(v, decimals: int = 3) -> str:
    if v is None:
        return "—"
    mean, std, n = v
    return f"{mean:.{decimals}f} ± {std:.{decimals}f}" if n > 1 else f"{mean:.{decimals}f}"


def relations(values: dict) -> list[dict]:
    """The paper's relations (lower is better), each decided by paired per-seed differences.

    `values`: {row: {(sampler, nfe): {seed: value}}} (per_seed). Each relation's `verdict` comes from the 95%
    t interval of the paired difference (decm.eval.paired): 'holds' when the interval lies on the relation's
    side of zero, 'does not hold' when on the other side, 'not separated' when it contains zero, 'too few
    seeds' below two pairs, 'n/a' when a row is missing. `holds` is True / False / None accordingly;
    `means` records what the means alone say (the old check) so the two can be compared.
    """
    from decm.eval.paired import format_difference, paired_difference

    def vals(row, col):
        return values.get(row, {}).get(col) or {}

    def mean(row, col):
        v = vals(row, col)
        return float(np.mean(list(v.values()))) if v else None

    def f4(v):
        return "—" if v is None else f"{v:.4f}"

    out = []

    def check(name, worse, better, detail):
        """The relation says `worse` − `better` > 0 (per seed, paired), e.g. CD only worse than FM + CD."""
        a, b = vals(*worse), vals(*better)
        if not a or not b:
            out.append({"relation": name, "verdict": "n/a", "holds": None, "means": None, "detail": detail})
            return
        st = paired_difference(a, b)
        verdict = {"worse": "holds", "better": "does not hold"}.get(st["verdict"], st["verdict"])
        out.append({"relation": name, "verdict": verdict,
                    "holds": {"holds": True, "does not hold": False}.get(verdict),
                    "means": bool(st["mean"] > 0), "paired": st,
                    "detail": f"{detail}; paired difference {format_difference(st, 4)} (n = {st['n']})"})

    e50, c4, c2, c1 = ("euler_instant", 50), ("chain", 4), ("chain", 2), ("chain", 1)
    check("(a) CD only worse than FM + CD at 50 NFE (Euler on F(x,t,t))", ("cd_only", e50), ("fm_cd", e50),
          f"CD only {f4(mean('cd_only', e50))}, FM + CD {f4(mean('fm_cd', e50))}")
    check("(b) FM + CD: 4 NFE worse than 2 NFE (chain)", ("fm_cd", c4), ("fm_cd", c2),
          f"4 NFE {f4(mean('fm_cd', c4))}, 2 NFE {f4(mean('fm_cd', c2))}")
    for col, label in ((c4, "4 NFE chain"), (e50, "50 NFE Euler"), (("chain", 50), "50 NFE chain")):
        others = [r for r in DISTILLED if r != "decm" and vals(r, col)]
        name = f"(c) DE-CM best or tied (no row separated better) at {label}"
        if not vals("decm", col) or not others:
            out.append({"relation": name, "verdict": "n/a", "holds": None, "means": None, "detail": "rows missing"})
            continue
        stats = {r: paired_difference(vals(r, col), vals("decm", col)) for r in others}  # other − DE-CM
        better = [r for r, st in stats.items() if st["verdict"] == "better"]
        few = [r for r, st in stats.items() if st["verdict"] == "too few seeds"]
        verdict = "does not hold" if better else ("too few seeds" if few else "holds")
        best = min(mean(r, col) for r in others + ["decm"])
        out.append({"relation": name, "verdict": verdict, "holds": {"holds": True, "does not hold": False}.get(verdict),
                    "means": mean("decm", col) <= best * 1.05, "paired": {r: st for r, st in stats.items()},
                    "detail": "; ".join(f"{LABELS[r]} − DE-CM {format_difference(st, 4)}" for r, st in stats.items())})
    name = "(d) DE-CM ≤ sCM and ≤ MeanFlow at 1 NFE"
    if not (vals("decm", c1) and vals("scm", c1) and vals("meanflow", c1)):
        out.append({"relation": name, "verdict": "n/a", "holds": None, "means": None,
                    "detail": f"DE-CM {f4(mean('decm', c1))}, sCM {f4(mean('scm', c1))}, MeanFlow {f4(mean('meanflow', c1))}"})
    else:
        stats = {r: paired_difference(vals(r, c1), vals("decm", c1)) for r in ("scm", "meanflow")}
        v = [st["verdict"] for st in stats.values()]
        verdict = ("does not hold" if "better" in v else "holds" if all(x == "worse" for x in v)
                   else "too few seeds" if "too few seeds" in v else "not separated")
        out.append({"relation": name, "verdict": verdict, "holds": {"holds": True, "does not hold": False}.get(verdict),
                    "means": mean("decm", c1) <= min(mean("scm", c1), mean("meanflow", c1)), "paired": stats,
                    "detail": "; ".join(f"{LABELS[r]} − DE-CM {format_difference(st, 4)}" for r, st in stats.items())})
    return out


def write_outputs(table, rels, results, out, benchmark, metric, seeds, rows_order, tuned=None, seconds=None,
                  paired=None, reference="decm", missing=()):
    from decm.eval.paired import BOOTSTRAP_MIN_SEEDS, format_difference

    os.makedirs(out, exist_ok=True)
    head = ["row"] + [f"{'chain' if s == 'chain' else 'Euler F(x,t,t)'} {n}" for s, n in COLUMNS]
    md = [f"# Ablation table — {benchmark}, {metric} (lower is better), seeds {list(seeds)}", ""]
    if missing:
        by_row = {}
        for name in missing:  # "<row>-seed<k>"
            row, _, k = name.rpartition("-seed")
            by_row.setdefault(row, []).append(int(k))
        md += [f"Partial: {len(missing)} of the runs have not finished (" + "; ".join(
            f"{LABELS.get(r, r)} seeds {', '.join(map(str, sorted(ks)))}" for r, ks in by_row.items()) +
            "); every mean and paired difference below uses the seeds that have.", ""]
    md += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    with open(os.path.join(out, "table.csv"), "w") as f:
        f.write(",".join(["row"] + [f"{s}_{n}_{k}" for s, n in COLUMNS for k in ("mean", "std")]) + "\n")
        for row in rows_order:
            md.append(f"| {LABELS.get(row, row)} | " + " | ".join(fmt(table[row][c], DECIMALS.get(metric, 3))
                                                             for c in COLUMNS) + " |")
            vals = []
            for c in COLUMNS:
                v = table[row][c]
                vals += ["", ""] if v is None else [f"{v[0]:.6g}", f"{v[1]:.6g}"]
            f.write(",".join([row] + vals) + "\n")
    md += ["", "Teacher columns: Euler on the teacher velocity at the same NFE. Mean ± sample sd (ddof = 1) "
           "over training seeds.", ""]
    if paired:
        md += [f"## Paired differences vs {LABELS.get(reference, reference)}", "",
               f"Per seed, row − {LABELS.get(reference, reference)} (same seed: same evaluation noise, reference draw "
               "and teacher), then the mean and its 95% Student-t interval [low, high]"
               f"{f' and, with ≥ {BOOTSTRAP_MIN_SEEDS} seeds, a percentile bootstrap interval {{low, high}}'}. "
               "Verdict from the t interval: **better** (wholly below 0: lower metric), **worse** (wholly above 0), "
               "**not separated** (contains 0).", "",
               "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for row in rows_order:
            if row in paired:
                md.append(f"| {LABELS.get(row, row)} | " + " | ".join(
                    format_difference(paired[row][c], DECIMALS.get(metric, 3) + 1) for c in COLUMNS) + " |")
        md.append("")
    if tuned:
        any_row = next(iter(tuned.values()))
        md += ["## Tuned values", "",
               f"Each row: its own Optuna study, {any_row['trials']} trials × "
               f"{any_row['steps'] or 'the benchmark'} steps, objective {any_row['metric']} on held-out noise and "
               f"reference (evaluate.seed {TUNE_EVAL_SEED}); the table above evaluates the best configuration on "
               "the final noise" + (" and scores every row against the other half of the reference (evaluate."
                                    "reference_part 'tune' / 'final')." if BENCHMARKS[benchmark][3] else "."), ""]
        for row, t in tuned.items():
            vals = ", ".join(f"`{k}` = {v:.4g}" if isinstance(v, float) else f"`{k}` = {v}" for k, v in t["params"].items())
            md.append(f"- {LABELS.get(row, row)} (validation {t['value']:.4f}): {vals}")
        md.append("")
    train_s = sum(v for r in results.values() for v in r.get("seconds", {}).values())
    if seconds is not None:
        tune_s = sum(t.get("seconds", 0.0) for t in (tuned or {}).values())
        md += [f"Training time summed over the runs' stages: {train_s:.0f} s (each run's own clock, shared CPUs "
               f"included)" + (f", plus {tune_s:.0f} s of tuning trials" if tuned else "") +
               f"; this command's wall time: {seconds:.0f} s (finished runs are reused).", ""]
    md += ["## Relations", "", "Each verdict from the 95% t interval of the paired per-seed difference (not separated: "
           "the interval contains 0).", ""]
    for r in rels:
        md.append(f"- {r['relation']}: **{r['verdict']}** — {r['detail']}")
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    with open(os.path.join(out, "relations.json"), "w") as f:
        json.dump(rels, f, indent=2)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"runs": results, "tuned": tuned or {}, "seconds": seconds, "seeds": list(seeds), "metric": metric,
                   "missing": sorted(missing),
                   "table": {row: {f"{s}_{n}": v for (s, n), v in cols.items()} for row, cols in table.items()},
                   "paired": {"reference": reference,
                              "rows": {row: {f"{s}_{n}": st for (s, n), st in cols.items()}
                                       for row, cols in (paired or {}).items()}}},
                  f, indent=2)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from decm.plots import metric_label, save, spans_decades

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ys, styles = [], ["-", "--", ":", "-."]
    for i, row in enumerate(rows_order):
        pts = [(n, table[row][(s, n)][0]) for s, n in COLUMNS if s == "chain" and table[row][(s, n)]]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ls=styles[i // 10 % 4], label=LABELS.get(row, row))
            ys += [p[1] for p in pts]
    nfes = sorted({n for s, n in COLUMNS if s == "chain"})
    ax.set_xscale("log")
    ax.set_xticks(nfes)
    ax.set_xticklabels([str(n) for n in nfes])
    ax.minorticks_off()
    if spans_decades(ys):
        ax.set_yscale("log")
    ax.set_xlabel("NFE (students: flow-map chain; teacher: Euler steps)")
    ax.set_ylabel(metric_label(metric) + f", mean over up to {len(seeds)} seed(s)")
    ax.legend(fontsize=8, ncol=2)
    save(fig, os.path.join(out, "plot.png"), dpi=110)
    return "\n".join(md)


def main(argv=None) -> int:
    from decm import cli

    p = cli.parser("python analysis/ablation_table.py", __doc__)
    p.add_argument("--benchmark", choices=sorted(BENCHMARKS), default="toy2d",
                   help="toy2d: 2-D mixture, paper protocol; toy2d_cond: with CFG; toy2d_exact: analytic teacher; "
                        "toy2d_uneven: 6 modes, unequal weights and widths, paper protocol; digits: the quickstart")
    p.add_argument("--seeds", type=int, default=1, help="seeds per row (distill/train.seed = 0 … N−1)")
    p.add_argument("--rows", nargs="+", default=None, help=f"subset of rows (default: {' '.join(CORE)})")
    p.add_argument("--extended", action="store_true", help="add the λ / r-decay / clipping / N2N-period rows")
    p.add_argument("--tune", type=int, default=0, metavar="TRIALS",
                   help="tune every row first: its own Optuna study of TRIALS trials over its space "
                        "(gin/ablations/<row>.space.yaml) on held-out noise, then train the best with --seeds")
    p.add_argument("--tune-steps", type=int, default=None, help="steps per tuning trial (default: --steps, else the "
                                                                  "benchmark's)")
    p.add_argument("--steps", type=int, default=None, help="distillation steps for every row (default: the benchmark's)")
    p.add_argument("--backend", default="local", choices=("local", "local-subprocess", "slurm"),
                   help="rows in this process one after another, or as submitit jobs")
    p.add_argument("--cluster-gin", default=None, help="gin file with cluster.* resources for submitted rows")
    p.add_argument("--bind", action="append", default=[], help="extra gin binding for every row (repeatable)")
    p.add_argument("--runs-root", default="runs/ablations", help="where the row runs live")
    p.add_argument("--reference", default=None,
                   help="row the paired differences are taken against (default: decm when it is among the rows)")
    p.add_argument("--metric", default=None, choices=sorted(DECIMALS),
                   help="metric of the table (default: the benchmark's; 2-D runs also record 'energy')")
    p.add_argument("--from-results", default=None, metavar="RESULTS_JSON",
                   help="train nothing: rewrite the tables (paired statistics, relations) from a results.json this "
                        "script wrote, e.g. a committed table under analysis/results/ (rows and seeds as saved)")
    p.add_argument("--finished-only", action="store_true",
                   help="train nothing: write the tables from the runs that have finished (a partial table while a "
                        "command trains the rest)")
    p.add_argument("--out", default=None, help="output directory (default: a fresh runs/analysis/ablation-<benchmark>-"
                                               "<time>; committed references under analysis/results/ are replaced "
                                               "only when given here)")
    args = p.parse_args(argv)
    sys.path.insert(0, os.getcwd())
    if args.from_results:
        return from_results(args)
    extended = [r for r in EXTENDED if BENCHMARKS[args.benchmark][2] or r not in CLIP_ROWS] if args.extended else []
    if args.extended and len(extended) < len(EXTENDED):
        print(f"[ablation] --benchmark {args.benchmark} has no CFG: clip rows left out (run them on toy2d_cond)",
              file=sys.stderr)
    rows = args.rows or (CORE + extended)
    bad = [r for r in rows if not os.path.exists(f"gin/ablations/{r}.gin")]
    if bad or args.seeds < 1:
        print(f"ablation_table: error: unknown rows {bad} or --seeds < 1 (rows: {' '.join(CORE + EXTENDED)})",
              file=sys.stderr)
        return 2
    reference = args.reference or ("decm" if "decm" in rows else None)
    if args.reference is not None and (args.reference not in rows or args.reference == "teacher"):
        print(f"ablation_table: error: --reference {args.reference} must be one of the distilled rows {rows}",
              file=sys.stderr)
        return 2
    if args.finished_only and args.tune:
        print("ablation_table: error: --finished-only trains nothing; it cannot be combined with --tune", file=sys.stderr)
        return 2
    clip = [r for r in rows if r in CLIP_ROWS]
    if clip and not BENCHMARKS[args.benchmark][2]:
        print(f"ablation_table: error: rows {clip} change the CFG clip η, which does nothing without CFG w > 1 on "
              f"--benchmark {args.benchmark}: use --benchmark toy2d_cond or digits", file=sys.stderr)
        return 2
    from decm.job import ConfigError
    from decm.run_lock import RunLocked
    from decm.sweep import SweepError

    seeds = list(range(args.seeds))
    t0 = time.time()
    tuned = {}
    try:
        if args.tune:
            missing = [r for r in rows if r != "teacher" and not os.path.exists(space_path(r, args.benchmark))]
            if missing:
                raise ValueError(f"--tune: rows {missing} have no search space ({space_path(missing[0])})")
            for r in rows:
                if r != "teacher":
                    tuned[r] = tune_row(args.benchmark, r, args.tune, args.tune_steps or args.steps, args.runs_root,
                                        args.bind)
        from decm.sweep import literal

        extra = {r: tuple(args.bind) + tuple(f"{k} = {literal(v)}" for k, v in tuned.get(r, {}).get("params", {}).items())
                 for r in rows}
        # seed-major: every row of seed k trains before any row of seed k + 1, so an interrupted command leaves
        # complete pairs (the rows of one seed) for the paired statistics
        specs = [row_spec(args.benchmark, r, s, args.steps, args.runs_root, extra[r]) for s in seeds for r in rows]
        results = run_all(specs, args.backend, args.cluster_gin, args.finished_only)
    except (ConfigError, SweepError, FileNotFoundError, ValueError, RunLocked) as e:  # RunLocked: another command trains that row
        print(f"ablation_table: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    metric = args.metric or BENCHMARKS[args.benchmark][1]
    values = per_seed(results, rows, seeds, metric)
    table = aggregate(values)
    paired = paired_table(values, reference) if reference else None
    rels = relations(values)
    missing = [os.path.basename(s.run_dir).rsplit("-", 1)[0] for s in specs if s.run_dir not in results]
    out = args.out or os.path.join("runs", "analysis", time.strftime(f"ablation-{args.benchmark}-%Y%m%d-%H%M%S"))
    print(write_outputs(table, rels, results, out, args.benchmark, metric, seeds, rows, tuned, time.time() - t0,
                        paired, reference, missing))
    print(f"\n→ {out}/table.md, table.csv, relations.json, results.json, plot.png")
    return 0


def from_results(args) -> int:
    """--from-results: the tables of a saved results.json, recomputed with this script's statistics."""
    try:
        results, rows, seeds, tuned, seconds = load_saved(args.from_results)
    except (OSError, ValueError, KeyError) as e:
        print(f"ablation_table: error: --from-results {args.from_results}: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    reference = args.reference or ("decm" if "decm" in rows else None)
    if reference is not None and reference not in rows:
        print(f"ablation_table: error: --reference {reference} is not among the saved rows {rows}", file=sys.stderr)
        return 2
    metric = args.metric or BENCHMARKS[args.benchmark][1]
    values = per_seed(results, rows, seeds, metric)
    missing = [f"{r}-seed{k}" for r in rows for k in seeds if (r, k) not in {row_seed(d) for d in results}]
    out = args.out or os.path.join("runs", "analysis", time.strftime(f"ablation-{args.benchmark}-%Y%m%d-%H%M%S"))
    print(write_outputs(aggregate(values), relations(values), results, out, args.benchmark, metric, seeds, rows, tuned,
                        seconds, paired_table(values, reference) if reference else None, reference, missing))
    return 0


if __name__ == "__main__":
    from decm import cli

    sys.exit(cli.main_exit("ablation_table", main))
