"""Evaluation of a distilled run: every (model, sampler, NFE) cell of a sweep, one metric code path.

- 2-D data: sliced Wasserstein-2 and energy distance to fresh samples of the true distribution.
- Images (pixels or latents decoded by a VAE): FID / IS / KID / precision-recall through torch-fidelity
  (decm.eval.fidelity) against reference statistics — a `.npz` file (`evaluate.ref_stats`) or, when
  unset, statistics computed from `dataset.reference` (the CPU-scale digits flow).
- Held-out tuning (`reference_part`): 'tune' and 'final' score against two disjoint halves of one fixed
  reference draw, so that a study tuned on one half never sees the other (on digits: 898 + 898 of the
  1,797 images); 'all' (default) draws n_samples with seed + 1.

Samples are deterministic per sample index: noise z_i from the seed (seed, i), labels i mod classes,
so a 2-GPU and an 8-GPU evaluation draw the same samples. Under torchrun / Slurm each rank generates
whole batches b ≡ rank (mod world) and its features; rank 0 gathers them once and computes metrics.

Outputs (in `out_dir`, default the run directory): `metrics.json` (`student` / `teacher` → NFE →
metrics for the first sampler of each, plus `rows` for the whole sweep), `metrics.csv`, `nfe.png`
(metric vs NFE, one line per model × sampler), `samples.png`.
"""

from __future__ import annotations

import csv
import json
import os

import gin
import numpy as np
import torch

from decm import checkpoint, distributed
from decm.eval.metrics import energy_distance, sliced_wasserstein
from decm.method.guidance import NoGuidance
from decm.plots import line_panels
from decm.registry import get as get_component
from decm.models.build import backbone_kwargs, load_network_teacher


def load_student(run_dir: str, backbone, dataset, use_ema: bool = True, step: int | None = None,
                 ckpt_dir: str | None = None, collective: bool = False):
    """The newest valid checkpoint's EMA (or raw) weights, or those of checkpoint `step`, from
    `<run_dir>/checkpoints` or `ckpt_dir` (e.g. a post-hoc EMA reconstruction, decm.phema).
    `collective=True` (every rank calls it): rank 0 reads, the others receive (decm.one_reader)."""
    ckpt_dir = ckpt_dir or os.path.join(run_dir, "checkpoints")
    # a single file or a sharded folder (FSDP runs), the newest or that of `step`; reports on rank 0 only
    path, state = checkpoint.latest_valid(ckpt_dir, collective=collective, step=step)
    if state is None:
        raise FileNotFoundError(f"no valid checkpoint in {ckpt_dir}" + (f" at step {step}" if step is not None else ""))
    model = backbone(**backbone_kwargs(dataset), flow_map=True)
    model.load_state_dict(state["ema" if use_ema else "model"])
    return model.eval(), int(state["step"])


def sample_noise(indices, shape, seed: int) -> torch.Tensor:
    """z_i ~ N(0, I) from its own seed (seed, i): independent of batch size and world size."""
    out = torch.empty((len(indices), *shape))
    for k, i in enumerate(indices):
        g = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, int(i)]).generate_state(1)[0]))
        out[k] = torch.randn(shape, generator=g)
    return out


def generate(sampler, net, dataset, n: int, nfe: int, seed: int, info=None, batch: int = 500, device="cpu",
             postprocess=None, first: int = 0):
    """This rank's share of the n samples of indices first … first + n − 1: returns (indices, outputs)
    with outputs = postprocess(samples)."""
    info = info or distributed.DistInfo()
    idx_all, outs = [], []
    for b, start in enumerate(range(first, first + n, batch)):
        if b % info.world_size != info.rank:
            continue
        idx = np.arange(start, min(start + batch, first + n))
        z = sample_noise(idx, dataset.shape, seed).to(device)
        y = torch.as_tensor(idx % dataset.num_classes, device=device) if dataset.num_classes else None
        g = torch.Generator().manual_seed(seed * 1_000_003 + start)  # stochastic samplers (re-noising)
        x = sampler(net, z, y, nfe=nfe, generator=g)
        outs.append(postprocess(x) if postprocess else x.float().cpu())
        idx_all.append(idx)
    if not outs:
        return np.zeros(0, np.int64), None
    if isinstance(outs[0], dict):
        return np.concatenate(idx_all), {k: torch.cat([o[k] for o in outs]) for k in outs[0]}
    return np.concatenate(idx_all), torch.cat(outs)


