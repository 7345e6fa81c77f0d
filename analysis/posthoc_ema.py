"""Post-hoc EMA on the digits benchmark: σ_rel chosen after training vs the fixed-decay EMA.

    python analysis/posthoc_ema.py [--seeds 0 1 2] [--sigma-rels 0.05 0.1 0.2] [--out DIR]
                                   [--teacher-steps N --distill-steps M]   # a shorter budget

For every seed k, distils the quickstart (gin/quickstart.gin: the cached digits teacher, DE-CM, its steps
and fixed-decay EMA) with `distill/train.seed = k` and post-hoc EMA on (profiles σ_rel 0.05 and 0.2,
a snapshot every `--every` steps; decm.phema), reconstructs each `--sigma-rels` at the last step
(`python -m decm.phema`), and evaluates the raw weights, the fixed-decay EMA and every reconstruction
with `decm.evaluate` (FID with the digits extractor against all 1,797 digits, the flow-map chain at
NFE 1/2/4, the same noise everywhere). The teacher is shared by all seeds. `--teacher-steps` and
`--distill-steps` shorten the quickstart's budget (the N2N decay is scaled with the distillation steps,
a checkpoint every 50 steps); the run directories are named by the budget.

Resumable: a finished run is reused, an unfinished one resumes (decm.launch), a finished evaluation
(its metrics.json) is read back; `--collect` only reads what has finished (no training, no evaluation). Results are written after every evaluation, so a partial run leaves
a table of what has finished. Writes `<out>/results.json` (every FID, the reconstruction coefficients
and the σ_rel equivalent of the fixed-decay EMA), `<out>/table.md` (mean ± sd over seeds and per seed).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

TRACKED = (0.05, 0.2)  # σ_rel of the profiles tracked during training (FACM's pair)
NFES = (1, 2, 4)


def run(cmd: list[str]) -> None:
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


def budget_binds(teacher_steps: int | None, distill_steps: int | None) -> list[str]:
    """Bindings of a shortened budget (none: the quickstart's own)."""
    out = []
    if teacher_steps:
        out.append(f"teacher/train.steps = {teacher_steps}")
    if distill_steps:
        out += [f"distill/train.steps = {distill_steps}", "distill/train.ckpt_every_steps = 50",
                f"selectors.noise_to_noisy.decay_steps = {round(distill_steps * 600 / 800)}"]  # quickstart: 600 of 800
    return out


def train_run(run_dir: str, seed: int, every: int, budget: list[str]) -> None:
    if os.path.exists(os.path.join(run_dir, "summary.json")):
        return
    binds = ["experiment.stages = ('teacher', 'distill')", f"distill/train.seed = {seed}",
             f"distill/train.phema_sigma_rels = {TRACKED}", f"distill/train.phema_every_steps = {every}",
             "train.progress = False"] + budget
    cmd = [sys.executable, "-m", "decm.launch", "--gin", "gin/quickstart.gin", "--run-dir", run_dir]
    for b in binds:
        cmd += ["--bind", b]
    run(cmd)


def fids(run_dir: str, out: str, extra: list[str], collect: bool = False) -> dict | None:
    path = os.path.join(out, "metrics.json")
    if not os.path.exists(path):
        if collect:
            return None
        run([sys.executable, "-m", "decm.evaluate", run_dir, "--nfe", *map(str, NFES), "--teacher-nfe",
             "--metrics", "fid", "--n", "1797", "--no-wandb", "--out", out, *extra])
    with open(path) as f:
        rows = json.load(f)["rows"]
    return {str(r["nfe"]): r["fid"] for r in rows}


def ema_sigma_rel(decay: float, steps: int) -> float:
    """σ_rel of the loop's fixed-decay EMA at `steps` (warm-up min(decay, (1+k)/(10+k)) included): the
    standard deviation of its weight over the training time, divided by the time."""
    w = np.zeros(steps + 1)  # weight of the weights after step k (index k; 0 = initialisation)
    w[0] = 1.0
    for k in range(steps):
        d = min(decay, (1 + k) / (10 + k))
        w *= d
        w[k + 1] = 1 - d
    t = np.arange(steps + 1, dtype=np.float64)
    mean = np.sum(w * t) / np.sum(w)
    return float(np.sqrt(np.sum(w * (t - mean) ** 2) / np.sum(w)) / steps)


def table(results: dict, sigma_rels) -> str:
    models = ["raw", "ema"] + [f"phema-{s:.3f}" for s in sigma_rels]
    names = {"raw": "raw weights", "ema": f"fixed-decay EMA ({results['ema_decay']}/step, σ_rel ≈ "
             f"{results['ema_sigma_rel']:.3f})"}
    seeds = sorted(results["fid"], key=int)
    lines = [f"FID (digits extractor, 1,797 samples vs all digits; chain sampler) after {results['steps']} DE-CM "
             f"steps from a {results['teacher_steps']}-step teacher, {len(seeds)} seed(s) {', '.join(seeds)}: "
             "mean ± sd (per seed).", "",
             "| weights | " + " | ".join(f"NFE {k}" for k in NFES) + " |", "|---|" + "---|" * len(NFES)]
    for m in models:
        cells = []
        for k in NFES:
            vals = [results["fid"][s][m][str(k)] for s in seeds if m in results["fid"][s]]
            if not vals:
                cells.append("–")
                continue
            sd = f" ± {np.std(vals, ddof=1):.2f}" if len(vals) > 1 else ""
            cells.append(f"{np.mean(vals):.2f}{sd} ({', '.join(f'{v:.2f}' for v in vals)})")
        label = names[m] if m in names else f"post-hoc EMA σ_rel {m.split('-')[1]} (reconstructed)"
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    k_warm = (10 * results["ema_decay"] - 1) / (1 - results["ema_decay"])  # (1+k)/(10+k) reaches the decay here
    lines += ["", f"σ_rel of the fixed-decay EMA: the standard deviation of its weights over the training time, divided by "
              f"the time. Its warm-up min(decay, (1+k)/(10+k)) stays below {results['ema_decay']} until step {k_warm:.0f}, "
              "so in a shorter run it is itself a power-function-like EMA (1 − 9/(k+10) ≈ (1 − 1/k)^9, γ ≈ 8)."]
    return "\n".join(lines) + "\n"


def write(out: str, results: dict, sigma_rels) -> None:
    os.makedirs(out, exist_ok=True)
    for name, text in (("results.json", json.dumps(results, indent=2)), ("table.md", table(results, sigma_rels))):
        tmp = os.path.join(out, name + ".tmp")
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, os.path.join(out, name))


