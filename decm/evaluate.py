"""NFE sweep of a run: `python -m decm.evaluate RUN_DIR --nfe 1 2 4 50 --sampler chain cm_renoise`.

Re-parses `RUN_DIR/config.gin`, loads the newest valid checkpoint's EMA (or `--step`, `--raw`),
evaluates every (model, sampler, NFE) cell with the run's own `evaluate.*` settings overridden by the
flags, and writes `metrics.json`, `metrics.csv`, `nfe.png` and `samples.png` to `--out` (default
`RUN_DIR/eval-step<step>`), then logs them to the run's W&B run (same id). Multi-GPU: run it under
`torchrun --nproc-per-node N -m decm.evaluate ...` (each rank samples a slice; rank 0 scores).
Bad input prints one `decm.evaluate: error: ...` line and exits 2.
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
    p.add_argument("--vae", default=None, help="decoder for latent runs (e.g. sd-vae-ft-ema)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest valid)")
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
             "vae": args.vae, "checkpoint_step": args.step, "seed": args.seed, "device": args.device}
    out = {k: (tuple(v) if isinstance(v, list) else v) for k, v in pairs.items() if v is not None}
    if args.raw:
        out["use_ema"] = False
    return out


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
        path, state = checkpoint.latest_valid(os.path.join(args.run_dir, "checkpoints"))
        step = kwargs.get("checkpoint_step", int(state["step"]) if state else 0)
        out_dir = args.out or os.path.join(args.run_dir, f"eval-step{step}")
        from decm.eval.evaluate import evaluate
        from decm.experiment import log_evaluation

        with gin.config_scope("distill"):
            results = evaluate(args.run_dir, teacher_checkpoint=teacher, out_dir=out_dir, **kwargs)
    except USER_ERRORS as e:
        return cli_error("decm.evaluate", e)
    if not results:  # ranks > 0
        distributed.shutdown()
        return 0
    if not args.no_wandb:
        from decm.wandb_log import Tracker

        tracker = Tracker(args.run_dir)
        log_evaluation(tracker, results, out_dir, prefix=f"eval-step{results['step']}")
        tracker.finish()
    print(f"step {results['step']} → {out_dir}")
    for r in results["rows"]:
        print(f"  {r['model']:<8} {r['sampler']:<14} NFE {r['nfe']:>3}: " +
              ", ".join(f"{k}={v:.4f}" for k, v in r.items() if k not in ("model", "sampler", "nfe")))
    distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
