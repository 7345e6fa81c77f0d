"""The run-directory lock: a second launch into a live run is refused (exit 2, holder named); a lock
left by a killed process does not block the resume."""

import os
import signal
import subprocess
import sys
import time

import pytest

from decm import run_lock
from decm.launch import main

ROOT = os.path.dirname(os.path.dirname(__file__))
TINY = ["experiment.stages = ('distill',)", "distill/train.steps = 4", "distill/train.batch_size = 16",
        "train.progress = False", "backbones.mlp.width = 16", "backbones.mlp.depth = 1", "evaluate.n_samples = 100",
        "wandb.enabled = False"]


def argv(run_dir):
    out = ["--gin", "gin/toy2d_exact_teacher.gin", "--run-dir", str(run_dir)]
    for b in TINY:
        out += ["--bind", b]
    return out


def hold_in_subprocess(run_dir):
    code = ("import sys, time; from decm import run_lock\n"
            f"with run_lock.hold({str(run_dir)!r}):\n    print('ready', flush=True); time.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def test_second_launch_is_refused_naming_the_holder_and_a_killed_holder_does_not_block(tmp_path, capsys):
    run_dir = tmp_path / "run"
    holder = hold_in_subprocess(run_dir)
    try:
        assert main(argv(run_dir)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("decm.launch: error:")
        assert f"in use by pid {holder.pid} on host" in err[0]
        assert not (run_dir / "checkpoints").exists() and not (run_dir / "config.gin").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert f"pid {holder.pid}" in (run_dir / ".lock").read_text()  # the stale file is still there …
    assert main(argv(run_dir)) == 0  # … and does not block
    assert (run_dir / "summary.json").exists()


def test_lock_is_held_for_the_run_and_released_after():
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        with run_lock.hold(d):
            with pytest.raises(run_lock.RunLocked, match=f"in use by pid {os.getpid()}"):
                run_lock.check_free(d)
        run_lock.check_free(d)  # released


def test_two_concurrent_launches_one_trains(tmp_path):
    """The same command twice at once: exactly one trains, the other exits 2."""
    run_dir = tmp_path / "twice"
    cmd = [sys.executable, "-m", "decm.launch"] + argv(run_dir)[:-2] + ["--bind", "distill/train.steps = 300",
                                                                          "--bind", "wandb.enabled = False"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    first = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 60
    while time.time() < deadline and not (run_dir / "stats.jsonl").exists():
        time.sleep(0.1)
    second = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert second.returncode == 2 and f"in use by pid {first.pid}" in second.stderr
