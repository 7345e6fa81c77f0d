"""Model and teacher construction, shared by training, evaluation, analysis and the benchmarks.

Everything that builds a backbone for a dataset, loads a teacher's weights or makes the flow-map
student from a teacher lives here, so that evaluation and benchmarks never import the training loop.
"""

from __future__ import annotations

import os

from decm import checkpoint


def backbone_kwargs(dataset) -> dict:
    """Arguments a backbone factory takes from the dataset (images: size/channels; vectors: dim)."""
    shape = tuple(dataset.shape)
    if len(shape) == 3:
        return dict(input_size=shape[-1], in_channels=shape[0], num_classes=dataset.num_classes)
    return dict(dim=shape[0], num_classes=dataset.num_classes)


TEACHER_SOURCES = ("analytic", "checkpoint", "sit", "lightningdit")


def load_network_teacher(backbone, dataset, teacher_source: str, teacher_checkpoint: str, device,
                         collective: bool = False):
    """Builds the velocity backbone and loads the teacher's weights.

    'checkpoint': the EMA of the newest valid checkpoint of a decm teacher run (dir or checkpoints dir);
    'sit' / 'lightningdit': an official checkpoint file (decm.models.official: names and shapes checked).
    `collective=True` (every rank of a process group calls it): the checkpoint (of either source) is read
    by rank 0 alone and broadcast to the others (decm.one_reader).
    """
    net = backbone(**backbone_kwargs(dataset), flow_map=False)
    if teacher_source in ("sit", "lightningdit"):
        from decm.models.official import load_official

        load_official(teacher_checkpoint, net, teacher_source, collective=collective)
        return net.to(device)
    directory = os.path.join(teacher_checkpoint, "checkpoints") if os.path.isdir(
        os.path.join(teacher_checkpoint, "checkpoints")) else teacher_checkpoint
    path, state = checkpoint.latest_valid(directory, collective=collective)
    if state is None:
        raise FileNotFoundError(f"no valid teacher checkpoint in {directory!r} (set experiment.teacher_dir)")
    net.load_state_dict(state["ema"])
    return net.to(device)


def student_from_teacher(backbone, dataset, teacher_net):
    """Flow-map student = teacher weights + a zero-initialised s-embedder (F = v at init for all s)."""
    student = backbone(**backbone_kwargs(dataset), flow_map=True)
    missing, unexpected = student.load_state_dict(teacher_net.state_dict(), strict=False)
    bad = [k for k in missing if not k.startswith("s_embedder.")]
    if bad or unexpected:
        raise RuntimeError(f"student/teacher mismatch: missing {bad}, unexpected {unexpected}")
    return student
