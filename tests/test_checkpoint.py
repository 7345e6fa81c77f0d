"""Single-file checkpoints: keep_last prunes the oldest valid ones, resume picks the newest valid one,
and a checkpoint whose size differs from its sentinel is not valid."""

import os

import torch

from decm import checkpoint


def state(step):
    return {"step": step, "w": torch.full((4,), float(step))}


def test_keep_last_keeps_the_newest_and_resume_takes_the_newest_valid(tmp_path):
    d = str(tmp_path)
    for step in (1, 2, 3, 4):
        checkpoint.save(d, step, state(step), keep_last=2)
    assert [checkpoint.step_of(p) for p in checkpoint.candidates(d)] == [4, 3]
    path, loaded = checkpoint.latest_valid(d, verbose=False)
    assert checkpoint.step_of(path) == 4 and float(loaded["w"][0]) == 4.0
    # a truncated newest file no longer matches its sentinel: skipped, kept on disk, step 3 is resumed
    newest = checkpoint.path_for(d, 4)
    with open(newest, "r+b") as f:
        f.truncate(os.path.getsize(newest) // 2)
    assert not checkpoint.is_valid(newest, load=False)
    path, loaded = checkpoint.latest_valid(d, verbose=False)
    assert checkpoint.step_of(path) == 3 and os.path.exists(newest)


def test_keep_last_never_counts_a_newer_step_against_the_one_saved(tmp_path):
    """A resume that skipped a newer (unreadable) checkpoint saves an older step: keep_last = 1 keeps the
    step just written and leaves the newer file alone."""
    d = str(tmp_path)
    checkpoint.save(d, 5, state(5))
    checkpoint.save(d, 2, state(2))
    checkpoint.save(d, 3, state(3), keep_last=1)
    assert [checkpoint.step_of(p) for p in checkpoint.candidates(d)] == [5, 3]
