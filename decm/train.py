"""The training loop, one for both stages (EDM2-style): teacher pretraining and DE-CM distillation.

Resume: rerunning the same command continues from the newest valid checkpoint in
`<run_dir>/checkpoints`; per-step randomness depends only on (seed, rank, step), so a resumed run is
bit-identical to an uninterrupted one on CPU.
"""

from __future__ import annotations

import copy
import math
import os
import time

import gin
import torch

from decm import distributed, preemption, train_state
from decm import parallel as data_parallel
from decm.method.objective import NonFiniteTargetError
from decm.method.teachers import NetworkTeacher
from decm.phema import PowerFunctionEMA, check_sigma_rels
from decm.models.build import (  # noqa: F401  (re-exported: older imports of these names from decm.train)
    TEACHER_SOURCES, backbone_kwargs, load_network_teacher, student_from_teacher)
from decm.seeding import step_generator
from decm.tracking import StatsWriter


class TrainingDiverged(RuntimeError):
    """Raised when too many consecutive steps are non-finite; the last good checkpoint is kept."""


@gin.configurable(denylist=["run_dir", "stage", "teacher_checkpoint", "tracker"])
def train(
    run_dir: str,
    stage: str = "distill",              # 'teacher' (flow-matching pretraining) or 'distill' (DE-CM)
    dataset=gin.REQUIRED,                # a datasets component instance
    backbone=gin.REQUIRED,               # a backbones factory (not called: the dataset fills its shape)
    objective=None,                      # objectives component; default per stage
    teacher_source: str = "analytic",    # distill: 'analytic', 'checkpoint' (decm run), 'sit' or 'lightningdit' (official file)
    teacher_checkpoint: str | None = None,  # distill: teacher run dir / checkpoints dir / official .pt file
    steps: int = 1000,                   # optimizer steps in total (resume continues to this count)
    batch_size: int = 128,               # samples per step *per process* (global batch = batch_size × world size)
    lr: float = 1e-4,                    # AdamW learning rate (paper: 1e-4)
    betas: tuple = (0.9, 0.999),         # AdamW betas
    weight_decay: float = 0.0,           # AdamW weight decay
    grad_clip: float = 1.0,              # max global grad norm (paper: 1.0); ≤ 0 disables
    ema_decay: float = 0.999,            # EMA decay per step (warm-up min(decay, (1+k)/(10+k)))
    phema_sigma_rels: tuple = (),        # post-hoc EMA (decm.phema): σ_rel of the power-function profiles tracked, e.g. (0.05, 0.2); () off
    phema_every_steps: int = 0,          # post-hoc EMA: snapshot period in steps (the last step always snapshots)
    seed: int = 0,                       # base seed; per-step randomness = f(seed, rank, step)
    ckpt_every_steps: int = 500,         # checkpoint period in steps (the last step always saves)
    ckpt_every_minutes: float = 0.0,     # extra time-based checkpoint period, bounds lost work on a crash (0: off)
    keep_last: int = 3,                  # valid checkpoints kept (0: all)
    log_every_steps: int = 25,           # stats.jsonl period in steps
    max_consecutive_bad_steps: int = 20,  # non-finite steps in a row before the run stops
    device: str = "cpu",                 # 'cpu', 'cuda' (cuda:<local rank>) or 'auto'
    precision: str = "fp32",             # 'fp32' or 'bf16' (autocast; JVP and time embeddings stay fp32)
    progress: bool = True,               # rank 0: tqdm bar on a terminal, a plain line every log_every_steps otherwise
    stop_after_steps: int = 0,           # testing/preemption aid: return after this many new steps (0: off)
    snapshot_every_steps: int = 0,       # distill: fixed-noise EMA samples + stats every k steps (0: off)
    part_grad_every_steps: int = 0,      # distill: log CM sup/self-supervised gradient norms every k steps (0: off)
    build_only: bool = False,            # dry run: build every object (model on the meta device), train nothing
    compile_backend: str = "off",        # torch.compile the with-grad student: 'off', 'inductor' (GPU), 'aot_eager' (checks)
    parallel: str = "auto",              # 'auto' (DDP when several processes), 'none', 'ddp' or 'fsdp' (decm.parallel)
    shard_teacher: bool = False,         # fsdp: shard the frozen teacher network too (its memory ÷ world size)
    tracker=None,                        # decm.wandb_log.Tracker of the launch (set by experiment; None: no W&B)
):
    """Runs one training stage in `run_dir` and returns a summary dict.

    Distributed when the environment describes several processes (torchrun / Slurm, see
    decm.distributed): DDP wraps the model for the with-grad forward (or FSDP2 shards it, see
    decm.parallel), the JVP runs on the unwrapped module, rank 0 alone writes stats and single-file
    checkpoints (under FSDP every rank writes its shards, decm.sharded_checkpoint). A preemption request (SIGUSR2 under submitit)
    is honoured at the next step boundary: a checkpoint of that step is written, then `Preempted`;
    Ctrl-C the same way, then `decm.preemption.Interrupted`.

    Args:
      run_dir: where checkpoints/, stats.jsonl and operative_config.gin go.
      stage: 'teacher' or 'distill'.
      dataset: datasets component.
      backbone: backbones factory.
      objective: objectives component (teacher stage: flow_matching_pretrain by default).
      teacher_source: where the distillation teacher comes from.
      teacher_checkpoint: path for teacher_source 'checkpoint', 'sit' or 'lightningdit'.
      steps: total optimizer steps.
      batch_size: samples per step per process.
      lr: AdamW learning rate.
      betas: AdamW betas.
      weight_decay: AdamW weight decay.
      grad_clip: max gradient norm (≤ 0: off).
      ema_decay: EMA decay per step.
      phema_sigma_rels: relative standard deviations of the power-function EMA profiles tracked for
        post-hoc EMA (EDM2; decm.phema), written every `phema_every_steps` to checkpoints/phema/ and
        reconstructed into any σ_rel afterwards by `python -m decm.phema`. () turns it off.
      phema_every_steps: post-hoc EMA snapshot period in steps (> 0 when phema_sigma_rels is set).
      seed: base seed.
      ckpt_every_steps: checkpoint period (steps).
      ckpt_every_minutes: extra checkpoint period (minutes, 0: off).
      keep_last: checkpoints kept.
      log_every_steps: stats period (steps).
      max_consecutive_bad_steps: non-finite steps in a row tolerated.
      device: 'cpu', 'cuda' or 'auto'.
      precision: 'fp32' or 'bf16'.
      progress: show progress (a tqdm bar on a terminal; plain lines in log files).
      stop_after_steps: stop after this many new steps (0: off).
      snapshot_every_steps: evaluation hook period (decm.snapshots; distill only; 0: off).
      part_grad_every_steps: period of decm.method.diagnostics.part_grad_norms (extra backward passes).
      build_only: build on the meta device and return a summary.
      compile_backend: 'off', or a torch.compile backend applied to the (DDP-wrapped) student for the
        with-grad forwards; JVPs still run on the plain module (decm.method.jvp.unwrap), checkpoints
        hold the plain module's keys.
      parallel: 'auto', 'none', 'ddp' or 'fsdp' (decm.parallel; FSDP options under `fsdp.*`).
      shard_teacher: under 'fsdp', shard the frozen teacher network as well.
      tracker: W&B tracker (rank 0 logs every stats record under `<stage>/`).
    """
    check_stage(stage, objective, teacher_source, teacher_checkpoint, build_only)
    check_numbers(steps=steps, batch_size=batch_size, ckpt_every_steps=ckpt_every_steps,
                  log_every_steps=log_every_steps, lr=lr, keep_last=keep_last, ema_decay=ema_decay)
    check_phema(phema_sigma_rels, phema_every_steps)
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"train.precision must be 'fp32' or 'bf16', got {precision!r}")
    if compile_backend != "off" and compile_backend not in torch.compiler.list_backends(exclude_tags=()):
        raise ValueError(f"train.compile_backend must be 'off' or one of "
                         f"{torch.compiler.list_backends(exclude_tags=())}, got {compile_backend!r}")
    if build_only:
        summary = build_summary(stage, dataset, backbone, objective, teacher_source, parallel, shard_teacher,
                                len(phema_sigma_rels or ()))
        summary["missing_inputs"] = missing_inputs(dataset, teacher_source, teacher_checkpoint)
        return summary
    info = distributed.init(device)
    device = info.device
    mode = data_parallel.resolve(parallel, info.world_size)
    data_parallel.check_fsdp_compatible(mode, getattr(objective, "jvp_method", None), compile_backend)
    if hasattr(dataset, "check"):
        dataset.check()  # e.g. latents: a one-line error naming the binding when files are missing
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    if info.main:
        os.makedirs(run_dir, exist_ok=True)

    teacher = None
    torch.manual_seed(seed)  # deterministic initialisation (the loop itself uses per-step generators)
    if stage == "teacher":
        from decm.method.pretrain import FlowMatchingPretrain

        model = backbone(**backbone_kwargs(dataset), flow_map=False)
        objective = objective if objective is not None else FlowMatchingPretrain()
    elif teacher_source == "analytic":
        teacher = dataset.analytic_teacher().to(device)
        model = backbone(**backbone_kwargs(dataset), flow_map=True)
    else:
        teacher_net = load_network_teacher(backbone, dataset, teacher_source, teacher_checkpoint, device,
                                           collective=True)  # rank 0 reads, the others receive
        model = student_from_teacher(backbone, dataset, teacher_net)
        teacher = NetworkTeacher(teacher_net).to(device)
    model = model.to(device)
    objective = objective.to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    phema = PowerFunctionEMA(model, phema_sigma_rels) if phema_sigma_rels else None
    wrapped = data_parallel.wrap(model, ema, teacher, mode, info.world_size, device, precision, shard_teacher)
    if phema is not None and mode == "fsdp":
        phema.shard(info.world_size, device, precision)
    groups = train_state.param_groups(model, objective)
    params = [p for g in groups for p in g["params"]]
    opt = torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), weight_decay=weight_decay)
    start, totals = train_state.load(ckpt_dir, mode, model, ema, objective, opt, info, stage, phema)
    totals = totals or {"nan_masked_samples": 0, "skipped_steps": 0}
    distributed.barrier(info)  # every rank has loaded before rank 0 may write (and prune) checkpoints
    if compile_backend != "off":
        wrapped = torch.compile(wrapped, backend=compile_backend)
    stats_writer = StatsWriter(run_dir, resume_step=start) if info.main else None
    per_term = getattr(objective, "backward_per_term", False)  # the objective runs a backward per term
    per_term_kwargs = {}  # every rank agrees on each term's non-finite verdict before any collective diverges
    if hasattr(objective, "backward_per_term"):
        per_term_kwargs = {"backward": per_term, "agree": lambda bad: distributed.any_true(bad, info)}

    def save(step):
        train_state.save(ckpt_dir, step, mode, model, ema, objective, opt, totals, info, keep_last, phema)

    def close():
        preemption.stop_listening()
        bar.close()
        if stats_writer is not None:
            stats_writer.close()

    from decm.progress import Progress

    bar = Progress(steps, start, stage, progress and info.main, log_every_steps)  # plain lines when not a TTY
    autocast = data_parallel.autocast(device.type, precision, mode)  # FSDP: no weight cache (see there)
    bad_in_a_row, last_ckpt_time, last_stats, new_steps, done = 0, time.time(), {}, 0, start
    t0 = time.time()
    preemption.listen()  # Ctrl-C from here on: checkpoint at the step boundary, then Interrupted (exit 130)
    for step in range(start, steps):
        if distributed.any_true(preemption.requested(), info):
            save(step)
            close()
            raise preemption.stop_error(stage, step, ckpt_dir)
        g = step_generator(seed, info.rank, step)
        if hasattr(dataset, "batch_at"):
            x1, y = dataset.batch_at(step, batch_size, info.rank, info.world_size)
        else:
            x1, y = dataset.batch(batch_size, g)
        x1, y = x1.to(device), (y.to(device) if y is not None else None)
        opt.zero_grad(set_to_none=True)
        try:
            with autocast:
                loss, stats, ctx = objective(wrapped, teacher, x1, y, step, g, **per_term_kwargs)
                if part_grad_every_steps and stage == "distill" and (step + 1) % part_grad_every_steps == 0:
                    from decm.method.diagnostics import part_grad_norms

                    stats.update(part_grad_norms(objective, ctx, params))
            ok = bool(torch.isfinite(loss))
        except NonFiniteTargetError:
            loss, stats, ok = None, {}, False
        ok = not distributed.any_true(not ok, info)  # all ranks skip together (DDP needs every backward)
        if ok:
            if not per_term:
                loss.backward()
            data_parallel.sync_replicated_grads(groups[1]["params"] if len(groups) > 1 else [], info.world_size)
            grad_norm = data_parallel.clip_grad_norm(params, grad_clip if grad_clip > 0 else math.inf)
            ok = bool(torch.isfinite(grad_norm))
            stats["grad_norm"] = float(grad_norm)
        if ok:
            opt.step()
            with torch.no_grad():
                decay = min(ema_decay, (1 + step) / (10 + step))
                for p_ema, p in zip(ema.parameters(), model.parameters()):
                    p_ema.lerp_(p.detach(), 1 - decay)
                for b_ema, b in zip(ema.buffers(), model.buffers()):
                    b_ema.copy_(b)
            bad_in_a_row = 0
            totals["nan_masked_samples"] += int(stats.get("nan/masked_samples", 0))
        else:
            opt.zero_grad(set_to_none=True)
            bad_in_a_row += 1
            totals["skipped_steps"] += 1
            if bad_in_a_row > max_consecutive_bad_steps:
                close()
                raise TrainingDiverged(
                    f"{bad_in_a_row} consecutive non-finite steps at step {step}; last good checkpoint kept in {ckpt_dir}")
        done = step + 1
        if phema is not None:  # every step, skipped ones too: a profile's time is the step count
            phema.update(model, done)
        if step == start and info.main:
            write_operative_config(run_dir, tracker)
        if done % log_every_steps == 0 or done == steps:
            record = {"step": done, **{k: v for k, v in stats.items() if k != "nan/masked_samples"},
                      "nan/masked_total": totals["nan_masked_samples"], "nan/skipped_total": totals["skipped_steps"]}
            if stats_writer is not None:
                stats_writer.write(record)
                if tracker is not None:
                    tracker.log_stats(stage, record)
            last_stats = record
        bar.update(1)
        if stats.get("loss/total") is not None:
            bar.set_postfix(loss=f"{stats['loss/total']:.4f}")
        new_steps += 1
        timed = ckpt_every_minutes > 0 and time.time() - last_ckpt_time > 60 * ckpt_every_minutes
        timed = distributed.any_true(timed, info) if ckpt_every_minutes > 0 else False
        stopping = stop_after_steps > 0 and new_steps >= stop_after_steps
        if phema is not None and (done % phema_every_steps == 0 or done == steps) and (info.main or mode == "fsdp"):
            phema.snapshot(ckpt_dir, done, sharded=mode == "fsdp", main=info.main)  # before the checkpoint of `done`
        if done % ckpt_every_steps == 0 or done == steps or timed or stopping:
            save(done)
            last_ckpt_time = time.time()
        if snapshot_every_steps and stage == "distill" and (info.main or mode == "fsdp") \
                and done % snapshot_every_steps == 0:  # a sharded EMA samples on every rank; rank 0 writes
            from decm.snapshots import snapshot

            snapshot(ema, dataset, done, run_dir, device, write=info.main)
        if stopping and done < steps:
            break
    close()
    if info.main and start >= steps and not os.path.exists(os.path.join(run_dir, "operative_config.gin")):
        write_operative_config(run_dir)
    elapsed = time.time() - t0
    checksum = data_parallel.param_checksum(model)
    return {"stage": stage, "run_dir": run_dir, "step": done, "steps": steps, "seconds": elapsed,
            "last_stats": last_stats, "totals": totals, "world_size": info.world_size, "rank": info.rank,
            "param_checksum": checksum, "shard_checksum": data_parallel.shard_checksum(model), "parallel": mode}


