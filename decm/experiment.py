"""An experiment: the stages one launch runs — teacher pretraining (cached), distillation, evaluation.

Gin scopes separate the stages: `teacher/train.*` configures pretraining, `distill/train.*`
distillation; unscoped `train.*` bindings apply to both.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os

import gin

from decm import distributed, preemption, run_lock
from decm.eval.evaluate import evaluate
from decm.train import train

# Gin modules whose bindings cannot change a pretrained teacher (excluded from its cache key).
_NOT_TEACHER = ("objectives.objective.", "objectives.term.", "losses.", "selectors.", "n2n_variants.", "guidance.", "evaluate.",
                "experiment.", "samplers.", "time_samplers.", "teachers.", "cluster.", "wandb.",
                "train.progress")  # display only: an ablation row's `train.progress = False` reuses the quickstart's teacher


def gin_statements(config: str) -> list[str]:
    """Splits a gin config string into statements (continuation lines joined, comments dropped)."""
    out = []
    for line in config.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line[0].isspace() and out:
            out[-1] += " " + line.strip()
        else:
            out.append(line.strip())
    return out


def teacher_key() -> str:
    """Hash of the parsed bindings that define the teacher: `teacher/`-scoped ones and unscoped data/model/
    train ones, by the names users bind (so `objectives.objective.terms`, which gin writes as
    `objective.terms`, is recognised as a distillation setting and never splits the teacher cache)."""
    import gin.config

    from decm.gin_names import bound_names

    keep = []
    for name, value in bound_names(gin.config._CONFIG).items():  # noqa: SLF001
        scope, _, selector = name.rpartition("/")
        if scope == "teacher" or (not scope and not selector.startswith(_NOT_TEACHER)):
            keep.append(f"{name} = {value!r}")
    return hashlib.sha256("\n".join(sorted(keep)).encode()).hexdigest()[:12]


@gin.configurable(denylist=["run_dir", "build_only"])
def experiment(
    run_dir: str,
    build_only: bool = False,
    stages=("distill", "evaluate"),      # subset of ('teacher', 'distill', 'evaluate'), run in this order
    teacher_dir: str | None = None,      # teacher run dir; None: <cache_root>/teacher-<config hash>
    cache_root: str = "runs/cache",      # where pretrained teachers are cached and reused
):
    """Runs the stages in order and writes `summary.json` in the run directory.

    Rank 0 holds the run directory's lock (decm.run_lock) for all stages: a second launch into the same
    directory is refused, and a launch that needs the shared cached teacher while another process
    pretrains it waits for that teacher instead of training it twice.

    Args:
      run_dir: the distillation run directory.
      build_only: build every object of every stage (models on the meta device), run nothing.
      stages: stages to run.
      teacher_dir: explicit teacher run dir (reused when it holds a finished teacher).
      cache_root: root of the teacher cache.
    """
    bad = [s for s in stages if s not in ("teacher", "distill", "evaluate")]
    if bad:
        raise ValueError(f"experiment.stages has unknown stages {bad}")
    summary = {}
    teacher_ckpt = teacher_dir or None
    rank = (distributed.env_ranks() or (0, 1, 0))[0]
    tracker = None
    locks = contextlib.ExitStack()
    if not build_only and rank == 0:
        locks.enter_context(run_lock.hold(run_dir))
    if not build_only:
        from decm.wandb_log import Tracker

        tracker = Tracker(run_dir, rank=rank)
    try:
        if "teacher" in stages:
            teacher_ckpt = teacher_dir or os.path.join(cache_root, f"teacher-{teacher_key()}")
            teacher_lock = (run_lock.hold(teacher_ckpt, wait=True, what="teacher")
                            if not build_only and rank == 0 else contextlib.nullcontext())
            with teacher_lock, gin.config_scope("teacher"):
                summary["teacher"] = train(run_dir=teacher_ckpt, stage="teacher", build_only=build_only,
                                           tracker=tracker)
        if "distill" in stages:
            with gin.config_scope("distill"):
                summary["distill"] = train(run_dir=run_dir, stage="distill", teacher_checkpoint=teacher_ckpt,
                                           build_only=build_only, tracker=tracker)
            missing = summary["distill"].get("missing_inputs", []) if build_only else []
            if build_only and "teacher" not in stages and teacher_ckpt and not os.path.exists(teacher_ckpt) \
                    and not any(teacher_ckpt in m for m in missing):  # once, even when the loop named it already
                missing.append(f"teacher not found: {teacher_ckpt} (set experiment.teacher_dir)")
        if preemption.requested():  # asked for after the loop's last check: its final checkpoint is on disk
            last = summary.get("distill") or summary.get("teacher") or {}
            raise preemption.stop_error("between stages", last.get("step", 0),
                                        os.path.join(last.get("run_dir", run_dir), "checkpoints"))
        if "evaluate" in stages and not build_only:  # every rank generates its share; rank 0 scores
            with gin.config_scope("distill"):
                summary["evaluate"] = evaluate(run_dir, teacher_checkpoint=teacher_ckpt)
            if tracker is not None:
                log_evaluation(tracker, summary["evaluate"], run_dir)
        if not build_only and rank == 0:
            summary["teacher_checkpoint"] = teacher_ckpt
            with open(os.path.join(run_dir, "summary.json"), "w") as f:
                json.dump(summary, f, indent=2, default=str)
            if tracker is not None:
                tracker.save_files("operative_config.gin", "summary.json")
    finally:
        if tracker is not None:
            tracker.finish()
        locks.close()
    return summary


def log_evaluation(tracker, results: dict, out_dir: str, prefix: str = "eval") -> None:
    """Evaluation table, flat summary metrics and the pictures of one evaluation into W&B."""
    rows = results.get("rows", [])
    tracker.log_table(f"{prefix}/table", rows)
    tracker.summary({f"{prefix}/{r['model']}/{r['sampler']}/nfe{r['nfe']}/{k}": v for r in rows for k, v in r.items()
                     if k not in ("model", "sampler", "nfe")})
    tracker.log_images({f"{prefix}/samples": os.path.join(out_dir, "samples.png"),
                        f"{prefix}/nfe": os.path.join(out_dir, "nfe.png")})
