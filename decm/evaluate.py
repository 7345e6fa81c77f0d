"""NFE sweep of a run: `python -m decm.evaluate RUN_DIR --nfe 1 2 4 50 --sampler chain cm_renoise`.

Re-parses `RUN_DIR/config.gin`, loads the newest valid checkpoint's EMA (or `--step`, `--raw`),
evaluates every (model, sampler, NFE) cell with the run's own `evaluate.*` settings overridden by the
flags, and writes `metrics.json`, `metrics.csv`, `nfe.png` and `samples.png` to `--out` (default
`RUN_DIR/eval-step<step>`), then logs them to the run's W&B run (same id). Multi-GPU: run it under
`torchrun --nproc-per-node N -m decm.evaluate ...` (each rank samples a slice; rank 0 scores).
Bad input prints one `decm.evaluate: error: ...` line and exits 2.

FID over several sample ranges (as EDM2 reports FID-50K over three): `--seeds 0-49999 50000-99999
100000-149999` evaluates each range of sample indices (inclusive; sample i has its own noise from
(seed, i) and label i mod classes, so disjoint ranges are independent draws) into `<out>/seeds-<a>-<b>/`,
prints every metric per range with their mean and minimum, and writes `<out>/seeds.json`.
`--checkpoint DIR` evaluates the newest checkpoint in DIR (e.g. a post-hoc EMA reconstruction written by
`python -m decm.phema`) with the run's configuration.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def build_parser() -> argparse.ArgumentParser:
    from decm import cli

    p = cli.parser("python -m decm.evaluate", __doc__)
    p.add_argument("run_dir", help="a run directory (holds config.gin and checkpoints/)")
    p.add_argument("--nfe", type=int, nargs="+", default=None, help="student NFEs (default: the run's evaluate.student_nfe)")
    p.add_argument("--sampler", nargs="+", default=None,
                   help="student samplers: chain, one_step, cm_renoise, euler_instant (default: the run's)")
    p.add_argument("--teacher-nfe", type=int, nargs="*", default=None, help="teacher NFEs (none: skip the teacher)")
    p.add_argument("--teacher-sampler", nargs="+", default=None, help="teacher samplers: teacher_euler, teacher_heun")
    p.add_argument("--teacher", default=None, help="teacher run dir or file (default: the one the run distilled from)")
    p.add_argument("--n", type=int, default=None, help="samples per cell")
    p.add_argument("--metrics", nargs="+", default=None, help="image metrics among fid isc kid prc")
    p.add_argument("--extractor", default=None, help="auto, inception or digits")
    p.add_argument("--weights", default=None, help="feature extractor weights file")
    p.add_argument("--ref-stats", default=None, help="reference statistics .npz (python -m decm.eval.ref_stats)")
    p.add_argument("--vae", default=None, help="decoder for latent runs (e.g. vavae-f16d32, sd-vae-ft-ema)")
    p.add_argument("--vae-path", default=None, help="the decoder's weights (the VA-VAE checkpoint file)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest valid)")
    p.add_argument("--checkpoint", default=None,
                   help="folder of the checkpoint to evaluate instead of RUN_DIR/checkpoints (e.g. RUN_DIR/posthoc/sigma_rel-0.200)")
    p.add_argument("--seeds", nargs="+", default=None,
                   help="disjoint, equally long sample-index ranges A-B (inclusive), e.g. 0-49999 50000-99999 "
                        "100000-149999: one evaluation per range, then the mean and minimum (replaces --n)")
    p.add_argument("--raw", action="store_true", help="evaluate the raw weights instead of the EMA")
    p.add_argument("--seed", type=int, default=None, help="noise seed")
    p.add_argument("--device", default=None, help="cpu, cuda or auto")
    p.add_argument("--out", default=None, help="output directory (default RUN_DIR/eval-step<step>)")
    p.add_argument("--bind", action="append", default=[],
                   help="extra gin binding on top of the run's config (repeatable), e.g. \"samplers.chain.shift = 0.5\"")
    p.add_argument("--no-wandb", action="store_true", help="do not log to the run's W&B run")
    return p


def overrides(args) -> dict:
    pairs = {"student_nfe": args.nfe, "student_samplers": args.sampler, "teacher_nfe": args.teacher_nfe,
             "teacher_samplers": args.teacher_sampler, "n_samples": args.n, "metrics": args.metrics,
             "extractor": args.extractor, "feature_weights_path": args.weights, "ref_stats": args.ref_stats,
             "vae": args.vae, "vae_path": args.vae_path, "checkpoint_step": args.step, "seed": args.seed, "device": args.device}
    out = {k: (tuple(v) if isinstance(v, list) else v) for k, v in pairs.items() if v is not None}
    if args.raw:
        out["use_ema"] = False
    return out


def parse_seeds(items) -> list[tuple[int, int]]:
    """['0-49999', '50000-99999,100000-149999'] → [(0, 50000), (50000, 100000), ...] (first, end exclusive);
    a ValueError unless the ranges are well formed, equally long (≥ 2 samples) and disjoint."""
    ranges = []
    for item in (part for arg in items for part in arg.split(",") if part):
        a, sep, b = item.partition("-")
        if not sep or not a.isdigit() or not b.isdigit() or int(b) < int(a) + 1:
            raise ValueError(f"--seeds: {item!r} is not a range A-B of sample indices with A < B (e.g. 0-49999)")
        ranges.append((int(a), int(b) + 1))
    if not ranges:
        raise ValueError("--seeds needs at least one range A-B")
    if len({e - a for a, e in ranges}) > 1:
        raise ValueError(f"--seeds: ranges must be equally long (FID depends on the sample count), got "
                         f"{[e - a for a, e in ranges]} samples")
    ordered = sorted(ranges)
    for (a1, e1), (a2, _) in zip(ordered, ordered[1:]):
        if a2 < e1:
            raise ValueError(f"--seeds: ranges {a1}-{e1 - 1} and {a2}-… overlap")
    return ranges


def summarize_seeds(ranges, results: list[dict]) -> dict:
    """{'ranges', 'rows': per (model, sampler, NFE) and metric: per_range, mean, min} over the evaluations."""
    rows = {}
    for res in results:
        for r in res["rows"]:
            key = (r["model"], r["sampler"], r["nfe"])
            row = rows.setdefault(key, {"model": r["model"], "sampler": r["sampler"], "nfe": r["nfe"]})
            for k, v in r.items():
                if k not in ("model", "sampler", "nfe"):
                    row.setdefault(k, {"per_range": []})["per_range"].append(float(v))
    for row in rows.values():
        for k, v in row.items():
            if isinstance(v, dict):
                v["mean"] = sum(v["per_range"]) / len(v["per_range"])
                v["min"] = min(v["per_range"])
    return {"step": results[0]["step"], "ranges": [[a, e - 1] for a, e in ranges],
            "samples_per_range": [res.get("n_samples") for res in results], "rows": list(rows.values())}


def print_seeds(summary: dict) -> None:
    names = "  ".join(f"{a}-{b}" for a, b in summary["ranges"])
    print(f"  per range ({names}), mean, min:")
    for r in summary["rows"]:
        for k, v in r.items():
            if isinstance(v, dict):
                per = "  ".join(f"{x:.4f}" for x in v["per_range"])
                print(f"  {r['model']:<8} {r['sampler']:<14} NFE {r['nfe']:>3} {k}: {per}  mean {v['mean']:.4f}  "
                      f"min {v['min']:.4f}")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import gin

    from decm import checkpoint, distributed, registry
    from decm.job import USER_ERRORS, ConfigError, cli_error, parse

    try:
        config_path = os.path.join(args.run_dir, "config.gin")
        if not os.path.isfile(config_path):
            raise ConfigError(f"{args.run_dir} is not a run directory (no config.gin)")
        parse([config_path], args.bind)
        for name in (args.sampler or []) + (args.teacher_sampler or []):
            if name not in registry.names("samplers"):
                raise ConfigError(f"unknown sampler {name!r}; choices: {', '.join(registry.names('samplers'))}")
        teacher = args.teacher
        summary_path = os.path.join(args.run_dir, "summary.json")
        if teacher is None and os.path.exists(summary_path):
            with open(summary_path) as f:
                teacher = json.load(f).get("teacher_checkpoint")
        kwargs = overrides(args)
        ranges = parse_seeds(args.seeds) if args.seeds else [None]
        if args.seeds and args.n is not None:
            raise ValueError("--seeds sets the samples per range; drop --n")
        ckpt_dir = args.checkpoint or os.path.join(args.run_dir, "checkpoints")
        if args.checkpoint:
            if not os.path.isdir(args.checkpoint):
                raise FileNotFoundError(f"--checkpoint {args.checkpoint}: no such folder")
            kwargs["checkpoint_dir"] = args.checkpoint
        path, state = checkpoint.latest_valid(ckpt_dir)
        step = kwargs.get("checkpoint_step", int(state["step"]) if state else 0)
        default_out = args.checkpoint if args.checkpoint else args.run_dir
        out_dir = args.out or os.path.join(default_out, f"eval-step{step}")
        from decm.eval.evaluate import evaluate
        from decm.experiment import log_evaluation

        evaluations = []
        for span in ranges:
            extra, cell_out = {}, out_dir
            if span is not None:
                extra = {"first_index": span[0], "n_samples": span[1] - span[0]}
                cell_out = os.path.join(out_dir, f"seeds-{span[0]}-{span[1] - 1}")
            with gin.config_scope("distill"):
                results = evaluate(args.run_dir, teacher_checkpoint=teacher, out_dir=cell_out, **kwargs, **extra)
            evaluations.append((span, cell_out, results))
    except USER_ERRORS as e:
        return cli_error("decm.evaluate", e)
    if not evaluations[0][2]:  # ranks > 0
        distributed.shutdown()
        return 0
    if not args.no_wandb:
        from decm.wandb_log import Tracker

        tracker = Tracker(args.run_dir)
        for span, cell_out, results in evaluations:
            suffix = f"-seeds{span[0]}-{span[1] - 1}" if span is not None else ""
            log_evaluation(tracker, results, cell_out, prefix=f"eval-step{results['step']}{suffix}")
        tracker.finish()
    for span, cell_out, results in evaluations:
        print(f"step {results['step']}" + (f", samples {span[0]}-{span[1] - 1}" if span is not None else "") +
              f" → {cell_out}")
        for r in results["rows"]:
            print(f"  {r['model']:<8} {r['sampler']:<14} NFE {r['nfe']:>3}: " +
                  ", ".join(f"{k}={v:.4f}" for k, v in r.items() if k not in ("model", "sampler", "nfe")))
    if args.seeds:
        summary = summarize_seeds(ranges, [r for _, _, r in evaluations])
        tmp = os.path.join(out_dir, "seeds.json.tmp")
        with open(tmp, "w") as f:
            json.dump(summary, f, indent=2)
        os.replace(tmp, os.path.join(out_dir, "seeds.json"))
        print(f"over {len(ranges)} sample ranges → {os.path.join(out_dir, 'seeds.json')}")
        print_seeds(summary)
    distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