def check_numbers(**values) -> None:
    """Type and range checks of the loop's numeric settings (one clear error before anything runs)."""
    minimum = {"steps": 0, "batch_size": 1, "ckpt_every_steps": 1, "log_every_steps": 1, "keep_last": 0}
    for name, value in values.items():
        if name in minimum:
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"train.{name} must be an integer, got {value!r}")
            if value < minimum[name]:
                raise ValueError(f"train.{name} must be ≥ {minimum[name]}, got {value}")
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"train.{name} must be a number, got {value!r}")
    if values["lr"] <= 0 or not 0 <= values["ema_decay"] < 1:
        raise ValueError(f"train.lr must be > 0 and train.ema_decay in [0, 1), got {values['lr']}, {values['ema_decay']}")


def check_phema(sigma_rels, every_steps) -> None:
    """Post-hoc EMA settings: both set or both off (one clear error before anything runs)."""
    if isinstance(every_steps, bool) or not isinstance(every_steps, int) or every_steps < 0:
        raise ValueError(f"train.phema_every_steps must be an integer ≥ 0, got {every_steps!r}")
    if sigma_rels:
        check_sigma_rels(sigma_rels)
        if every_steps == 0:
            raise ValueError("train.phema_sigma_rels is set but train.phema_every_steps = 0: set the snapshot "
                             "period in steps (or phema_sigma_rels = () to turn post-hoc EMA off)")
    elif every_steps:
        raise ValueError(f"train.phema_every_steps = {every_steps} needs train.phema_sigma_rels, e.g. (0.05, 0.2)")


