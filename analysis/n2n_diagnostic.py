"""N2N diagnostic: why adding N2N to FM + CD changes the 1-, 2- and 4-step results, with the exact oracle.

    python analysis/n2n_diagnostic.py [--variants fm_cd decm lambda0 ...] [--seeds 3] [--steps 3000]

Every variant is DE-CM (or FM + CD) on the 2-D mixture with the *analytic* teacher
(`gin/toy2d_exact_teacher.gin`), so the exact flow map F*(x, t, s) is known (fine RK4 on the exact
velocity). Each variant changes one candidate cause (the N2N weight or period, w′(r, t), the r schedule,
the teacher call at the predicted point (λ = 0 removes it), the tangent convention). For every
run and every saved checkpoint (`--ckpt-every`) the script measures, on fixed held-out noise:

- **term target errors**: RMS(target − F*) of each term's stop-gradient target at the points that term
  trains (cm: (t, 1); fm: (t, t); n2n: (r, t) from its selector at that step), with the online weights
  that produce the targets in training;
- **student errors by (t, s)**: RMS(F_θ(x*_t, t, s) − F*(x*_t, t, s)) of the EMA student on the exact
  trajectory, for the hops of 1-, 2- and 4-step sampling — where the error grows once N2N is on;
- **target errors by end time**: at the last checkpoint, the N2N target on (0, t) and the CM target on
  (t, 1) against F*, by bins of t — which end of each cluster's targets is far from the exact map;
- **the shared point F(z, 0, 1)**: the CM target at t = 0 and the N2N target at (r, t) = (0, 1) both
  train F(z, 0, 1); their RMS disagreement and each one's distance to F*(z, 0, 1);
- the run's own evaluation: SW2 of the flow-map chain at NFE 1/2/4 (metrics.json, lower is better).

Writes `<out>/table.md`, `table.csv` (mean ± sample sd over seeds, ddof = 1), `results.json` (every
run, every checkpoint) and `trace.png` (the (0, 1) student error and the n2n target error over
training). Runs live under `<runs-root>/toy2d_exact/<variant>-seed<k>-<config hash>` and are reused.
Every variant is also compared with `--reference` (default decm) seed by seed: the paired difference's
mean, 95% t interval and verdict (decm.eval.paired) on the headline columns. `--from-results` rewrites
the tables from a saved results.json without the runs. Default output: a fresh
`runs/analysis/n2n_diagnostic-<time>`; the committed reference is `analysis/results/n2n_diagnostic`
(`--out` it to replace).
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np
import torch

# variant: (ablation row, extra gin bindings) — each changes one candidate cause relative to 'decm'.
VARIANTS = {
    "fm_cd": ("fm_cd", ()),
    "decm": ("decm", ()),
    "n2n_weight_0.3": ("decm", ("n2n/objectives.term.weight = 0.3",)),
    "n2n_every_1": ("decm", ("n2n/objectives.term.every = 1",)),
    "n2n_every_9": ("decm", ("n2n/objectives.term.every = 9",)),
    "w_prime_0.5": ("decm", ("losses.n2n_loss.w_prime = 0.5",)),
    "r_decay_off": ("decm", ("selectors.noise_to_noisy.decay_steps = 0",)),
    "r_decay_to_end": ("decm", ("selectors.noise_to_noisy.decay_steps = 3000",)),
    "r_uniform": ("decm", ("selectors.noise_to_noisy.r_sampling = 'uniform'",)),
    "lambda_0": ("decm", ("losses.n2n_loss.lam = 0.0",)),
    "tangent_note": ("decm", ("losses.n2n_loss.tangent = @n2n_variants.tangent_note",)),
    "n2n_t_max_0.5": ("decm", ("selectors.noise_to_noisy.t_max = 0.5",)),
}
DEFAULT_VARIANTS = ["fm_cd", "decm", "n2n_weight_0.3", "n2n_every_9", "w_prime_0.5", "r_decay_off", "r_decay_to_end",
                    "lambda_0", "tangent_note", "n2n_t_max_0.5"]  # the committed study; n2n_every_1, r_uniform on request
# (t, s) pairs: the hops of 1-, 2- and 4-step chains on the uniform grid.
PAIRS = [(0.0, 1.0), (0.0, 0.5), (0.5, 1.0), (0.0, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1.0)]
BENCHMARK = "toy2d_exact"
# The headline table's columns (the full table has every column).
COMPACT = ["SW2 NFE 1", "SW2 NFE 2", "SW2 NFE 4", "F err 0→1", "F err 0→0.25", "F err 0.75→1",
           "n2n target err t∈0–0.25", "n2n target err t∈0.75–1", "cm target err t∈0–0.25", "(0,1) cm vs n2n target"]


def rms(a, b) -> float:
    return float(((a.detach() - b.detach()) ** 2).flatten(1).sum(1).mean().sqrt())


def exact_average_velocity(teacher, x, t, s, ode_steps: int):
    """F*(x, t, s) = (Φ_{t→s}(x) − x)/(s − t) by fine RK4 on the exact velocity; v(x, t) where s = t."""
    from decm.method.shapes import bcast
    from decm.method.teachers import ode_flow

    gap = s - t
    same = gap.abs() < 1e-9
    end = ode_flow(teacher, x.double(), t.double(), torch.where(same, t + 1e-3, s).double(), None, ode_steps)
    avg = (end - x.double()) / bcast(torch.where(same, torch.full_like(gap, 1e-3), gap), x).double()
    return torch.where(bcast(same, x).bool(), teacher(x.double(), t.double()), avg).to(x.dtype)


def term_target_errors(objective, student, teacher, step: int, n: int, seed: int, ode_steps: int) -> dict:
    """{term: RMS(target − F*)} at the points each term trains at this step (fixed noise and data)."""
    from decm.method.objective import Context

    g = torch.Generator().manual_seed(seed)
    x1 = teacher.sample(n, g)
    z = torch.randn(x1.shape, generator=g)
    u = objective.time_sampler(n, g)
    ctx = Context(student, teacher, objective.guidance, x1, z, None, step, objective.jvp_method, "mask", g)
    out = {}
    for term in objective.terms:
        t, s = term.selector(u, step, g)
        x, target = term.loss.target(ctx, t, s)
        out[term.term_name] = rms(target.detach(), exact_average_velocity(teacher, x, t, s, ode_steps))
    return out


def shared_point(objective, student, teacher, n: int, seed: int, ode_steps: int) -> dict:
    """CM target at (0, 1) vs N2N target at (r, t) = (0, 1): both train F(z, 0, 1)."""
    from decm.method.losses import CMLoss, N2NLoss
    from decm.method.objective import Context

    g = torch.Generator().manual_seed(seed)
    x1 = teacher.sample(n, g)
    z = torch.randn(x1.shape, generator=g)
    zero, one = torch.zeros(n), torch.ones(n)
    ctx = Context(student, teacher, objective.guidance, x1, z, None, 10 ** 9, objective.jvp_method, "mask", g)
    cm = next((t.loss for t in objective.terms if isinstance(t.loss, CMLoss)), None) or CMLoss()
    n2n = next((t.loss for t in objective.terms if isinstance(t.loss, N2NLoss)), None) or N2NLoss()
    _, cm_target = cm.target(ctx, zero, one)
    _, n2n_target = n2n.target(ctx, zero, one)
    exact = exact_average_velocity(teacher, z, zero, one, ode_steps)
    return {"cm_vs_n2n": rms(cm_target, n2n_target), "cm_vs_exact": rms(cm_target, exact),
            "n2n_vs_exact": rms(n2n_target, exact), "student_vs_exact": rms(student(z, zero, one).detach(), exact)}


T_BINS = (0.0, 0.25, 0.5, 0.75, 1.0)


def target_errors_by_t(objective, student, teacher, n: int, seed: int, ode_steps: int) -> dict:
    """RMS(target − F*) by bins of the end time: the N2N target on (0, t) and the CM target on (t, 1), t on a
    uniform grid — which part of each cluster's targets is far from the exact flow map."""
    from decm.method.losses import CMLoss, N2NLoss
    from decm.method.objective import Context

    g = torch.Generator().manual_seed(seed)
    x1 = teacher.sample(n, g)
    z = torch.randn(x1.shape, generator=g)
    t = (torch.arange(n) + 0.5) / n
    ctx = Context(student, teacher, objective.guidance, x1, z, None, 10 ** 9, objective.jvp_method, "mask", g)
    out = {}
    cm = next((t_.loss for t_ in objective.terms if isinstance(t_.loss, CMLoss)), None) or CMLoss()
    n2n = next((t_.loss for t_ in objective.terms if isinstance(t_.loss, N2NLoss)), None) or N2NLoss()
    for name, (a, b, loss) in {"n2n (0→t)": (torch.zeros(n), t, n2n), "cm (t→1)": (t, torch.ones(n), cm)}.items():
        x, target = loss.target(ctx, a, b)
        err = ((target.detach() - exact_average_velocity(teacher, x, a, b, ode_steps)) ** 2).flatten(1).sum(1)
        out[name] = {f"{lo:g}–{hi:g}": float(err[(t >= lo) & (t < hi)].mean().sqrt())
                     for lo, hi in zip(T_BINS[:-1], T_BINS[1:])}
    return out


