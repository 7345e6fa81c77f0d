"""Error-accumulation study: where along a few-step trajectory does the error come from, and does N2N
reduce the first hop's error?

    python analysis/error_accumulation.py [--seeds 3] [--runs RUN_DIR ...] [--nfe 1 2 4 8] [--out DIR]

For each run (default: the ablation runs `fm_cd` (no N2N) and `decm` (with N2N) under
runs/ablations/toy2d_exact/ on the exact-teacher benchmark, trained here with its settings if absent) and each sampler:
  - chain (flow map f(x_k, t_k, t_{k+1})) and euler_instant (Euler on F(x, t, t)): at every hop the
    RMS distance between the sampled state and the exact trajectory point x*(t_{k+1}) from the same
    noise (accumulated error), and the error of that hop started from the exact point x*(t_k) (local
    error, the hop alone — the first hop is the N2N cluster's job);
  - chain, euler_instant and cm_renoise: the final distribution distance vs NFE (SW2 for 2-D data, FID
    for images).
The exact trajectory is the teacher ODE solved finely (RK4, `--ode-steps`); for the analytic 2-D
teacher that is the exact flow map to solver precision. Writes `<out>/table.md`, `table.csv`,
`results.json`, `hop_errors.png` (error vs t per NFE, per run) and `final_vs_nfe.png` for training
seed 0, and — the default runs trained with `--seeds` N > 1 — `over_seeds.md` / `over_seeds.json`: every
per-hop error and final SW2 as mean ± sample sd over the seeds, the paired per-seed difference of the
final SW2 (with N2N − without, 95% t interval and verdict), how often the first hop is the largest,
the thread count and the torch version.
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np
import torch

DEFAULT_RUNS = {"without N2N (FM + CD)": "fm_cd", "with N2N (DE-CM)": "decm"}


class OracleFlowMap(torch.nn.Module):
    """The exact flow map of a teacher as a student: F(x, t, s) = (Φ_{t→s}(x) − x)/(s − t), v at s = t."""

    def __init__(self, teacher, ode_steps: int = 200):
        super().__init__()
        self.teacher, self.ode_steps = teacher, ode_steps

    def forward(self, x, t, s, y=None):
        from decm.method.shapes import bcast
        from decm.method.teachers import ode_flow

        gap = s - t
        same = gap.abs() < 1e-12
        safe = torch.where(same, torch.ones_like(gap), gap)
        end = ode_flow(self.teacher, x, t, torch.where(same, t + 1e-6, s), y, self.ode_steps)
        avg = (end - x) / bcast(torch.where(same, torch.full_like(gap, 1e-6), safe), x)
        return torch.where(bcast(same, x).bool(), self.teacher(x, t, y), avg)


@torch.no_grad()
def exact_points(teacher, z, y, times, ode_steps: int = 200):
    """x*(τ) for τ in `times`, all from the same noise z (one fine RK4 solve per segment)."""
    from decm.method.teachers import ode_flow

    out, x, prev = {0.0: z}, z, 0.0
    for tau in sorted(set(float(t) for t in times if t > 0)):
        n = z.shape[0]
        steps = max(1, int(round(ode_steps * (tau - prev))))
        x = ode_flow(teacher, x, torch.full((n,), prev), torch.full((n,), tau), y, steps)
        out[tau], prev = x, tau
    return out


def rms(a, b) -> float:
    return float(((a - b) ** 2).flatten(1).sum(1).mean().sqrt())


@torch.no_grad()
def hop_errors(student, teacher, z, y, nfe: int, sampler: str = "chain", ode_steps: int = 200) -> list[dict]:
    """Per hop: t_k, t_{k+1}, accumulated RMS error and the hop's local RMS error (from x*(t_k))."""
    from decm.sampling import time_grid

    grid = time_grid(nfe)
    exact = exact_points(teacher, z, y, grid, ode_steps)
    x, rows = z, []
    for a, b in zip(grid[:-1], grid[1:]):
        n = z.shape[0]
        ta, tb = torch.full((n,), a), torch.full((n,), b)

        def hop(state):
            if sampler == "chain":
                return state + (b - a) * student(state, ta, tb, y)
            return state + (b - a) * student(state, ta, ta, y)  # euler_instant

        x = hop(x)
        rows.append({"t_from": a, "t_to": b, "accumulated": rms(x, exact[float(b)]),
                     "local": rms(hop(exact[float(a)]), exact[float(b)])})
    return rows


def final_distance(student, dataset, sampler_name, nfe, n, seed, reference):
    from decm.eval.evaluate import build_sampler, generate
    from decm.eval.metrics import sliced_wasserstein

    _, x = generate(build_sampler(sampler_name, None), student, dataset, n, nfe, seed)
    return sliced_wasserstein(x, reference)