def check_stage(stage, objective, teacher_source, teacher_checkpoint, build_only) -> None:
    """Validates the stage arguments (the same checks for dry runs and real runs)."""
    if stage not in ("teacher", "distill"):
        raise ValueError(f"train.stage must be 'teacher' or 'distill', got {stage!r}")
    if stage == "teacher":
        return
    if objective is None:
        raise ValueError("train.objective must be set for the distill stage")
    if teacher_source not in TEACHER_SOURCES:
        raise ValueError(f"train.teacher_source must be one of {TEACHER_SOURCES}, got {teacher_source!r}")
    if teacher_source != "analytic" and not teacher_checkpoint and not build_only:
        raise ValueError(f"distill with teacher_source={teacher_source!r} needs a teacher: "
                         "set experiment.teacher_dir")


def missing_inputs(dataset, teacher_source, teacher_checkpoint) -> list[str]:
    """One line per input file the run needs that is not on disk (dry runs list them; launches refuse)."""
    out = []
    if hasattr(dataset, "check"):
        try:
            dataset.check()
        except (FileNotFoundError, ValueError) as e:
            out.append(str(e))
    if teacher_source in ("sit", "lightningdit"):
        if not teacher_checkpoint:
            out.append(f"teacher_source={teacher_source!r} needs the official checkpoint file: set experiment.teacher_dir")
        elif not os.path.isfile(teacher_checkpoint):
            out.append(f"teacher checkpoint not found: {teacher_checkpoint} (set experiment.teacher_dir)")
    return out