def student_errors(student, teacher, n: int, seed: int, ode_steps: int) -> dict:
    """{'t→s': RMS(F_θ − F*)} on the exact trajectory x*_t from fixed noise, for the chain hops."""
    from decm.method.teachers import ode_flow

    z = torch.randn(n, *teacher.shape, generator=torch.Generator().manual_seed(seed))
    out = {}
    for t, s in PAIRS:
        tt, ss = torch.full((n,), t), torch.full((n,), s)
        x = z if t == 0 else ode_flow(teacher, z.double(), torch.zeros(n).double(), tt.double(), None,
                                       max(1, int(ode_steps * t))).float()
        out[f"{t:g}→{s:g}"] = rms(student(x, tt, ss).detach(), exact_average_velocity(teacher, x, tt, ss, ode_steps))
    return out


def diagnose_run(run_dir: str, n: int, seed: int, ode_steps: int) -> dict:
    """Every checkpoint of one run: target errors (online weights), student errors (EMA), shared point."""
    import gin

    from decm.checkpoint import candidates, is_valid, step_of
    from decm.eval.evaluate import load_student
    from decm.job import parse

    parse([os.path.join(run_dir, "config.gin")], [])
    with gin.config_scope("distill"):
        objective = gin.query_parameter("distill/train.objective").scoped_configurable_fn()
    dataset = gin.query_parameter("train.dataset").scoped_configurable_fn()
    backbone = gin.query_parameter("train.backbone").scoped_configurable_fn
    teacher = dataset.analytic_teacher()
    with open(os.path.join(run_dir, "metrics.json")) as f:
        rows = json.load(f)["rows"]
    sw2 = {str(r["nfe"]): float(r["sw2"]) for r in rows if r["model"] == "student" and r["sampler"] == "chain"}
    checkpoints = []
    for path in sorted(candidates(os.path.join(run_dir, "checkpoints")), key=step_of):
        if not is_valid(path, load=False):
            continue
        step = step_of(path)
        online, _ = load_student(run_dir, backbone, dataset, use_ema=False, step=step)
        ema, _ = load_student(run_dir, backbone, dataset, use_ema=True, step=step)
        with torch.no_grad():
            errors = student_errors(ema, teacher, n, seed, ode_steps)
        checkpoints.append({"step": step, "targets": term_target_errors(objective, online, teacher, step, n, seed,
                                                                        ode_steps),
                            "student": errors, "shared": shared_point(objective, online, teacher, n, seed, ode_steps)})
    if checkpoints:
        checkpoints[-1]["by_t"] = target_errors_by_t(objective, online, teacher, n, seed, ode_steps)
    return {"run_dir": run_dir, "sw2": sw2, "checkpoints": checkpoints}