def study(run_dirs: dict, nfes, n: int, seed: int, ode_steps: int, final_n: int = 4000) -> dict:
    """{label: {'hops': {sampler: {nfe: rows}}, 'final': {sampler: {nfe: sw2}}}} for 2-D runs; the final SW₂ uses
    `final_n` samples against as many reference points."""
    import gin

    from decm.eval.evaluate import load_student, sample_noise
    from decm.job import parse

    results = {}
    for label, run_dir in run_dirs.items():
        parse([os.path.join(run_dir, "config.gin")], [])
        dataset = gin.query_parameter("train.dataset").scoped_configurable_fn()
        backbone = gin.query_parameter("train.backbone").scoped_configurable_fn
        if len(dataset.shape) != 1 or not hasattr(dataset, "_teacher"):
            raise ValueError(f"{run_dir}: the error-accumulation study runs on 2-D data with an exact teacher")
        student, _ = load_student(run_dir, backbone, dataset)
        teacher = dataset.analytic_teacher()
        idx = np.arange(n)
        z = sample_noise(idx, dataset.shape, seed)
        y = torch.as_tensor(idx % dataset.num_classes) if dataset.num_classes else None
        reference, _ = dataset.reference(final_n, torch.Generator().manual_seed(seed + 1))
        res = {"run_dir": run_dir, "hops": {}, "final": {}, "final_n": final_n}
        for sampler in ("chain", "euler_instant"):
            res["hops"][sampler] = {str(k): hop_errors(student, teacher, z, y, k, sampler, ode_steps) for k in nfes}
        for sampler in ("chain", "euler_instant", "cm_renoise"):
            res["final"][sampler] = {str(k): final_distance(student, dataset, sampler, k, final_n, seed, reference)
                                     for k in nfes}
        results[label] = res
    return results


