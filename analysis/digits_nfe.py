"""Why does a digits run's FID rise with NFE? Time grid, sampler, distillation steps and per-hop error.

    python analysis/digits_nfe.py RUN_DIR [RUN_DIR ...] [--steps 500 800] [--n 1797] [--out DIR]

For every run directory (a digits distillation, e.g. the quickstart's) and every checkpoint step it
holds (or `--steps`), evaluates the EMA student with `decm.evaluate` (FID with the run's `decm-digits`
extractor, all 1,797 digits as the reference, the same noise everywhere) at NFE 1, 2 and 4 for:
  - the flow-map chain on the uniform grid, on shifted grids (`samplers.chain.shift` 0.5: more steps
    near the data; 2: more near the noise) — the grid;
  - CM re-noise sampling (jump to the data, re-noise, jump again) — the sampler;
and measures per hop of the uniform 1-, 2- and 4-NFE chains the RMS error against the teacher's own guided ODE
trajectory from the same noise (RK4, `--ode-steps`): `local` (the hop started from the exact point)
and `accumulated` (the chain's point), so a chain whose hops are each fine but whose errors add up is
told apart from one with a bad hop. Runs with other N2N settings or lengths are compared by passing
their run directories. Writes `<out>/table.md`, `hops.md`, `results.json` (default out: a fresh
runs/analysis/digits_nfe-<time>).
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

VARIANTS = [("chain, uniform grid", "chain", []), ("chain, shift 0.5 (near data)", "chain", ["samplers.chain.shift = 0.5"]),
            ("chain, shift 2 (near noise)", "chain", ["samplers.chain.shift = 2.0"]),
            ("CM re-noise, uniform", "cm_renoise", [])]


def steps_of(run_dir: str) -> list[int]:
    from decm import checkpoint

    return sorted(checkpoint.step_of(p) for p in checkpoint.candidates(os.path.join(run_dir, "checkpoints"))
                  if checkpoint.is_valid(p, load=False))


def fids(run_dir: str, step: int, sampler: str, binds, n: int, out: str) -> dict:
    from decm import evaluate

    argv = [run_dir, "--step", str(step), "--nfe", "1", "2", "4", "--sampler", sampler, "--teacher-nfe", "--n", str(n),
            "--metrics", "fid", "--out", out, "--no-wandb"]
    for b in binds:
        argv += ["--bind", b]
    if evaluate.main(argv) != 0:
        raise RuntimeError(f"decm.evaluate failed for {run_dir} step {step} ({sampler} {binds})")
    with open(os.path.join(out, "metrics.json")) as f:
        rows = json.load(f)["rows"]
    return {str(r["nfe"]): r["fid"] for r in rows}


@torch.no_grad()
def hops(run_dir: str, step: int, n: int, nfes, ode_steps: int, seed: int = 0) -> dict:
    """{nfe: per-hop RMS errors of the uniform chain against the guided teacher ODE} (module docstring);
    the teacher trajectory is solved once, through every grid point."""
    import gin

    from decm.eval.evaluate import load_student, sample_noise
    from decm.job import parse
    from decm.method.teachers import NetworkTeacher
    from decm.models.build import load_network_teacher
    from decm.sampling import time_grid
    from error_accumulation import exact_points, rms

    parse([os.path.join(run_dir, "config.gin")], [])
    with gin.config_scope("distill"):
        dataset = gin.query_parameter("train.dataset").scoped_configurable_fn()
        backbone = gin.query_parameter("train.backbone").scoped_configurable_fn
        guidance = gin.query_parameter("objectives.objective.guidance").scoped_configurable_fn()
    student, _ = load_student(run_dir, backbone, dataset, True, step)
    with open(os.path.join(run_dir, "summary.json")) as f:
        teacher_dir = json.load(f)["teacher_checkpoint"]
    teacher = NetworkTeacher(load_network_teacher(backbone, dataset, "checkpoint", teacher_dir, "cpu"))

    def velocity(x, t, y):  # the guided teacher the student was distilled from, in the ODE's float64
        return guidance(teacher, x.float(), t.float(), y).double()

    idx = torch.arange(n)
    z = sample_noise(idx.numpy(), dataset.shape, seed)
    y = idx % dataset.num_classes if dataset.num_classes else None
    exact = exact_points(velocity, z, y, sorted({t for k in nfes for t in time_grid(k)}), ode_steps)
    out = {}
    for k in nfes:
        grid = time_grid(k)
        x, rows = z, []
        for a, b in zip(grid[:-1], grid[1:]):
            ta, tb = torch.full((n,), a), torch.full((n,), b)
            x = x + (b - a) * student(x, ta, tb, y)
            local = exact[float(a)] + (b - a) * student(exact[float(a)], ta, tb, y)
            rows.append({"t_from": a, "t_to": b, "accumulated": rms(x, exact[float(b)]),
                         "local": rms(local, exact[float(b)])})
        out[k] = rows
    return out


def main(argv=None) -> int:
    from decm import cli

    p = cli.parser("python analysis/digits_nfe.py", __doc__)
    p.add_argument("run_dirs", nargs="+", help="digits distillation run directories")
    p.add_argument("--steps", type=int, nargs="+", default=None, help="checkpoint steps (default: every valid one)")
    p.add_argument("--n", type=int, default=1797, help="samples per FID (capped at the 1,797 reference digits)")
    p.add_argument("--hop-n", type=int, default=256, help="samples for the per-hop errors")
    p.add_argument("--ode-steps", type=int, default=100, help="RK4 steps per unit time of the teacher trajectory")
    p.add_argument("--out", default=None, help="output directory (default: a fresh runs/analysis/digits_nfe-<time>)")
    args = p.parse_args(argv)
    out = args.out or os.path.join("runs", "analysis", time.strftime("digits_nfe-%Y%m%d-%H%M%S"))
    for d in args.run_dirs:
        if not os.path.isfile(os.path.join(d, "config.gin")):
            print(f"digits_nfe: error: {d} is not a run directory (no config.gin)", file=sys.stderr)
            return 2
    t0 = time.time()
    results = []
    for run_dir in args.run_dirs:
        for step in args.steps or steps_of(run_dir):
            entry = {"run_dir": run_dir, "step": step, "fid": {}, "threads": torch.get_num_threads()}
            for label, sampler, binds in VARIANTS:
                cell_out = os.path.join(out, "evals", f"{os.path.basename(os.path.normpath(run_dir))}-step{step}-"
                                        f"{sampler}-{'_'.join(b.split()[-1] for b in binds) or 'uniform'}")
                entry["fid"][label] = fids(run_dir, step, sampler, binds, args.n, cell_out)
            for k, rows in hops(run_dir, step, args.hop_n, (1, 2, 4), args.ode_steps).items():
                entry[f"hops_nfe{k}"] = rows
            results.append(entry)
            print(f"[digits_nfe] {run_dir} step {step}: " + "; ".join(
                f"{k}: {v['1']:.1f}/{v['2']:.1f}/{v['4']:.1f}" for k, v in entry["fid"].items()), file=sys.stderr, flush=True)
    os.makedirs(out, exist_ok=True)
    lines = ["| run | step | sampler / grid | FID NFE 1 | NFE 2 | NFE 4 |", "|---|---|---|---|---|---|"]
    for e in results:
        for label, v in e["fid"].items():
            lines.append(f"| {os.path.basename(os.path.normpath(e['run_dir']))} | {e['step']} | {label} | "
                         f"{v['1']:.1f} | {v['2']:.1f} | {v['4']:.1f} |")
    hop_lines = ["| run | step | NFE | hop | local RMS error | accumulated RMS error |", "|---|---|---|---|---|---|"]
    for e in results:
        for k in (1, 2, 4):
            for h in e[f"hops_nfe{k}"]:
                hop_lines.append(f"| {os.path.basename(os.path.normpath(e['run_dir']))} | {e['step']} | {k} | "
                                 f"{h['t_from']:.2f}→{h['t_to']:.2f} | {h['local']:.3f} | {h['accumulated']:.3f} |")
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(out, "hops.md"), "w") as f:
        f.write("\n".join(hop_lines) + "\n")
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"results": results, "seconds": time.time() - t0, "torch": torch.__version__, "n": args.n,
                   "hop_n": args.hop_n, "ode_steps": args.ode_steps}, f, indent=1)
    print("\n".join(lines) + "\n\n" + "\n".join(hop_lines))
    print(f"\n→ {out}/table.md, hops.md, results.json")
    return 0


if __name__ == "__main__":
    from decm import cli

    sys.exit(cli.main_exit("digits_nfe", main))