def last_checkpoint_by_t(run_dir: str, n: int, seed: int, ode_steps: int) -> dict:
    """target_errors_by_t with the run's newest online weights."""
    import gin

    from decm.eval.evaluate import load_student
    from decm.job import parse

    parse([os.path.join(run_dir, "config.gin")], [])
    with gin.config_scope("distill"):
        objective = gin.query_parameter("distill/train.objective").scoped_configurable_fn()
    dataset = gin.query_parameter("train.dataset").scoped_configurable_fn()
    online, _ = load_student(run_dir, gin.query_parameter("train.backbone").scoped_configurable_fn, dataset,
                             use_ema=False)
    return target_errors_by_t(objective, online, dataset.analytic_teacher(), n, seed, ode_steps)


def cached_diagnosis(run_dir: str, n: int, ode_steps: int, seed: int = 7) -> dict:
    """diagnose_run, stored in the run directory (keyed by its settings) and reused by later calls."""
    path = os.path.join(run_dir, "n2n_diagnostic.json")
    key = {"n": n, "ode_steps": ode_steps, "seed": seed}
    if os.path.exists(path):
        with open(path) as f:
            cached = json.load(f)
        if cached.get("key") == key:
            result = cached["result"]
            if result["checkpoints"] and "by_t" not in result["checkpoints"][-1]:  # added later: fill it in
                result["checkpoints"][-1]["by_t"] = last_checkpoint_by_t(run_dir, n, seed, ode_steps)
                with open(path + ".tmp", "w") as f:
                    json.dump({"key": key, "result": result}, f)
                os.replace(path + ".tmp", path)
            return result
    print(f"[n2n_diagnostic] diagnosing {run_dir}", file=sys.stderr, flush=True)
    result = diagnose_run(run_dir, n, seed, ode_steps)
    with open(path + ".tmp", "w") as f:
        json.dump({"key": key, "result": result}, f)
    os.replace(path + ".tmp", path)
    return result


