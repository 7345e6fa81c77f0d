"""Loss-divergence study: is the self-supervised part of the CM objective what destabilises training,
and does the flow-matching boundary term calm it?

    python analysis/loss_divergence.py [--benchmark toy2d] [--steps 600] [--seeds 3] [--configs ...]
    python analysis/loss_divergence.py --runs RUN_DIR [RUN_DIR ...]      # analyse existing runs

Each configuration is a short distillation run (the benchmark's model, data, teacher and batch) with
`distill/train.part_grad_every_steps = 1`, which logs per step the gradient norms of the CM loss's
supervised part ‖F − v_φ‖² and self-supervised part ‖F − ṽ‖² (docs/method.md, eq. 8), their cosine, each
loss, the total gradient norm and every term's loss (decm.method.diagnostics). Configurations:
CD only vs CD + FM boundary; one cluster at a time (consistency / instantaneous / N2N); time samplers;
CM target plain (no tangent normalisation or clamp) vs FACM clamp vs sCM normalisation.

Divergence events: a step whose total loss exceeds `--loss-factor` × the running median of the previous
`--window` steps, or whose gradient norm exceeds `--grad-factor` × its running median, or that was
skipped as non-finite. Writes `<out>/summary.md`, `summary.csv`, `summary.json`, `grad_parts.png`
(sup/self gradient norms vs step), `losses.png`, `divergence.png`. Runs log to W&B like any launch.
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

BENCHMARKS = {"toy2d": "gin/toy2d_exact_teacher.gin", "digits": "gin/quickstart.gin"}
# name: (ablation row gin, extra bindings, description)
CONFIGS = {
    "cd_only": ("cd_only", [], "CD only (FACM target)"),
    "cd_fm": ("fm_cd", [], "CD + FM boundary"),
    "consistency": ("cd_only", ["losses.cm_loss.target = 'plain'", "losses.cm_loss.robust_c = 0.0",
                                "losses.cm_loss.weighting = 'none'"], "consistency cluster, plain CM"),
    "instantaneous": ("fm_only", [], "instantaneous cluster (FM)"),
    "noise_to_noisy": ("n2n_only", [], "N2N cluster"),
    "cd_fm_logit_normal": ("fm_cd", ["objectives.objective.time_sampler = @time_samplers.logit_normal()"],
                           "CD + FM, logit-normal t"),
    "cd_fm_arctan": ("fm_cd", ["objectives.objective.time_sampler = @time_samplers.arctan_lognormal()"],
                     "CD + FM, arctan-lognormal t (FACM)"),
    "cd_plain": ("cd_only", ["losses.cm_loss.target = 'plain'"], "CD only, no clamp / normalisation"),
    "cd_scm_norm": ("cd_only", ["losses.cm_loss.target = 'scm'"], "CD only, sCM tangent normalisation"),
    "cd_fm_plain": ("fm_cd", ["losses.cm_loss.target = 'plain'"], "CD + FM, no clamp / normalisation"),
}
DEFAULT = ["cd_only", "cd_fm", "consistency", "instantaneous", "noise_to_noisy", "cd_fm_logit_normal",
           "cd_fm_arctan", "cd_plain", "cd_scm_norm", "cd_fm_plain"]


def config_spec(benchmark, name, steps, seed, runs_root, extra=()):
    from decm.job import RunSpec

    row, binds, _ = CONFIGS[name]
    bindings = ["experiment.stages = ('distill',)", f"distill/train.steps = {steps}", f"distill/train.seed = {seed}",
                "distill/train.part_grad_every_steps = 1", "distill/train.log_every_steps = 1",
                f"distill/train.ckpt_every_steps = {steps}", "distill/train.max_consecutive_bad_steps = 1000000",
                "train.progress = False", f"wandb.group = 'loss-divergence-{benchmark}'", f"wandb.tags = ['{name}']"]
    if benchmark == "digits":
        bindings.insert(0, "experiment.stages = ('teacher', 'distill')")
    gin_files, bindings = (BENCHMARKS[benchmark], f"gin/ablations/{row}.gin"), tuple(bindings + binds + list(extra))
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from ablation_table import config_key

    # the directory depends on every setting (steps, bindings, gin contents): a rerun with new settings
    # trains anew instead of resuming a run made with other settings
    return RunSpec(gin_files, bindings, os.path.join(runs_root, benchmark,
                                                     f"{name}-seed{seed}-{config_key(gin_files, bindings)}"), force=True)


def running_median_events(values, window: int, factor: float) -> np.ndarray:
    """Boolean per step: value > factor × median of the previous `window` finite values (or non-finite)."""
    v = np.asarray(values, dtype=np.float64)
    ev = ~np.isfinite(v)
    for i in range(1, len(v)):
        prev = v[max(0, i - window): i]
        prev = prev[np.isfinite(prev)]
        if len(prev) >= min(window, 10) and np.isfinite(v[i]) and v[i] > factor * np.median(prev):
            ev[i] = True
    return ev


def analyse(stats: list[dict], window=50, loss_factor=3.0, grad_factor=5.0) -> dict:
    """Summary statistics and divergence events of one run's stats.jsonl records."""
    stats = [r for r in stats if "step" in r]
    loss = [r.get("loss/total", np.nan) for r in stats]
    grad = [r.get("grad_norm", np.nan) for r in stats]
    ev_loss = running_median_events(loss, window, loss_factor)
    ev_grad = running_median_events(grad, window, grad_factor)
    skipped = np.diff([0] + [r.get("nan/skipped_total", 0) for r in stats]) > 0
    events = ev_loss | ev_grad | skipped
    out = {"steps": len(stats), "divergence_events": int(events.sum()),
           "divergence_rate": float(events.mean()) if len(stats) else float("nan"),
           "loss_events": int(ev_loss.sum()), "grad_events": int(ev_grad.sum()), "skipped": int(skipped.sum()),
           "final_loss": float(np.nanmean(loss[-max(1, len(loss) // 10):])) if loss else float("nan"),
           "grad_norm_median": float(np.nanmedian(grad)) if grad else float("nan")}
    for key in sorted({k for r in stats for k in r if k.startswith("grad/") and not k.endswith("_cos")}):
        v = np.array([r[key] for r in stats if key in r], dtype=np.float64)
        v = v[np.isfinite(v)]
        if len(v):
            out[f"{key}/median"] = float(np.median(v))
            out[f"{key}/cv"] = float(np.std(v) / (np.mean(v) + 1e-30))  # noisiness: coefficient of variation
            out[f"{key}/p99_over_median"] = float(np.percentile(v, 99) / (np.median(v) + 1e-30))
    for key in sorted({k for r in stats for k in r if k.endswith("_sup_self_cos")}):
        out[f"{key}/mean"] = float(np.nanmean([r[key] for r in stats if key in r]))
    return out


def plots(named_stats: dict, summaries: dict, out: str, caption: str = "") -> None:
    """grad_parts.png, losses.png, divergence.png; `caption` says which runs they show (e.g. the seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from decm.plots import line_panels

    with_parts = [n for n, st in named_stats.items() if any("grad/cm_sup" in r for r in st)]
    if with_parts:
        from decm.plots import grid, save

        fig, axes = grid(len(with_parts), ncols=3, panel_size=(4.0, 3.0))
        for ax, name in zip(axes, with_parts):
            st = named_stats[name]
            for key, label in (("grad/cm_sup", "supervised ‖F − v‖²"), ("grad/cm_self", "self-supervised ‖F − ṽ‖²")):
                pts = [(r["step"], r[key]) for r in st if key in r]
                ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=0.7, label=label)
            ax.set_yscale("log")  # gradient norms span several decades (spikes of 10³–10⁵)
            ax.set_title(name, fontsize=9)
            ax.set_xlabel("training step")
            ax.set_ylabel("gradient norm (log scale)")
            ax.legend(fontsize=7)
        if caption:
            fig.suptitle(caption, fontsize=9)
        save(fig, os.path.join(out, "grad_parts.png"))
    lines = [(name, [(r["step"], r["loss/total"]) for r in st if "loss/total" in r]) for name, st in named_stats.items()]
    line_panels({"": lines}, os.path.join(out, "losses.png"), xlabel="training step",
                ylabel="total loss of each configuration's own objective", lw=0.7, panel_size=(6, 3.6),
                suptitle=caption or None, legend="figure")
    fig, ax = plt.subplots(figsize=(6, 3.2))
    names = list(summaries)
    ax.bar(range(len(names)), [summaries[n]["divergence_rate"] for n in names])
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=40, ha="right", fontsize=7)
    ax.set_ylabel("divergence events / step")
    if caption:
        ax.set_title(caption, fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "divergence.png"), dpi=100)
    plt.close(fig)


def write_summary(summaries: dict, out: str, descriptions: dict) -> str:
    cols = ["steps", "divergence_events", "divergence_rate", "final_loss", "grad_norm_median",
            "grad/cm_sup/median", "grad/cm_self/median", "grad/cm_sup/cv", "grad/cm_self/cv",
            "grad/cm_sup_self_cos/mean"]
    md = ["| config | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 1)]
    for name, s in summaries.items():
        vals = [f"{s[c]:.4g}" if isinstance(s.get(c), float) else str(s.get(c, "—")) for c in cols]
        md.append(f"| {name} ({descriptions.get(name, '')}) | " + " | ".join(vals) + " |")
    with open(os.path.join(out, "summary.csv"), "w") as f:
        f.write("config," + ",".join(cols) + "\n")
        for name, s in summaries.items():
            f.write(name + "," + ",".join(str(s.get(c, "")) for c in cols) + "\n")
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summaries, f, indent=2)
    text = "\n".join(md)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(text + "\n")
    return text


def main(argv=None) -> int:
    from decm import cli

    p = cli.parser("python analysis/loss_divergence.py", __doc__)
    p.add_argument("--benchmark", choices=sorted(BENCHMARKS), default="toy2d",
                   help="toy2d: the 2-D mixture with the analytic teacher; digits: the quickstart")
    p.add_argument("--configs", nargs="+", default=None, help=f"subset of: {' '.join(CONFIGS)}")
    p.add_argument("--steps", type=int, default=600, help="distillation steps per configuration")
    p.add_argument("--seed", type=int, default=0, help="first distill/train.seed of every configuration")
    p.add_argument("--seeds", type=int, default=3, help="training seeds per configuration (seed … seed + N − 1); "
                                                        "the table over seeds gives mean ± sample sd")
    p.add_argument("--runs", nargs="+", default=None, help="analyse these run directories instead of training")
    p.add_argument("--bind", action="append", default=[], help="extra gin binding for every configuration")
    p.add_argument("--window", type=int, default=50, help="running-median window (steps)")
    p.add_argument("--loss-factor", type=float, default=3.0, help="loss event: loss > factor × running median")
    p.add_argument("--grad-factor", type=float, default=5.0, help="gradient event: norm > factor × running median")
    p.add_argument("--runs-root", default="runs/analysis/loss_divergence", help="where the configurations' runs live")
    p.add_argument("--out", default=None, help="output directory (default: a fresh runs/analysis/loss_divergence-"
                                               "<benchmark>-<time>; the committed results are "
                                               "analysis/results/loss_divergence-toy2d-3seeds, replaced only when "
                                               "given here)")
    args = p.parse_args(argv)
    sys.path.insert(0, os.getcwd())
    from decm.tracking import read_stats

    descriptions, seeded = {}, {}
    try:
        if args.runs:
            dirs = {}
            for d in args.runs:
                if not os.path.isfile(os.path.join(d, "stats.jsonl")):
                    raise FileNotFoundError(f"{d} has no stats.jsonl")
                dirs[os.path.basename(os.path.abspath(d))] = d
        else:
            names = args.configs or DEFAULT
            bad = [n for n in names if n not in CONFIGS]
            if bad:
                raise ValueError(f"unknown configs {bad}; choices: {' '.join(CONFIGS)}")
            from decm.job import parse, prepare, run

            if args.seeds < 1:
                raise ValueError("--seeds must be ≥ 1")
            from decm.progress import Countdown
            from decm.wandb_log import one_sync_line

            dirs, seeded = {}, {}
            countdown = Countdown(args.seeds * len(names), "loss_divergence")
            with one_sync_line("loss_divergence"):  # one W&B line after all the runs
                for seed in range(args.seed, args.seed + args.seeds):
                    for name in names:
                        spec = config_spec(args.benchmark, name, args.steps, seed, args.runs_root, args.bind)
                        countdown.start(f"seed {seed}, {name} → {spec.run_dir}")
                        prepare(spec)
                        parse(spec.gin_files, spec.bindings)
                        run(spec)
                        countdown.finish()
                        seeded.setdefault(name, {})[seed] = spec.run_dir
                        if seed == args.seed:
                            dirs[name] = spec.run_dir
                        descriptions[name] = CONFIGS[name][2]
    except (FileNotFoundError, ValueError) as e:
        print(f"loss_divergence: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    out = args.out or os.path.join("runs", "analysis", time.strftime(f"loss_divergence-{args.benchmark}-%Y%m%d-%H%M%S"))
    os.makedirs(out, exist_ok=True)
    named = {n: read_stats(d) for n, d in dirs.items()}
    summaries = {n: analyse(st, args.window, args.loss_factor, args.grad_factor) for n, st in named.items()}
    n_seeds = len(next(iter(seeded.values()), {})) if seeded else 1
    plots(named, summaries, out, caption=f"training seed {args.seed} of {n_seeds} (statistics over the seeds: "
                                         f"over_seeds.md)" if n_seeds > 1 else "")
    print(write_summary(summaries, out, descriptions))
    if len(next(iter(seeded.values()), {})) > 1:
        by_seed = {n: {sd: analyse(read_stats(d), args.window, args.loss_factor, args.grad_factor)
                       for sd, d in runs.items()} for n, runs in seeded.items()}
        print("\nOver seeds (mean ± sample sd):\n" + write_over_seeds(by_seed, out, descriptions, args))
    print(f"\n→ {out}/summary.md (seed {args.seed}), over_seeds.md, over_seeds.json, summary.csv, summary.json, "
          "grad_parts.png, losses.png, divergence.png")
    return 0


OVER_SEEDS = [("divergence_events", "divergence events", "{:.1f}"), ("grad/cm_sup/median", "median ‖∇ sup‖", "{:.2f}"),
              ("grad/cm_self/median", "median ‖∇ self‖", "{:.2f}"), ("grad/cm_sup/cv", "CV sup", "{:.2f}"),
              ("grad/cm_self/cv", "CV self", "{:.2f}"), ("grad/cm_sup_self_cos/mean", "cos(∇sup, ∇self)", "{:.2f}")]


def write_over_seeds(by_seed: dict, out: str, descriptions: dict, args) -> str:
    """Mean ± sample sd (ddof = 1) over seeds of the headline columns; records seeds, threads, torch."""
    import torch

    head = ["config"] + [label for _, label, _ in OVER_SEEDS]
    md = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    table = {}
    for name, seeds in by_seed.items():
        cells, table[name] = [], {}
        for key, _, fmt in OVER_SEEDS:
            vals = [float(sm[key]) for sm in seeds.values() if key in sm and np.isfinite(sm[key])]
            if not vals:
                cells.append("–")
                continue
            mean, sd = float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
            table[name][key] = {"mean": mean, "sd": sd, "values": vals}
            cells.append(f"{fmt.format(mean)} ± {fmt.format(sd)}")
        md.append(f"| {name} ({descriptions.get(name, '')}) | " + " | ".join(cells) + " |")
    text = "\n".join(md)
    meta = {"seeds": sorted(next(iter(by_seed.values()))), "steps": args.steps, "benchmark": args.benchmark,
            "threads": torch.get_num_threads(), "torch": torch.__version__}
    with open(os.path.join(out, "over_seeds.md"), "w") as f:
        f.write(f"# Loss divergence over seeds {meta['seeds']} ({args.steps} steps, {meta['threads']} threads, "
                f"torch {meta['torch']})\n\n{text}\n")
    with open(os.path.join(out, "over_seeds.json"), "w") as f:
        json.dump({"meta": meta, "table": table, "per_seed": by_seed}, f, indent=2)
    return text


if __name__ == "__main__":
    from decm import cli

    sys.exit(cli.main_exit("loss_divergence", main))