def gather(indices, values, info):
    """Rank 0: all ranks' values in sample-index order (tensors or {name: tensor}); others: None."""
    if not info.distributed:
        return values
    import torch.distributed as dist

    parts = [None] * info.world_size
    dist.all_gather_object(parts, (indices, values))
    if not info.main:
        return None
    parts = [p for p in parts if p[1] is not None]
    order = np.argsort(np.concatenate([p[0] for p in parts]))
    if isinstance(parts[0][1], dict):
        return {k: torch.cat([p[1][k] for p in parts])[order] for k in parts[0][1]}
    return torch.cat([p[1] for p in parts])[order]


def make_decoder(dataset, vae: str | None, vae_path: str | None = None, device="cpu"):
    """Model-space samples → [−1, 1] images: identity for pixels; for latents, the dataset's inverse
    normalisation (its index's scale or per-channel statistics) then the VAE's decoder on `device`."""
    if not hasattr(dataset, "denormalize"):
        return lambda x: x
    if not vae:
        raise ValueError("latent samples need a decoder: set evaluate.vae (e.g. 'vavae-f16d32' or 'sd-vae-ft-ema')")
    from decm.data.encode_latents import make_vae

    model = make_vae(vae, vae_path, "evaluate.vae_path or --vae-path").to(device).eval()
    return lambda x: model.decode(dataset.denormalize(x.float().to(device))).clamp(-1, 1).cpu()


def default_extractor(dataset) -> str:
    from decm.data.builtin import Digits

    return "digits" if isinstance(dataset, Digits) else "inception"


REFERENCE_PARTS = ("all", "tune", "final")
REFERENCE_SPLIT_SEED = 2026  # the one draw that 'tune' and 'final' split


def draw_reference(dataset, n: int, seed: int, part: str = "all") -> torch.Tensor:
    """The reference samples: `n` drawn with seed + 1 ('all'), or one half of a fixed draw of 2n ('tune': the
    first half, 'final': the second), disjoint by construction. On a finite dataset the draw is the whole
    dataset shuffled, so the halves are two disjoint halves of it."""
    if part == "all":
        return dataset.reference(n, torch.Generator().manual_seed(seed + 1))[0]
    pool = dataset.reference(2 * n, torch.Generator().manual_seed(REFERENCE_SPLIT_SEED))[0]
    half = len(pool) // 2
    return pool[:half] if part == "tune" else pool[half:2 * half]