def seed_values(results: dict, variants, seeds) -> dict:
    """{variant: {column: {seed: value}}} from the last checkpoint of each seed's run."""
    out = {}
    for v in variants:
        cols = out.setdefault(v, {})
        for seed in seeds:
            res = results.get(f"{v}/seed{seed}")
            if not res or not res["checkpoints"]:
                continue
            last = res["checkpoints"][-1]
            vals = {f"SW2 NFE {k}": res["sw2"].get(k) for k in ("1", "2", "4")}
            vals.update({f"F err {k}": e for k, e in last["student"].items() if k in ("0→1", "0→0.5", "0.5→1", "0→0.25", "0.75→1")})
            vals.update({f"target err {k}": e for k, e in last["targets"].items()})
            for name, bins in last.get("by_t", {}).items():
                for b, e in bins.items():
                    vals[f"{name.split()[0]} target err t∈{b}"] = e
            vals["(0,1) cm vs n2n target"] = last["shared"]["cm_vs_n2n"]
            vals["(0,1) cm target err"] = last["shared"]["cm_vs_exact"]
            vals["(0,1) n2n target err"] = last["shared"]["n2n_vs_exact"]
            for k, val in vals.items():
                if val is not None:
                    cols.setdefault(k, {})[seed] = float(val)
    return out


def summarise(results: dict, variants, seeds) -> dict:
    """{variant: {column: (mean, sd, n)}} from the last checkpoint of each seed's run."""
    table = {}
    for v, cols in seed_values(results, variants, seeds).items():
        table[v] = {k: (float(np.mean(list(x.values()))), float(np.std(list(x.values()), ddof=1)) if len(x) > 1 else 0.0,
                        len(x)) for k, x in cols.items()}
    return table


def paired_vs(results: dict, variants, seeds, reference: str = "decm") -> dict:
    """{variant: {column: paired statistics of variant − reference}} over the seeds both have, for the headline
    columns (decm.eval.paired: mean, 95% t interval, verdict)."""
    from decm.eval.paired import paired_difference

    values = seed_values(results, variants, seeds)
    ref = values.get(reference, {})
    return {v: {c: paired_difference(cols[c], ref[c]) for c in COMPACT if c in cols and c in ref}
            for v, cols in values.items() if v != reference}


