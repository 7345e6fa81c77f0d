"""Why a one-step result depends on the training seed: spread across seeds vs fluctuation within a run.

    python analysis/seed_variance.py [--n2n-results analysis/results/n2n_diagnostic/results.json]
        [--runs-root runs/ablations --benchmark toy2d_uneven --rows decm fm_cd] [--last 3] [--out DIR]

Two sources, each optional:

- an N2N-diagnostic results.json (analysis/n2n_diagnostic.py; exact teacher, checkpoints every 500 steps):
  per variant, the RMS error of the one-step map F_θ(z, 0, 1) against the exact flow map at every
  checkpoint and each seed's final SW2 at NFE 1. It reports the spread across seeds at the last checkpoint
  (sample sd) next to the fluctuation *within* each run over its last `--last` checkpoints (sample sd over
  those checkpoints, averaged over seeds), and the largest jump between consecutive late checkpoints. A
  within-run fluctuation as large as the across-seed spread means the final value is mostly where an
  oscillating one-step map happens to be when training stops, not a property of the seed.
- finished ablation runs (analysis/ablation_table.py) of `--rows` under `<runs-root>/<benchmark>/`: each
  run's training statistics from stats.jsonl (logged every few steps): the per-term losses averaged over the
  last 20% of training, the gradient norm's median and maximum (before clipping), the number of spikes
  (> 10× the run's median) and the step of the last one, next to the run's final metric at NFE 1 (SW2 and
  energy distance), per seed.

With `--checkpoints`, every saved checkpoint of those runs (EMA weights) is evaluated at NFE 1 (chain) with
the run's own evaluation settings (`python -m decm.evaluate RUN --step K`, same noise and reference as the
run's final evaluation; cached under `--evals`, so a rerun resumes): per row, the one-step metric at
each checkpoint for every seed, its spread across seeds at each checkpoint (when the seeds part ways) and
the fluctuation within each run over the second half of training, next to the across-seed spread at the
end. A within-run fluctuation as large as the across-seed spread means the seed decides little: the final
value is where a moving one-step map happens to be when training stops. Also per row, the correlation over
seeds of the final NFE-1 metric with the late N2N loss and with the number of gradient spikes.

Writes `<out>/table.md` and `results.json`. Sample sds use ddof = 1. Lower is better for every error.
"""

from __future__ import annotations

import glob
import json
import os
import sys
import time

import numpy as np

SPIKE_FACTOR = 10.0   # a gradient-norm spike: above this multiple of the run's median gradient norm
LATE_FRACTION = 0.2   # "late training": the last 20% of the logged steps


def sd(values) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def checkpoint_spread(results: dict, last: int, reference: str = "decm") -> dict:
    """{variant: {...}} from an N2N-diagnostic results.json's runs: across-seed sd of the final one-step
    error and SW2 at NFE 1 vs the within-run sd over the last `last` checkpoints, and each variant's within-run
    sd minus the reference's, paired by seed (decm.eval.paired)."""
    by_variant = {}
    for key, res in results.items():
        variant, seed = key.split("/")
        if res.get("checkpoints"):
            by_variant.setdefault(variant, {})[seed] = res
    out = {}
    for variant, seeds in by_variant.items():
        traces = {s: [c["student"]["0→1"] for c in r["checkpoints"]] for s, r in sorted(seeds.items())}
        steps = [c["step"] for c in next(iter(seeds.values()))["checkpoints"]]
        final = [t[-1] for t in traces.values()]
        within = [sd(t[-last:]) for t in traces.values()]
        jumps = [max(abs(b - a) for a, b in zip(t[-last:], t[-last + 1:])) if last > 1 else 0.0 for t in traces.values()]
        sw2 = [float(r["sw2"]["1"]) for r in seeds.values() if r.get("sw2", {}).get("1") is not None]
        out[variant] = {"seeds": list(traces), "steps": steps, "traces": traces,
                        "final_err_mean": float(np.mean(final)), "final_err_sd_across_seeds": sd(final),
                        "within_run_sd_mean": float(np.mean(within)), "within_run_sd": dict(zip(traces, within)),
                        "largest_late_jump_mean": float(np.mean(jumps)),
                        "sw2_1_mean": float(np.mean(sw2)) if sw2 else None, "sw2_1_sd": sd(sw2) if sw2 else None}
    if reference in out:  # the within-run fluctuation of each variant vs the reference's, seed by seed
        from decm.eval.paired import paired_difference

        for v, s in out.items():
            if v != reference:
                s["within_run_sd_vs_reference"] = paired_difference(s["within_run_sd"], out[reference]["within_run_sd"])
    return out


