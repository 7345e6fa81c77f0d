"""Fault tolerance: SIGKILL at random steps, corrupt checkpoints, NaN injection, failed checkpoint
writes, corrupted sweep trial directories. Every test names the number it checks."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import assert_same_state, newest_checkpoint_step

from decm import checkpoint
from decm.method.objective import decm_objective
from decm.tracking import read_stats
from decm.train import TrainingDiverged, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["experiment.stages = ('distill',)", "distill/train.steps = 90", "distill/train.batch_size = 32",
        "distill/train.ckpt_every_steps = 7", "distill/train.log_every_steps = 1", "train.progress = False",
        "backbones.mlp.width = 32", "backbones.mlp.depth = 1"]


def launch_cmd(run_dir):
    cmd = [sys.executable, "-m", "decm.launch", "--gin", "gin/toy2d_exact_teacher.gin", "--run-dir", run_dir]
    for b in TINY:
        cmd += ["--bind", b]
    return cmd



def test_sigkill_three_times_at_random_steps_then_resume_is_bit_identical(tmp_path):
    ref, run = str(tmp_path / "ref"), str(tmp_path / "killed")
    assert subprocess.run(launch_cmd(ref), cwd=ROOT, capture_output=True).returncode == 0
    rng = random.Random(1234)
    kills = []
    for k in range(3):
        proc = subprocess.Popen(launch_cmd(run), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        target = newest_checkpoint_step(run) + rng.choice([7, 14])
        deadline = time.time() + 120
        while newest_checkpoint_step(run) < target and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 0.15))  # somewhere between checkpoints
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills.append(newest_checkpoint_step(run))
    assert len(kills) == 3 and kills[-1] < 90, kills
    assert subprocess.run(launch_cmd(run), cwd=ROOT, capture_output=True).returncode == 0
    a = checkpoint.latest_valid(os.path.join(ref, "checkpoints"))[1]
    b = checkpoint.latest_valid(os.path.join(run, "checkpoints"))[1]
    assert a["step"] == b["step"] == 90
    assert_same_state(a, b)  # parameters, EMA, optimizer moments, objective state, counters
    sa, sb = read_stats(ref), read_stats(run)
    assert [r["step"] for r in sb] == list(range(1, 91))  # 90 records, none duplicated or missing
    assert sa == sb


def test_corrupt_checkpoints_fall_back_to_the_newest_valid_and_delete_nothing(tmp_path):
    d = str(tmp_path / "ck")
    for step in (1, 2, 3):
        checkpoint.save(d, step, {"step": step, "w": torch.full((3,), float(step))})
    with open(checkpoint.path_for(d, 3), "r+b") as f:  # truncated newest
        f.truncate(10)
    path, state = checkpoint.latest_valid(d)
    assert state["step"] == 2
    os.remove(checkpoint.path_for(d, 2)[:-3] + ".ok")  # missing sentinel
    path, state = checkpoint.latest_valid(d)
    assert state["step"] == 1
    assert sorted(os.listdir(d)) == ["ckpt-00000001.ok", "ckpt-00000001.pt", "ckpt-00000002.pt",
                                     "ckpt-00000003.ok", "ckpt-00000003.pt"]  # 5 files: nothing deleted


def test_failed_checkpoint_write_is_a_clear_error_and_keeps_the_previous(tmp_path, monkeypatch):
    d = str(tmp_path / "ck")
    checkpoint.save(d, 1, {"step": 1})

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(checkpoint.CheckpointWriteError, match="No space left on device"):
        checkpoint.save(d, 2, {"step": 2})
    monkeypatch.undo()
    assert checkpoint.latest_valid(d)[1]["step"] == 1
    assert sorted(os.listdir(d)) == ["ckpt-00000001.ok", "ckpt-00000001.pt"]  # no temp file left


class NaNTeacher(torch.nn.Module):
    """Wraps a teacher: NaN for every 4th sample ('some') or for everything after `after` calls."""

    def __init__(self, teacher, mode, after=0):
        super().__init__()
        self.teacher, self.mode, self.after, self.calls = teacher, mode, after, 0
        self.num_classes = getattr(teacher, "num_classes", 0)

    def forward(self, x, t, y=None):
        v = self.teacher(x, t, y)
        self.calls += 1
        if self.mode == "some":
            v = v.clone()
            v[::4] = float("nan")
        elif self.calls > self.after:
            v = torch.full_like(v, float("nan"))
        return v


class Injected:
    def __init__(self, mode, after=0):
        from decm.data.builtin import GaussianMixture2D

        self.base = GaussianMixture2D()
        self.shape, self.num_classes, self.mode, self.after = self.base.shape, 0, mode, after

    def batch(self, n, g=None):
        return self.base.batch(n, g)

    def analytic_teacher(self):
        return NaNTeacher(self.base.analytic_teacher(), self.mode, self.after)


def run_injected(run_dir, mode, after=0, steps=12):
    from decm.models.mlp import mlp

    return train(str(run_dir), stage="distill", dataset=Injected(mode, after),
                 backbone=lambda **k: mlp(width=16, depth=1, **k), objective=decm_objective(),
                 teacher_source="analytic", steps=steps, batch_size=16, ckpt_every_steps=4, log_every_steps=1,
                 max_consecutive_bad_steps=3, progress=False)


def test_nan_in_some_samples_is_masked_and_counted_in_stats(tmp_path):
    summary = run_injected(tmp_path / "some", "some")
    stats = read_stats(str(tmp_path / "some"))
    assert summary["step"] == 12 and summary["totals"]["skipped_steps"] == 0
    assert stats[-1]["nan/masked_total"] == summary["totals"]["nan_masked_samples"] > 0
    assert all(torch.isfinite(torch.tensor(r["loss/total"])) for r in stats)


def test_persistent_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    # the analytic teacher is called 1-3 times per step; after 20 calls every target is NaN
    with pytest.raises(TrainingDiverged, match="consecutive non-finite steps"):
        run_injected(tmp_path / "bad", "after", after=20, steps=40)
    path, state = checkpoint.latest_valid(str(tmp_path / "bad" / "checkpoints"))
    assert state is not None and 4 <= state["step"] <= 20 and state["step"] % 4 == 0  # a checkpoint before the NaNs
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    stats = read_stats(str(tmp_path / "bad"))
    assert stats[-1]["nan/skipped_total"] >= 1  # the skipped steps are counted in stats.jsonl


def test_corrupted_sweep_trial_directory_does_not_crash_the_worker(tmp_path):
    import optuna

    from decm import sweep

    spec = sweep.SweepSpec(("sweeps/toy2d_sweep.gin",),
                           ("distill/train.steps = 6", "backbones.mlp.width = 16", "evaluate.n_samples = 200",
                            "evaluate.student_nfe = (1,)", "wandb.enabled = False"),
                           {"losses.n2n_loss.lam": {"type": "float", "low": 0.0, "high": 1.0}},
                           str(tmp_path / "sw"), "c", trials=1)
    trial_dir = tmp_path / "sw" / "trials" / "trial-0000"
    (trial_dir / "checkpoints").mkdir(parents=True)
    (trial_dir / "checkpoints" / "ckpt-00000005.pt").write_bytes(b"garbage")
    (trial_dir / "checkpoints" / "ckpt-00000005.ok").write_text("999\n")
    (trial_dir / "stats.jsonl").write_text('{"step": 1, "loss/total": 1.0}\n{"step": 2, "lo')  # torn line
    (trial_dir / "config.gin").write_text("this is not gin\n")
    assert sweep.worker(spec) == 1
    study = optuna.load_study(study_name="c", storage=sweep.storage_for(spec))
    assert [t.state for t in study.get_trials()] == [optuna.trial.TrialState.COMPLETE]
    assert json.loads((trial_dir / "metrics.json").read_text())["student"]["1"]["sw2"] > 0