def write_outputs(table: dict, results: dict, out: str, meta: dict, paired: dict | None = None,
                  reference: str = "decm") -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out, exist_ok=True)
    columns = []
    for row in table.values():
        columns += [c for c in row if c not in columns]
    fmt = lambda v: "—" if v is None else (f"{v[0]:.3f} ± {v[1]:.3f}" if v[2] > 1 else f"{v[0]:.3f}")  # noqa: E731
    compact = [c for c in COMPACT if c in columns]
    md = [f"# N2N diagnostic — 2-D mixture, exact teacher, {meta['steps']} steps, seeds {meta['seeds']}", "",
          f"Training time summed over the runs' own clocks: {meta.get('train_seconds_total', 0):.0f} s "
          f"(this summary written by a {meta['threads']}-thread process, torch {meta['torch']}).", "",
          "RMS errors against the exact flow map F* (lower is better); mean ± sample sd over seeds.", "",
          "## Headline", "", "| variant | " + " | ".join(compact) + " |", "|" + "---|" * (len(compact) + 1)]
    md += [f"| {v} | " + " | ".join(fmt(row.get(c)) for c in compact) + " |" for v, row in table.items()]
    if paired:
        from decm.eval.paired import format_difference

        md += ["", f"## Paired differences vs {reference} (same seed)", "",
               f"Per seed, variant − {reference}, then the mean and its 95% Student-t interval [low, high]; verdict from "
               "the interval: better (wholly below 0, lower error), worse (wholly above 0), not separated (contains 0).",
               "", "| variant | " + " | ".join(compact) + " |", "|" + "---|" * (len(compact) + 1)]
        md += [f"| {v} | " + " | ".join(format_difference(row[c], 3) if c in row else "—" for c in compact) + " |"
               for v, row in paired.items()]
    md += ["", "## All columns", "", "| variant | " + " | ".join(columns) + " |", "|" + "---|" * (len(columns) + 1)]
    with open(os.path.join(out, "table.csv"), "w") as f:
        f.write(",".join(["variant"] + [f"{c} {k}" for c in columns for k in ("mean", "sd")]) + "\n")
        for v, row in table.items():
            md.append(f"| {v} | " + " | ".join(fmt(row.get(c)) for c in columns) + " |")
            f.write(",".join([v] + [x for c in columns for x in
                                    ((f"{row[c][0]:.6g}", f"{row[c][1]:.6g}") if c in row else ("", ""))]) + "\n")
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"meta": meta, "summary": {v: {c: list(x) for c, x in r.items()} for v, r in table.items()},
                   "paired": {"reference": reference, "rows": paired or {}}, "runs": results}, f, indent=2)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for key, res in sorted(results.items()):
        variant, seed = key.split("/")
        if variant not in ("fm_cd", "decm") or not res["checkpoints"]:
            continue
        steps = [c["step"] for c in res["checkpoints"]]
        style = {"fm_cd": "-", "decm": "--"}[variant]
        axes[0].plot(steps, [c["student"]["0→1"] for c in res["checkpoints"]], style, marker="o",
                     label=f"{variant} {seed}")
        if "n2n" in res["checkpoints"][0]["targets"]:
            axes[1].plot(steps, [c["targets"]["n2n"] for c in res["checkpoints"]], style, marker="o",
                         label=f"{variant} {seed}")
        axes[1].plot(steps, [c["targets"]["cm"] for c in res["checkpoints"]], ":", marker="x",
                     label=f"{variant} {seed} (cm)")
    axes[0].set(xlabel="training step", ylabel="RMS(F_θ(z,0,1) − F*(z,0,1)) (lower is better)",
                title="1-step student error (EMA)")
    axes[1].set(xlabel="training step", ylabel="RMS(target − F*) (lower is better)",
                title="target error: n2n (solid/dashed), cm (dotted)")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "trace.png"), dpi=110)
    plt.close(fig)
    return "\n".join(md)