def build_summary(stage, dataset, backbone, objective, teacher_source, parallel="auto", shard_teacher=False,
                  phema_profiles: int = 0) -> dict:
    """Builds the stage's model on the meta device (no memory); arguments were checked by check_stage.

    Includes the shard profiles (decm.memory) of the student and of a network teacher and the number of
    post-hoc EMA profiles, from which the launcher's dry run estimates the per-GPU training state for
    the cluster's world size."""
    from decm import memory

    data_parallel.check_mode(parallel)
    if stage == "distill" and teacher_source == "analytic":
        dataset.analytic_teacher()  # raises for datasets without an exact teacher
    with torch.device("meta"):
        model = backbone(**backbone_kwargs(dataset), flow_map=stage == "distill")
        teacher = backbone(**backbone_kwargs(dataset), flow_map=False) if (
            stage == "distill" and teacher_source != "analytic") else None
    if parallel == "fsdp":
        data_parallel.block_list(model)  # a backbone without blocks to shard fails the dry run already
    n_params = sum(p.numel() for p in model.parameters())
    return {"stage": stage, "model": type(model).__name__, "parameters": n_params,
            "data_shape": tuple(dataset.shape), "num_classes": dataset.num_classes,
            "objective": type(objective).__name__ if objective is not None else "FlowMatchingPretrain",
            "parallel": parallel, "shard_teacher": shard_teacher, "shard_profile": memory.shard_profile(model),
            "teacher_shard_profile": memory.shard_profile(teacher) if teacher is not None else None,
            "phema_profiles": phema_profiles}


def write_operative_config(run_dir: str, tracker=None) -> None:
    """Writes gin's operative config (complete only after the first step has called everything) and
    adds it, defaults included, to the W&B run's config under the names users bind."""
    path = os.path.join(run_dir, "operative_config.gin")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(gin.operative_config_str())
    os.replace(tmp, path)
    if tracker is not None:
        from decm.wandb_log import operative_defaults

        tracker.update_config(operative_defaults())