@gin.configurable(denylist=["run_dir", "teacher_checkpoint"])
def evaluate(
    run_dir: str,
    teacher_checkpoint: str | None = None,  # network teacher run dir / file (None: the dataset's analytic teacher)
    dataset=gin.REQUIRED,                # same dataset component as training
    backbone=gin.REQUIRED,               # same backbone factory as training
    student_nfe=(1, 2, 4),               # student NFEs
    teacher_nfe=(1, 2, 4, 50),           # teacher NFEs (() skips the teacher)
    student_samplers=("chain",),         # sampler names for the student (first one = metrics.json 'student')
    teacher_samplers=("teacher_euler",),  # sampler names for the teacher (guided like distillation)
    teacher_source: str = "checkpoint",  # how teacher_checkpoint is read: 'checkpoint', 'sit', 'lightningdit'
    teacher_guidance=None,               # guidance used for the teacher (same as distillation's)
    n_samples: int = 4000,               # samples per cell (2-D; images: capped at the reference size when computed)
    seed: int = 1234,                    # noise seed (the same noise for every NFE and model)
    extractor: str = "auto",             # 'auto' (digits for digits, else inception), 'inception', 'digits'
    feature_weights_path: str | None = None,  # extractor weights file (or $DECM_INCEPTION_WEIGHTS / $DECM_DIGITS_WEIGHTS)
    ref_stats: str | None = None,        # reference-statistics .npz (None: computed from dataset.reference)
    reference_part: str = "all",         # 'all' (drawn with seed + 1); 'tune' / 'final': disjoint halves of one fixed draw
    metrics=("fid", "kid"),              # image metrics among fid, isc, kid, prc
    vae: str | None = None,              # latents: decoder name (decm.data.encode_latents)
    vae_path: str | None = None,         # latents: the decoder's weights (VA-VAE checkpoint file; diffusers dir)
    grid_samples: int = 64,              # samples per panel of samples.png (each one decoded: fewer on CPU at 256 px)
    use_ema: bool = True,                # evaluate the EMA weights (False: raw)
    checkpoint_step: int | None = None,  # evaluate this checkpoint (None: newest valid)
    checkpoint_dir: str | None = None,   # read checkpoints from here (None: <run_dir>/checkpoints; e.g. decm.phema output)
    first_index: int = 0,                # sample indices first_index … first_index + n_samples − 1 (disjoint ranges: --seeds)
    batch_size: int = 500,               # samples per sampler call
    device: str = "cpu",                 # 'cpu', 'cuda' or 'auto'
    out_dir: str | None = None,          # where the outputs go (None: the run directory)
    label: str | None = None,            # the student's name in figure titles (None: the run directory's name)
):
    """Runs the sweep and returns the metrics dict (see the module docstring).

    Args:
      run_dir: the distillation run directory.
      label: the student's name in figure titles and legends (None: the run directory's name).
      teacher_checkpoint: teacher run dir or official file.
      dataset: datasets component.
      backbone: backbones factory.
      student_nfe: student NFEs.
      teacher_nfe: teacher NFEs.
      student_samplers: student sampler names.
      teacher_samplers: teacher sampler names.
      teacher_source: teacher format.
      teacher_guidance: guidance for the teacher.
      n_samples: samples per cell.
      seed: noise seed.
      extractor: feature extractor.
      feature_weights_path: extractor weights.
      ref_stats: reference statistics file.
      reference_part: which reference samples are scored against: 'all' draws `n_samples` with seed + 1;
        'tune' and 'final' split one fixed draw of 2·n_samples (seed REFERENCE_SPLIT_SEED) into two disjoint
        halves, so that tuning never sees the final evaluation's reference. On a finite dataset (digits:
        1,797 images) each half is half the dataset and n_samples is capped to it.
      metrics: image metrics.
      vae: decoder for latents.
      vae_path: the decoder's weights file (required for the VA-VAE).
      grid_samples: samples shown per model × NFE panel of samples.png (at most 64).
      use_ema: EMA weights.
      checkpoint_step: checkpoint to evaluate.
      checkpoint_dir: folder of the checkpoint to evaluate (None: the run's own checkpoints/), e.g. a
        post-hoc EMA reconstruction written by `python -m decm.phema`.
      first_index: index of the first sample; sample i has its own noise (seed, i) and label i mod classes,
        so ranges [a, a + n) that do not overlap are independent draws (FID over several ranges).
      batch_size: samples per call.
      device: device.
      out_dir: output directory.
    """
    if isinstance(first_index, bool) or not isinstance(first_index, int) or first_index < 0:
        raise ValueError(f"evaluate.first_index must be an integer ≥ 0, got {first_index!r}")
    if isinstance(grid_samples, bool) or not isinstance(grid_samples, int) or grid_samples < 1:
        raise ValueError(f"evaluate.grid_samples must be an integer ≥ 1, got {grid_samples!r}")
    if reference_part not in REFERENCE_PARTS:
        raise ValueError(f"evaluate.reference_part = {reference_part!r}: choose one of {', '.join(REFERENCE_PARTS)}")
    if ref_stats and reference_part != "all":
        raise ValueError(f"evaluate.reference_part = {reference_part!r} splits a drawn reference; it cannot split "
                         f"the fixed statistics in evaluate.ref_stats = {ref_stats!r}")
    info = distributed.init(device)
    dev = info.device
    out_dir = out_dir or run_dir
    student, step = None, 0
    if student_nfe:  # the 'teacher' ablation row evaluates the teacher alone
        student, step = load_student(run_dir, backbone, dataset, use_ema, checkpoint_step, checkpoint_dir,
                                     collective=info.distributed)
        student = student.to(dev)
    if teacher_nfe:
        if teacher_checkpoint:
            from decm.method.teachers import NetworkTeacher

            teacher = NetworkTeacher(load_network_teacher(backbone, dataset, teacher_source, teacher_checkpoint, dev,
                                                          collective=info.distributed))
        else:
            teacher = dataset.analytic_teacher()
        teacher = teacher.to(dev)
    images = len(dataset.shape) == 3
    cells = [("student", s, k) for s in student_samplers for k in student_nfe if s != "one_step" or k == 1]
    cells += [("teacher", s, k) for s in teacher_samplers for k in teacher_nfe if s != "teacher_heun" or k % 2 == 0]

    if images:
        from decm.eval import fidelity

        ext = default_extractor(dataset) if extractor == "auto" else extractor
        weights = fidelity.resolve_weights(ext, feature_weights_path)
        decode = make_decoder(dataset, vae, vae_path, dev)
        if ref_stats:
            ref = fidelity.ReferenceStats.load(ref_stats, fidelity.fidelity_name(ext))
            reference = None
        else:
            reference = draw_reference(dataset, n_samples, seed, reference_part)
            ref = fidelity.ReferenceStats.from_features(
                fidelity.features(fidelity.to_uint8(decode(reference)), ext, weights), ext)
            n_samples = min(n_samples, len(reference))
        post = lambda x: fidelity.features(fidelity.to_uint8(decode(x)), ext, weights)  # noqa: E731
        score = lambda fd: fidelity.metrics(fd, ref, ext, weights, which=tuple(metrics))  # noqa: E731
    else:
        reference = draw_reference(dataset, n_samples, seed, reference_part)
        post = None
        score = lambda x: {"sw2": sliced_wasserstein(x, reference),  # noqa: E731
                           "energy": energy_distance(x[:2000], reference[:2000])}

    rows, pictures = [], {}
    for who, name, nfe in cells:
        sampler = build_sampler(name, teacher_guidance)
        net = student if who == "student" else teacher
        idx, local = generate(sampler, net, dataset, n_samples, nfe, seed, info, batch_size, dev, post, first_index)
        values = gather(idx, local, info)
        if info.main:
            rows.append({"model": who, "sampler": name, "nfe": nfe, **score(values)})
            if not images:
                pictures[panel_title(who, name, nfe, label or os.path.basename(os.path.abspath(run_dir)))] = values
        if images and info.main and name in (student_samplers[0], (teacher_samplers or ("",))[0]):
            _, x = generate(sampler, net, dataset, min(8 * max(dataset.num_classes, 1), grid_samples, 64), nfe, seed,
                            device=dev, postprocess=lambda x: decode(x).float().cpu())
            pictures[panel_title(who, name, nfe, label or os.path.basename(os.path.abspath(run_dir)))] = x
    if not info.main:
        return {}
    results = {"step": step, "student": {}, "teacher": {}, "rows": rows, "n_samples": n_samples,
               "first_index": first_index}
    first = {"student": student_samplers[0], "teacher": (teacher_samplers or ("",))[0]}
    for r in rows:
        if r["sampler"] == first[r["model"]]:
            results[r["model"]][str(r["nfe"])] = {k: v for k, v in r.items() if k not in ("model", "sampler", "nfe")}
    os.makedirs(out_dir, exist_ok=True)
    write_table(rows, out_dir)
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        json.dump(results, f, indent=2)
    plot_nfe(rows, os.path.join(out_dir, "nfe.png"), label or os.path.basename(os.path.abspath(run_dir)))
    ref_pic = decode(reference[:min(grid_samples, 64)]) if (images and reference is not None) else reference
    save_picture(pictures, ref_pic, os.path.join(out_dir, "samples.png"), images, dataset.num_classes)
    return results