def main(argv=None) -> int:
    from decm import cli

    p = cli.parser("python analysis/n2n_diagnostic.py", __doc__)
    p.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, help="variants to train and diagnose")
    p.add_argument("--seeds", type=int, default=3, help="seeds per variant (distill/train.seed = 0 … N−1)")
    p.add_argument("--steps", type=int, default=3000, help="distillation steps of every run")
    p.add_argument("--ckpt-every", type=int, default=500, help="checkpoint period in steps (diagnosed points)")
    p.add_argument("--n", type=int, default=1024, help="held-out noise samples per diagnostic")
    p.add_argument("--ode-steps", type=int, default=200, help="RK4 steps per unit time for the exact flow map")
    p.add_argument("--bind", action="append", default=[], help="extra gin binding for every run (repeatable)")
    p.add_argument("--runs-root", default="runs/ablations", help="where the runs live")
    p.add_argument("--out", default=None, help="output dir (default: a fresh runs/analysis/n2n_diagnostic-<time>)")
    p.add_argument("--reference", default="decm", help="variant the paired differences are taken against")
    p.add_argument("--from-results", default=None, metavar="RESULTS_JSON",
                   help="train and diagnose nothing: rewrite the tables from a results.json this script wrote")
    args = p.parse_args(argv)
    if args.from_results:
        try:
            with open(args.from_results) as f:
                saved = json.load(f)
            meta, results = saved["meta"], saved["runs"]
        except (OSError, ValueError, KeyError) as e:
            print(f"n2n_diagnostic: error: --from-results {args.from_results}: {e}", file=sys.stderr)
            return 2
        variants = list(meta["variants"])
        if args.reference not in variants:
            print(f"n2n_diagnostic: error: --reference {args.reference} is not among {variants}", file=sys.stderr)
            return 2
        table = summarise(results, variants, meta["seeds"])
        out = args.out or os.path.join("runs", "analysis", time.strftime("n2n_diagnostic-%Y%m%d-%H%M%S"))
        print(write_outputs(table, results, out, meta, paired_vs(results, variants, meta["seeds"], args.reference),
                            args.reference))
        return 0
    bad = [v for v in args.variants if v not in VARIANTS]
    if args.reference not in args.variants:
        bad.append(f"--reference {args.reference}")
    if bad or args.seeds < 1 or args.steps < 1:
        print(f"n2n_diagnostic: error: unknown variants {bad} or --seeds/--steps < 1 (variants: "
              f"{' '.join(VARIANTS)})", file=sys.stderr)
        return 2
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from ablation_table import row_spec, run_all

    from decm.job import ConfigError

    t0 = time.time()
    seeds = list(range(args.seeds))
    common = tuple(args.bind) + (f"distill/train.ckpt_every_steps = {args.ckpt_every}", "distill/train.keep_last = 0",
                                 "evaluate.student_nfe = (1, 2, 4)", "evaluate.student_samplers = ('chain',)")
    try:
        specs = {f"{v}/seed{s}": row_spec(BENCHMARK, VARIANTS[v][0], s, args.steps, args.runs_root,
                                          VARIANTS[v][1] + common, name=v)
                 for v in args.variants for s in seeds}
        run_all(list(specs.values()), "local", None)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"n2n_diagnostic: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    results = {key: cached_diagnosis(spec.run_dir, args.n, args.ode_steps) for key, spec in specs.items()}
    for key, spec in specs.items():  # the runs' own stage clocks (seconds)
        with open(os.path.join(spec.run_dir, "summary.json")) as f:
            summary = json.load(f)
        results[key]["train_seconds"] = sum(v["seconds"] for v in summary.values() if isinstance(v, dict) and "seconds" in v)
    table = summarise(results, args.variants, seeds)
    out = args.out or os.path.join("runs", "analysis", time.strftime("n2n_diagnostic-%Y%m%d-%H%M%S"))
    meta = {"steps": args.steps, "seeds": seeds, "variants": {v: list(VARIANTS[v][1]) for v in args.variants},
            "threads": torch.get_num_threads(), "torch": torch.__version__, "seconds": time.time() - t0,
            "benchmark": "gin/toy2d_exact_teacher.gin",
            "train_seconds_total": sum(r.get("train_seconds", 0.0) for r in results.values())}
    print(write_outputs(table, results, out, meta, paired_vs(results, args.variants, seeds, args.reference),
                        args.reference))
    print(f"\n→ {out}/table.md, table.csv, results.json, trace.png")
    return 0


if __name__ == "__main__":
    from decm import cli

    sys.exit(cli.main_exit("n2n_diagnostic", main))