def run_statistics(run_dir: str) -> dict | None:
    """Training statistics of one finished run (None without metrics.json or stats.jsonl)."""
    stats_path, metrics_path = os.path.join(run_dir, "stats.jsonl"), os.path.join(run_dir, "metrics.json")
    if not (os.path.exists(stats_path) and os.path.exists(metrics_path)):
        return None
    with open(stats_path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    with open(metrics_path) as f:
        metrics = json.load(f)
    if not records:
        return None
    late_from = records[-1]["step"] * (1 - LATE_FRACTION)
    late = [r for r in records if r["step"] > late_from]
    grads = np.array([r["grad_norm"] for r in records if "grad_norm" in r], dtype=np.float64)
    median = float(np.median(grads)) if grads.size else None
    out = {"steps": records[-1]["step"], "grad_norm_median": median,
           "grad_norm_max": float(grads.max()) if grads.size else None,
           "grad_spikes": int((grads > SPIKE_FACTOR * median).sum()) if grads.size else None,
           "last_spike_step": max((r["step"] for r in records if r.get("grad_norm", 0.0) > SPIKE_FACTOR * median),
                                  default=None) if grads.size else None,
           "late_grad_norm_median": float(np.median([r["grad_norm"] for r in late if "grad_norm" in r])) if late else None}
    for term in sorted({k for r in records for k in r if k.startswith("loss/")}):
        vals = [r[term] for r in late if term in r]
        out[f"late {term}"] = float(np.mean(vals)) if vals else None
    for row in metrics.get("rows", []):
        if row.get("model") == "student" and row.get("sampler") == "chain" and row.get("nfe") == 1:
            out.update({f"NFE 1 {k}": float(row[k]) for k in ("sw2", "energy") if k in row})
    return out


def ablation_runs(runs_root: str, benchmark: str, rows) -> dict:
    """{row: {seed: statistics}} of the finished runs `<runs_root>/<benchmark>/<row>-seed<k>-<hash>`."""
    out = {}
    for row, seeds in run_dirs(runs_root, benchmark, rows).items():
        for seed, run_dir in seeds.items():
            st = run_statistics(run_dir)
            if st is not None:
                out.setdefault(row, {})[seed] = st
    return out


def checkpoint_metrics(run_dir: str, evals_dir: str) -> dict:
    """{step: {"energy": …, "sw2": …}} of the EMA student at NFE 1 (chain) for every valid checkpoint of a run,
    each from `python -m decm.evaluate RUN --step K` with the run's own evaluation settings (cached in
    `evals_dir/step<K>/metrics.json`)."""
    from decm import checkpoint
    from decm.evaluate import main as evaluate_main

    out = {}
    steps = sorted(checkpoint.step_of(p) for p in checkpoint.candidates(os.path.join(run_dir, "checkpoints"))
                   if checkpoint.is_valid(p, load=False))
    for step in steps:
        cell = os.path.join(evals_dir, f"step{step}")
        path = os.path.join(cell, "metrics.json")
        if not os.path.exists(path):
            code = evaluate_main([run_dir, "--step", str(step), "--nfe", "1", "--sampler", "chain", "--teacher-nfe",
                                  "--no-wandb", "--out", cell])
            if code != 0:
                raise RuntimeError(f"decm.evaluate {run_dir} --step {step} exited with {code}")
        with open(path) as f:
            rows = json.load(f).get("rows", [])
        row = next(r for r in rows if r.get("model") == "student" and r.get("nfe") == 1)
        out[step] = {k: float(row[k]) for k in ("energy", "sw2") if k in row}
    return out


def run_dirs(runs_root: str, benchmark: str, rows) -> dict:
    """{row: {seed: run_dir}} of the finished runs (with metrics.json)."""
    out = {}
    for row in rows:
        for run_dir in sorted(glob.glob(os.path.join(runs_root, benchmark, f"{row}-seed*-*"))):
            seed = os.path.basename(run_dir)[len(row) + len("-seed"):].split("-")[0]
            if seed.isdigit() and os.path.exists(os.path.join(run_dir, "metrics.json")):
                out.setdefault(row, {})[int(seed)] = run_dir
    return out


def trajectories(dirs: dict, evals_root: str, metric: str, stats: dict) -> dict:
    """Per row: each seed's NFE-1 `metric` at every checkpoint, the across-seed sd at each checkpoint, the
    within-run sd over the checkpoints of the second half of training (mean over seeds), and the correlation
    over seeds of the final metric with the late N2N loss and the gradient-spike count."""
    out = {}
    for row, seeds in dirs.items():
        traces = {}
        for seed, run_dir in sorted(seeds.items()):
            m = checkpoint_metrics(run_dir, os.path.join(evals_root, os.path.basename(run_dir)))
            traces[seed] = {step: v[metric] for step, v in m.items() if metric in v}
        steps = sorted(set.intersection(*(set(t) for t in traces.values()))) if traces else []
        if not steps:
            continue
        late = [s for s in steps if s > steps[-1] / 2] or steps[-1:]
        across = {step: sd([t[step] for t in traces.values()]) for step in steps}
        within = [sd([t[s] for s in late]) for t in traces.values()]
        entry = {"steps": steps, "late_steps": late, "traces": {str(k): v for k, v in traces.items()},
                 "mean": {step: float(np.mean([t[step] for t in traces.values()])) for step in steps},
                 "sd_across_seeds": across, "within_run_sd_late_mean": float(np.mean(within)),
                 "seeds": sorted(traces)}
        finals = {seed: t[steps[-1]] for seed, t in traces.items()}
        for key in ("late loss/n2n", "grad_spikes"):
            pairs = [(finals[s], stats.get(row, {}).get(s, {}).get(key)) for s in finals]
            pairs = [(a, b) for a, b in pairs if b is not None]
            if len(pairs) >= 3 and np.std([b for _, b in pairs]) > 0 and np.std([a for a, _ in pairs]) > 0:
                entry[f"corr final vs {key}"] = float(np.corrcoef(*zip(*pairs))[0, 1])
                entry[f"corr n ({key})"] = len(pairs)
        out[row] = entry
    return out


def trajectory_markdown(traj: dict, metric: str) -> list[str]:
    if not traj:
        return []
    steps = sorted({s for e in traj.values() for s in e["steps"]})
    md = [f"## NFE-1 {metric} over training, per seed (EMA student at each checkpoint)", "",
          "Across-seed sd at each checkpoint (when the seeds part ways) and the within-run sd over the second "
          "half of training (mean over seeds); corr: Pearson r over seeds of the final value with the late N2N "
          "loss / the gradient-spike count.", "",
          "| row | seeds | " + " | ".join(f"mean @ {s}" for s in steps) + " | " + " | ".join(
              f"sd across @ {s}" for s in steps) + " | within-run sd (late) | corr with late N2N loss | "
          "corr with spikes |", "|---|---|" + "---|" * (2 * len(steps) + 3)]
    for row, e in traj.items():
        cells = [f"{e['mean'][s]:.4f}" if s in e["mean"] else "—" for s in steps]
        cells += [f"{e['sd_across_seeds'][s]:.4f}" if s in e["sd_across_seeds"] else "—" for s in steps]
        corr = [f"{e[k]:+.2f} (n = {e[n]})" if k in e else "—" for k, n in
                (("corr final vs late loss/n2n", "corr n (late loss/n2n)"), ("corr final vs grad_spikes", "corr n (grad_spikes)"))]
        md.append(f"| {row} | {len(e['seeds'])} | " + " | ".join(cells) + f" | {e['within_run_sd_late_mean']:.4f} | "
                  + " | ".join(corr) + " |")
    md += ["", "Per-seed traces (step: value):", ""]
    for row, e in traj.items():
        for seed, t in e["traces"].items():
            md.append(f"- {row} seed {seed}: " + ", ".join(f"{s}: {v:.4f}" for s, v in sorted(t.items())))
    md.append("")
    return md


def markdown(spread: dict, runs: dict, meta: dict) -> str:
    md = ["# Seed variance of the one-step result", ""]
    if spread:
        md += [f"## One-step map error over training ({meta['n2n_results']})", "",
               f"RMS(F_θ(z,0,1) − F*(z,0,1)) of the EMA student at each checkpoint; across-seed sd at the last "
               f"checkpoint vs the within-run sd over the last {meta['last']} checkpoints (mean over seeds).", "",
               "| variant | final error (mean) | sd across seeds | within-run sd (late) | largest late jump | "
               "SW2 NFE 1 mean ± sd | within-run sd − decm's, paired [95% t] |", "|---|---|---|---|---|---|---|"]
        from decm.eval.paired import format_difference

        for v, s in spread.items():
            sw = "—" if s["sw2_1_mean"] is None else f"{s['sw2_1_mean']:.3f} ± {s['sw2_1_sd']:.3f}"
            vs = format_difference(s["within_run_sd_vs_reference"], 3) if "within_run_sd_vs_reference" in s else "—"
            md.append(f"| {v} | {s['final_err_mean']:.3f} | {s['final_err_sd_across_seeds']:.3f} | "
                      f"{s['within_run_sd_mean']:.3f} | {s['largest_late_jump_mean']:.3f} | {sw} | {vs} |")
        md += ["", "Per-seed traces (step: error):", ""]
        for v, s in spread.items():
            for seed, t in s["traces"].items():
                md.append(f"- {v} {seed}: " + ", ".join(f"{st}: {e:.3f}" for st, e in zip(s["steps"], t)))
        md.append("")
    if runs:
        cols = []
        for seeds in runs.values():
            for st in seeds.values():
                cols += [c for c in st if c not in cols and c != "steps"]
        md += [f"## Training statistics of the ablation runs ({meta['benchmark']})", "",
               f"Late: the last {LATE_FRACTION:.0%} of the logged steps; spikes: gradient norm > {SPIKE_FACTOR:g}× the "
               "run's median.", "", "| row | seed | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
        for row, seeds in runs.items():
            for seed, st in sorted(seeds.items()):
                md.append(f"| {row} | {seed} | " + " | ".join("—" if st.get(c) is None else f"{st[c]:.4g}" for c in cols)
                          + " |")
            for agg, fn in (("mean", np.mean), ("sd", sd)):
                vals = [[st[c] for st in seeds.values() if st.get(c) is not None] for c in cols]
                md.append(f"| {row} | {agg} | " + " | ".join(f"{fn(v):.4g}" if v else "—" for v in vals) + " |")
        md.append("")
    return "\n".join(md)


def main(argv=None) -> int:
    from decm import cli

    p = cli.parser("python analysis/seed_variance.py", __doc__)
    p.add_argument("--n2n-results", default="analysis/results/n2n_diagnostic/results.json",
                   help="an N2N-diagnostic results.json ('' to skip)")
    p.add_argument("--last", type=int, default=3, help="late checkpoints for the within-run fluctuation (≥ 2)")
    p.add_argument("--runs-root", default="runs/ablations", help="where the ablation runs live")
    p.add_argument("--benchmark", default=None, help="ablation benchmark whose runs to read (e.g. toy2d_uneven)")
    p.add_argument("--rows", nargs="+", default=["decm", "fm_cd"], help="ablation rows to read")
    p.add_argument("--checkpoints", action="store_true",
                   help="also evaluate every checkpoint of the runs at NFE 1 (decm.evaluate --step; cached in <out>/evals)")
    p.add_argument("--metric", default="energy", choices=["energy", "sw2"], help="metric of the checkpoint trajectories")
    p.add_argument("--evals", default="runs/analysis/checkpoint-evals",
                   help="cache of the checkpoint evaluations (one folder per run; a rerun reuses them)")
    p.add_argument("--out", default=None, help="output dir (default: a fresh runs/analysis/seed_variance-<time>)")
    args = p.parse_args(argv)
    if args.last < 2 or not (args.n2n_results or args.benchmark):
        print("seed_variance: error: --last must be ≥ 2 and at least one of --n2n-results, --benchmark given",
              file=sys.stderr)
        return 2
    spread = {}
    if args.n2n_results:
        try:
            with open(args.n2n_results) as f:
                spread = checkpoint_spread(json.load(f)["runs"], args.last)
        except (OSError, ValueError, KeyError) as e:
            print(f"seed_variance: error: --n2n-results {args.n2n_results}: {e}", file=sys.stderr)
            return 2
    runs = ablation_runs(args.runs_root, args.benchmark, args.rows) if args.benchmark else {}
    if args.benchmark and not runs:
        print(f"seed_variance: error: no finished runs of {args.rows} under {args.runs_root}/{args.benchmark}",
              file=sys.stderr)
        return 2
    meta = {"n2n_results": args.n2n_results, "last": args.last, "benchmark": args.benchmark, "rows": args.rows,
            "spike_factor": SPIKE_FACTOR, "late_fraction": LATE_FRACTION}
    out = args.out or os.path.join("runs", "analysis", time.strftime("seed_variance-%Y%m%d-%H%M%S"))
    os.makedirs(out, exist_ok=True)
    traj = {}
    if args.checkpoints and args.benchmark:
        traj = trajectories(run_dirs(args.runs_root, args.benchmark, args.rows),
                            os.path.join(args.evals, args.benchmark), args.metric, runs)
    meta["checkpoint_metric"] = args.metric if traj else None
    md = markdown(spread, runs, meta) + "\n" + "\n".join(trajectory_markdown(traj, args.metric))
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(md + "\n")
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"meta": meta, "checkpoint_spread": spread,
                   "runs": {r: {str(k): v for k, v in s.items()} for r, s in runs.items()},
                   "trajectories": traj}, f, indent=2)
    print(md)
    print(f"\n→ {out}/table.md, results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