# Sampler names as printed in figure titles and legends.
SAMPLER_NAMES = {"chain": "chain", "one_step": "one step", "cm_renoise": "CM re-noise", "euler_instant": "Euler F(x,t,t)",
                 "teacher_euler": "Euler", "teacher_heun": "Heun"}


METRIC_NAMES = {"fid": ("fid",), "kid": ("kid", "kid_std"), "isc": ("isc", "isc_std"),
                "prc": ("precision", "recall", "f_score")}


def metric_paths(dataset, student_nfe=None, teacher_nfe=None, metrics=None) -> list[str]:
    """The `metrics.json` paths ('student.<nfe>.<name>', 'teacher.<nfe>.<name>') an evaluation with the
    current gin settings writes (None arguments: the bound or default values of `evaluate`)."""
    import inspect

    defaults = {k: v.default for k, v in inspect.signature(evaluate).parameters.items()}

    def setting(name, given):
        if given is not None:
            return given
        try:
            return gin.query_parameter(f"evaluate.{name}")
        except ValueError:
            return defaults[name]

    if len(dataset.shape) == 3:
        names = [n for m in setting("metrics", metrics) for n in METRIC_NAMES.get(m, (m,))]
    else:
        names = ["sw2", "energy"]
    return [f"{who}.{nfe}.{n}" for who, nfes in (("student", setting("student_nfe", student_nfe)),
                                                 ("teacher", setting("teacher_nfe", teacher_nfe)))
            for nfe in nfes for n in names]