def write_outputs(results: dict, out: str, nfes, caption: str = "") -> str:
    """table.md, table.csv, results.json and the figures of one set of runs; `caption` (e.g. which
    training seed of several) heads the figures."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from decm.plots import line_panels

    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    md = ["## Per-hop RMS error vs the exact trajectory (chain sampler)", "",
          "| run | NFE | hop | t → t' | accumulated | local (hop alone) |", "|---|---|---|---|---|---|"]
    csv = ["run,sampler,nfe,hop,t_from,t_to,accumulated,local"]
    for label, res in results.items():
        for sampler, by_nfe in res["hops"].items():
            for k, rows in by_nfe.items():
                for i, r in enumerate(rows):
                    csv.append(f"{label},{sampler},{k},{i},{r['t_from']:.4f},{r['t_to']:.4f},{r['accumulated']:.6g},{r['local']:.6g}")
                    if sampler == "chain":
                        md.append(f"| {label} | {k} | {i + 1} | {r['t_from']:.3f} → {r['t_to']:.3f} | "
                                  f"{r['accumulated']:.4f} | {r['local']:.4f} |")
    md += ["", "## Final SW2 vs NFE", "", "| run | sampler | " + " | ".join(f"NFE {k}" for k in nfes) + " |",
           "|---|---|" + "---|" * len(nfes)]
    for label, res in results.items():
        for sampler, by_nfe in res["final"].items():
            md.append(f"| {label} | {sampler} | " + " | ".join(f"{by_nfe[str(k)]:.4f}" for k in nfes) + " |")
    md += ["", "## First hop", ""]
    for label, res in results.items():
        for k in nfes:
            rows = res["hops"]["chain"][str(k)]
            if len(rows) > 1:
                local = [r["local"] for r in rows]
                md.append(f"- {label}, NFE {k}: first-hop local error {local[0]:.4f}; largest hop "
                          f"{int(np.argmax(local)) + 1} ({max(local):.4f}); first hop is the largest: "
                          f"**{'yes' if int(np.argmax(local)) == 0 else 'no'}**")
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    with open(os.path.join(out, "table.csv"), "w") as f:
        f.write("\n".join(csv) + "\n")
    labels = list(results)
    fig, axes = plt.subplots(2, len(labels), figsize=(4.2 * len(labels), 6), squeeze=False, sharey="row")
    for j, label in enumerate(labels):
        for k, rows in results[label]["hops"]["chain"].items():
            axes[0][j].plot([r["t_to"] for r in rows], [r["accumulated"] for r in rows], marker="o", label=f"NFE {k}")
            axes[1][j].plot([r["t_to"] for r in rows], [r["local"] for r in rows], marker="o", label=f"NFE {k}")
        axes[0][j].set_title(f"{label}: accumulated", fontsize=8)
        axes[1][j].set_title(f"{label}: local (hop alone)", fontsize=8)
        axes[1][j].set_xlabel("t at the end of the hop")
        axes[0][j].legend(fontsize=6)
    axes[0][0].set_ylabel("RMS error to the exact trajectory (lower is better)", fontsize=8)
    axes[1][0].set_ylabel("RMS error of the hop alone (lower is better)", fontsize=8)
    if caption:
        fig.suptitle(caption, fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "hop_errors.png"), dpi=100)
    plt.close(fig)
    lines = [(f"{label} · {sampler}", [(k, by_nfe[str(k)]) for k in nfes])
             for label, res in results.items() for sampler, by_nfe in res["final"].items()]
    line_panels({"": lines}, os.path.join(out, "final_vs_nfe.png"), xlabel="NFE (function evaluations)",
                ylabel="SW2 to the data (lower is better)", xlog="auto", marker="o", panel_size=(5.5, 3.6), xticks=nfes,
                suptitle=caption or None)
    return "\n".join(md)


def over_seeds(by_seed: dict, nfes) -> tuple[dict, str]:
    """Mean ± sample sd (ddof = 1) over training seeds of every per-hop error and final SW2, and how often
    the first hop is the largest; returns (table dict, Markdown)."""
    import torch

    seeds = sorted(by_seed)
    first = by_seed[seeds[0]]

    def stat(values):
        v = np.asarray(values, dtype=float)
        return {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "values": v.tolist()}

    table = {"meta": {"seeds": seeds, "threads": torch.get_num_threads(), "torch": torch.__version__}, "runs": {}}
    md = [f"## Over training seeds {seeds} (mean ± sample sd, ddof = 1)", "",
          "| run | NFE | hop | t → t' | accumulated | local (hop alone) |", "|---|---|---|---|---|---|"]
    for label in first:
        entry = table["runs"].setdefault(label, {"hops": {}, "final": {}, "first_hop_largest": {}})
        for k in nfes:
            hops = [by_seed[s][label]["hops"]["chain"][str(k)] for s in seeds]
            rows = []
            for i, r in enumerate(hops[0]):
                acc, loc = stat([h[i]["accumulated"] for h in hops]), stat([h[i]["local"] for h in hops])
                rows.append({"t_from": r["t_from"], "t_to": r["t_to"], "accumulated": acc, "local": loc})
                md.append(f"| {label} | {k} | {i + 1} | {r['t_from']:.3f} → {r['t_to']:.3f} | "
                          f"{acc['mean']:.4f} ± {acc['sd']:.4f} | {loc['mean']:.4f} ± {loc['sd']:.4f} |")
            entry["hops"][str(k)] = rows
            if len(hops[0]) > 1:
                entry["first_hop_largest"][str(k)] = sum(
                    int(np.argmax([r["local"] for r in h]) == 0) for h in hops)
        for sampler in first[label]["final"]:
            entry["final"][sampler] = {str(k): stat([by_seed[s][label]["final"][sampler][str(k)] for s in seeds])
                                       for k in nfes}
    md += ["", "## Final SW2 vs NFE over seeds", "", "| run | sampler | " + " | ".join(f"NFE {k}" for k in nfes) + " |",
           "|---|---|" + "---|" * len(nfes)]
    for label, entry in table["runs"].items():
        for sampler, by_nfe in entry["final"].items():
            md.append(f"| {label} | {sampler} | " + " | ".join(
                f"{by_nfe[str(k)]['mean']:.4f} ± {by_nfe[str(k)]['sd']:.4f}" for k in nfes) + " |")
    labels = list(table["runs"])
    if len(labels) == 2 and len(seeds) > 1:  # the two runs of one seed share noise and teacher: compare them as pairs
        from decm.eval.paired import format_difference, paired_difference

        base, other = labels
        md += ["", f"## Paired: {other} − {base} (same seed), final SW2", "",
               "Mean of the per-seed differences, 95% Student-t interval [low, high] and its verdict (better: lower SW2).",
               "", "| sampler | " + " | ".join(f"NFE {k}" for k in nfes) + " |", "|---|" + "---|" * len(nfes)]
        table["paired"] = {"reference": base, "row": other, "final": {}}
        for sampler in table["runs"][base]["final"]:
            if sampler not in table["runs"][other]["final"]:
                continue
            cells = {str(k): paired_difference(table["runs"][other]["final"][sampler][str(k)]["values"],
                                               table["runs"][base]["final"][sampler][str(k)]["values"]) for k in nfes}
            table["paired"]["final"][sampler] = cells
            md.append(f"| {sampler} | " + " | ".join(format_difference(cells[str(k)], 4) for k in nfes) + " |")
    md += ["", "## First hop the largest (seeds out of " + str(len(seeds)) + ")", ""]
    for label, entry in table["runs"].items():
        md += [f"- {label}, NFE {k}: {n}/{len(seeds)}" for k, n in entry["first_hop_largest"].items()]
    return table, "\n".join(md)


def ensure_runs(benchmark: str, runs_root: str, steps: int | None, extra=(), seed: int = 0) -> dict:
    """The default (without / with N2N) runs of training seed `seed`, trained with the ablation settings
    when absent."""
    sys.path.insert(0, os.path.join(os.getcwd(), "analysis"))
    from ablation_table import row_spec

    from decm import checkpoint
    from decm.job import parse, prepare, run

    dirs = {}
    for label, row in DEFAULT_RUNS.items():
        spec = row_spec(benchmark, row, seed, steps, runs_root, tuple(extra) + ("experiment.stages = ('distill',)",))
        if checkpoint.latest_valid(os.path.join(spec.run_dir, "checkpoints"))[1] is None:
            prepare(spec)
            parse(spec.gin_files, spec.bindings)
            run(spec)
        dirs[label] = spec.run_dir
    return dirs


def main(argv=None) -> int:
    from decm import cli

    p = cli.parser("python analysis/error_accumulation.py", __doc__)
    p.add_argument("--benchmark", default="toy2d_exact", choices=["toy2d_exact"],
                   help="2-D benchmark with an exact teacher (gin/toy2d_exact_teacher.gin)")
    p.add_argument("--runs", nargs="+", default=None, help="run directories (label = directory name)")
    p.add_argument("--nfe", type=int, nargs="+", default=[1, 2, 4, 8], help="chain lengths to measure")
    p.add_argument("--n", type=int, default=2000, help="trajectories per measurement")
    p.add_argument("--seed", type=int, default=4321, help="seed of the held-out noise")
    p.add_argument("--ode-steps", type=int, default=200, help="RK4 steps per unit time of the exact trajectory")
    p.add_argument("--final-n", type=int, default=4000,
                   help="samples (and reference points) of each final SW₂ (the committed results use 4000)")
    p.add_argument("--steps", type=int, default=None, help="steps when the default runs must be trained")
    p.add_argument("--seeds", type=int, default=3, help="training seeds of the default runs (0 … N − 1); mean ± sd "
                                                         "in over_seeds.md (ignored with --runs)")
    p.add_argument("--bind", action="append", default=[], help="extra binding when training the default runs")
    p.add_argument("--runs-root", default="runs/ablations", help="where the default runs live (trained if absent)")
    p.add_argument("--out", default=None, help="output directory (default: a fresh runs/analysis/error_accumulation-"
                                               "<time>; the committed reference is analysis/results/"
                                               "error_accumulation-toy2d, replaced only when given here)")
    args = p.parse_args(argv)
    sys.path.insert(0, os.getcwd())
    if args.seeds < 1 or args.final_n < 2:
        print("error_accumulation: error: --seeds must be ≥ 1 and --final-n ≥ 2", file=sys.stderr)
        return 2
    try:
        if args.runs:
            dirs = {os.path.basename(os.path.abspath(d)): d for d in args.runs}  # one set, no seeds
            for d in dirs.values():
                if not os.path.isfile(os.path.join(d, "config.gin")):
                    raise FileNotFoundError(f"{d} is not a run directory (no config.gin)")
            by_seed = {0: study(dirs, args.nfe, args.n, args.seed, args.ode_steps, args.final_n)}
        else:
            by_seed = {k: study(ensure_runs(args.benchmark, args.runs_root, args.steps, args.bind, k), args.nfe,
                                args.n, args.seed, args.ode_steps, args.final_n) for k in range(args.seeds)}
    except (FileNotFoundError, ValueError) as e:
        print(f"error_accumulation: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    out = args.out or os.path.join("runs", "analysis", time.strftime("error_accumulation-%Y%m%d-%H%M%S"))
    caption = f"training seed 0 of {len(by_seed)} (statistics over the seeds: over_seeds.md)" if len(by_seed) > 1 else ""
    print(write_outputs(by_seed[0], out, args.nfe, caption))  # the detailed tables and figures: training seed 0
    if len(by_seed) > 1:
        table, md = over_seeds(by_seed, args.nfe)
        with open(os.path.join(out, "over_seeds.json"), "w") as f:
            json.dump(table, f, indent=1)
        with open(os.path.join(out, "over_seeds.md"), "w") as f:
            f.write(md + "\n")
        print("\n" + md)
    print(f"\n→ {out}/table.md, table.csv, results.json, hop_errors.png, final_vs_nfe.png"
          + (", over_seeds.md, over_seeds.json" if len(by_seed) > 1 else ""))
    return 0


if __name__ == "__main__":
    from decm import cli

    sys.exit(cli.main_exit("error_accumulation", main))