def main(argv=None) -> int:
    sys.path.insert(0, ROOT)
    from decm import cli

    p = cli.parser("python analysis/posthoc_ema.py", __doc__)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds")
    p.add_argument("--sigma-rels", type=float, nargs="+", default=[0.05, 0.1, 0.2], help="σ_rel values reconstructed after training")
    p.add_argument("--every", type=int, default=20, help="post-hoc EMA snapshot period (steps)")
    p.add_argument("--collect", action="store_true", help="tables from finished runs and evaluations only")
    p.add_argument("--teacher-steps", type=int, default=None, help="teacher steps (default: the quickstart's)")
    p.add_argument("--distill-steps", type=int, default=None, help="distillation steps (default: the quickstart's)")
    p.add_argument("--runs-root", default=os.path.join(ROOT, "runs", "analysis", "posthoc_ema-digits"),
                   help="where the runs are trained")
    p.add_argument("--out", default=os.path.join(ROOT, "analysis", "results", "posthoc_ema-digits"),
                   help="where the tables are written")
    args = p.parse_args(argv)
    import gin

    from decm import phema
    from decm.job import parse

    budget = budget_binds(args.teacher_steps, args.distill_steps)
    parse([os.path.join(ROOT, "gin/quickstart.gin")], budget)
    decay, steps = gin.query_parameter("distill/train.ema_decay"), gin.query_parameter("distill/train.steps")
    teacher_steps = gin.query_parameter("teacher/train.steps")
    gin.clear_config()
    path = os.path.join(args.out, "results.json")
    results = json.load(open(path)) if os.path.exists(path) else {}
    setting = {"benchmark": "gin/quickstart.gin", "bindings": budget, "teacher_steps": teacher_steps, "steps": steps,
               "ema_decay": decay, "tracked_sigma_rels": list(TRACKED), "snapshot_every_steps": args.every}
    changed = [k for k, v in setting.items() if k in results and results[k] != v]
    if changed:
        print(f"posthoc_ema: error: {path} holds results of another setting ({', '.join(changed)}); "
              "use another --out", file=sys.stderr)
        return 2
    results.update(setting)
    results.update({"ema_sigma_rel": ema_sigma_rel(decay, steps), "nfe": list(NFES), "n_samples": 1797})
    runs_root = os.path.join(args.runs_root, f"t{teacher_steps}-d{steps}-e{args.every}")
    results.setdefault("fid", {})
    results.setdefault("coefficients", {})
    results.setdefault("seconds", {})
    for seed in args.seeds:
        run_dir = os.path.join(runs_root, f"seed{seed}")
        if args.collect and not os.path.exists(os.path.join(run_dir, "summary.json")):
            continue
        train_run(run_dir, seed, args.every, budget)
        with open(os.path.join(run_dir, "summary.json")) as f:  # wall time of the distillation (shared machine)
            results["seconds"][str(seed)] = {"distill": round(json.load(f)["distill"]["seconds"], 1)}
        cell = results["fid"].setdefault(str(seed), {})

        def put(name, value):
            if value is not None:
                cell[name] = value
                write(args.out, results, args.sigma_rels)

        put("ema", fids(run_dir, os.path.join(run_dir, "eval-ema"), [], args.collect))
        for s in args.sigma_rels:
            target = os.path.join(run_dir, "posthoc", f"sigma_rel-{s:.3f}")
            from decm import checkpoint

            if checkpoint.latest_valid(target, verbose=False)[0] is None:
                if args.collect:
                    continue
                run([sys.executable, "-m", "decm.phema", "--run-dir", run_dir, "--sigma-rel", str(s), "--out", target])
            _, info = phema.reconstruct(os.path.join(run_dir, "checkpoints"), s)
            results["coefficients"].setdefault(str(seed), {})[f"{s:.3f}"] = {
                "snapshot_steps": info["snapshot_steps"], "coefficients": info["coefficients"]}
            put(f"phema-{s:.3f}", fids(run_dir, os.path.join(target, "eval"), ["--checkpoint", target], args.collect))
        put("raw", fids(run_dir, os.path.join(run_dir, "eval-raw"), ["--raw"], args.collect))  # last: the least needed
        print(table(results, args.sigma_rels), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