def build_sampler(name: str, teacher_guidance):
    cls = get_component("samplers", name)
    if getattr(cls, "uses_teacher", False):
        return cls(guidance=teacher_guidance or NoGuidance())
    return cls()


def write_table(rows, out_dir: str) -> None:
    keys = ["model", "sampler", "nfe"] + sorted({k for r in rows for k in r} - {"model", "sampler", "nfe"})
    tmp = os.path.join(out_dir, "metrics.csv.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, os.path.join(out_dir, "metrics.csv"))


def plot_nfe(rows, path: str, label: str = "student") -> None:
    """Metric vs NFE (ticks at the NFEs used), one line per model × sampler, one panel per metric."""
    names = [k for k in rows[0] if k not in ("model", "sampler", "nfe") and not k.endswith("_std")] if rows else []
    panels = {metric: [(f"{label if key[0] == 'student' else 'teacher'} · {SAMPLER_NAMES.get(key[1], key[1])}",
                        sorted((r["nfe"], r[metric]) for r in rows if (r["model"], r["sampler"]) == key))
                       for key in dict.fromkeys((r["model"], r["sampler"]) for r in rows)]
              for metric in names}
    nfes = sorted({r["nfe"] for r in rows})
    line_panels(panels, path, xlabel="NFE (function evaluations)", xlog="auto", marker="o", dpi=110, xticks=nfes)


def panel_title(who: str, sampler: str, nfe: int, label: str) -> str:
    """'<run> · chain · NFE 2' for the student, 'teacher · Euler · 50 steps' for the teacher."""
    name = SAMPLER_NAMES.get(sampler, sampler)
    return f"{label} · {name} · NFE {nfe}" if who == "student" else f"teacher · {name} · {nfe} step{'s' * (nfe != 1)}"


def scatter_limits(arrays, margin: float = 0.08):
    """One square window holding (almost) every point of every panel: the 0.2–99.8 percentiles plus a margin."""
    pts = np.concatenate([a[:2000] for a in arrays])
    pts = pts[np.isfinite(pts).all(1)]
    lo, hi = np.percentile(pts, 0.2, axis=0), np.percentile(pts, 99.8, axis=0)
    centre, half = (lo + hi) / 2, (hi - lo).max() / 2 * (1 + margin) + 1e-6
    return (centre[0] - half, centre[0] + half), (centre[1] - half, centre[1] + half)


def save_picture(pictures: dict, reference, path: str, images: bool, num_classes: int) -> None:
    """The data and every sample set, as image grids or 2-D scatters, in rows of at most 4 panels."""
    from decm.plots import grid, save

    panels = ([("data", reference)] if reference is not None else []) + list(pictures.items())
    fig, axes = grid(len(panels), ncols=4, panel_size=(3.2, 3.4))
    if not images:
        xlim, ylim = scatter_limits([x.numpy() for _, x in panels])
    for ax, (title, x) in zip(axes, panels):
        if images:
            ax.imshow(image_grid(x, num_classes))
            ax.set_xticks([])
            ax.set_yticks([])
        else:
            pts = x[:2000].numpy()
            ax.scatter(pts[:, 0], pts[:, 1], s=1, alpha=0.5)
            ax.set_xlim(*xlim)
            ax.set_ylim(*ylim)
            ax.set_aspect("equal")
            ax.tick_params(labelsize=7)
        ax.set_title(title, fontsize=9)
    save(fig, path, dpi=110)


def image_grid(x: torch.Tensor, num_classes: int) -> np.ndarray:
    """[−1, 1] N×C×H×W → H'×W'×3 in [0, 1]: rows of `num_classes` (or 8) images."""
    x = x[:64].float().clamp(-1, 1)
    cols = min(max(min(num_classes, 10), 1) if num_classes else 8, len(x))  # fewer samples: one row
    rows = max(len(x) // cols, 1)
    x = x[: rows * cols]
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    x = x[:, :3]
    grid = x.reshape(rows, cols, *x.shape[1:]).permute(0, 3, 1, 4, 2).reshape(rows * x.shape[2], cols * x.shape[3], 3)
    return ((grid + 1) / 2).numpy()
