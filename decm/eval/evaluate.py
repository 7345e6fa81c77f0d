"""CPU-scale evaluation of a distilled run: student at NFE 1/2/4 vs the teacher at 1/2/4/50 steps.

2-D data: sliced Wasserstein-2 and energy distance to fresh samples of the true distribution
(`n_samples` each, fixed seeds). Digits: FID and KID through torch-fidelity with the registered
`decm-digits` feature extractor against the 1,797 real digits. Writes `metrics.json` and a picture
(`samples.png`: scatter plots or image grids).
"""

from __future__ import annotations

import json
import os

import gin
import torch

from decm import checkpoint
from decm.eval.metrics import energy_distance, sliced_wasserstein
from decm.method.guidance import NoGuidance
from decm.sampling import Chain, TeacherEuler
from decm.train import backbone_kwargs, load_network_teacher


def load_student(run_dir: str, backbone, dataset, use_ema: bool = True):
    path, state = checkpoint.latest_valid(os.path.join(run_dir, "checkpoints"))
    if state is None:
        raise FileNotFoundError(f"no valid checkpoint in {run_dir}/checkpoints")
    model = backbone(**backbone_kwargs(dataset), flow_map=True)
    model.load_state_dict(state["ema" if use_ema else "model"])
    return model.eval(), int(state["step"])


def draw(sampler, net, dataset, n, nfe, seed, batch=1000):
    """n samples with fixed per-sample noise (seed) and balanced labels for conditional data."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn((n, *dataset.shape), generator=g)
    y = (torch.arange(n) % dataset.num_classes) if dataset.num_classes else None
    out = []
    for i in range(0, n, batch):
        out.append(sampler(net, z[i:i + batch], None if y is None else y[i:i + batch], nfe=nfe, generator=g))
    return torch.cat(out), y


@gin.configurable(denylist=["run_dir", "teacher_checkpoint"])
def evaluate(
    run_dir: str,
    teacher_checkpoint: str | None = None,  # network teacher run dir (None: the dataset's analytic teacher)
    dataset=gin.REQUIRED,                # same dataset component as training
    backbone=gin.REQUIRED,               # same backbone factory as training
    student_nfe=(1, 2, 4),               # student NFEs (flow-map chain; 1 NFE = f(z, 0, 1))
    teacher_nfe=(1, 2, 4, 50),           # teacher Euler steps
    student_sampler=None,                # samplers component for the student (default chain)
    teacher_guidance=None,               # guidance used for the teacher (same as distillation's)
    n_samples: int = 4000,               # samples per evaluation (2-D) / capped at 1,797 refs for digits
    seed: int = 1234,                    # noise seed (the same noise for every NFE and model)
    feature_weights_path: str = "runs/cache/digits_classifier.pt",  # digits extractor weights
):
    """Evaluates the newest checkpoint's EMA; returns and writes the metrics dict."""
    student, step = load_student(run_dir, backbone, dataset)
    if teacher_checkpoint:
        from decm.method.teachers import NetworkTeacher

        teacher = NetworkTeacher(load_network_teacher(backbone, dataset, teacher_checkpoint, "cpu"))
    else:
        teacher = dataset.analytic_teacher()
    student_sampler = student_sampler or Chain()
    teacher_sampler = TeacherEuler(guidance=teacher_guidance or NoGuidance())
    images = len(dataset.shape) == 3
    ref_gen = torch.Generator().manual_seed(seed + 1)
    reference, _ = dataset.reference(n_samples, ref_gen)
    n = len(reference) if images else n_samples
    if images:
        from decm.eval.digits_features import ensure_classifier, fidelity_metrics

        weights = ensure_classifier(feature_weights_path)
        score = lambda x: fidelity_metrics(x, reference, weights)  # noqa: E731
    else:
        score = lambda x: {"sw2": sliced_wasserstein(x, reference),  # noqa: E731
                           "energy": energy_distance(x[:2000], reference[:2000])}
    results, pictures = {"step": step, "student": {}, "teacher": {}}, {}
    for nfe in student_nfe:
        x, _ = draw(student_sampler, student, dataset, n, nfe, seed)
        results["student"][str(nfe)] = score(x)
        pictures[f"DE-CM {nfe} NFE"] = x
    for nfe in teacher_nfe:
        x, _ = draw(teacher_sampler, teacher, dataset, n, nfe, seed)
        results["teacher"][str(nfe)] = score(x)
        pictures[f"teacher {nfe} steps"] = x
    with open(os.path.join(run_dir, "metrics.json"), "w") as f:
        json.dump(results, f, indent=2)
    save_picture(pictures, reference, os.path.join(run_dir, "samples.png"), images, dataset.num_classes)
    return results


def save_picture(pictures: dict, reference, path: str, images: bool, num_classes: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("data", reference)] + list(pictures.items())
    fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels), 2.8))
    for ax, (title, x) in zip(axes, panels):
        if images:
            k = max(num_classes, 1)
            grid = x[: 8 * k].clamp(-1, 1)
            rows = grid.reshape(8, k, *grid.shape[1:]) if len(grid) == 8 * k else grid[:64].reshape(8, 8, *grid.shape[1:])
            tile = torch.cat([torch.cat(list(r), dim=-1) for r in rows], dim=-2)
            ax.imshow(tile[0].numpy(), cmap="gray", vmin=-1, vmax=1)
        else:
            pts = x[:2000].numpy()
            ax.scatter(pts[:, 0], pts[:, 1], s=1, alpha=0.5)
            ax.set_xlim(-3, 3)
            ax.set_ylim(-3, 3)
            ax.set_aspect("equal")
        ax.set_title(title, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
