"""No work lost or hidden: Ctrl-C writes a checkpoint and exits 130, a launch says at start whether it
resumes, a skipped checkpoint is named with its reason, an unreachable Slurm controller is one line."""

import os
import signal
import subprocess
import sys
import time

from decm import checkpoint, launch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["experiment.stages = ('distill',)", "distill/train.batch_size = 16", "train.progress = False",
        "backbones.mlp.width = 16", "backbones.mlp.depth = 1"]


def argv(run_dir, *bindings, gin="gin/toy2d_exact_teacher.gin"):
    out = ["--gin", gin] + (["--run-dir", run_dir] if run_dir else [])
    for b in TINY + list(bindings):
        out += ["--bind", b]
    return out


def test_ctrl_c_writes_a_checkpoint_at_the_step_boundary_and_exits_130(tmp_path):
    run_dir = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "decm.launch"] + argv(
        run_dir, "distill/train.steps = 1000000", "distill/train.ckpt_every_steps = 1000000",
        "distill/train.log_every_steps = 1")
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def ctrl_c_as_in_a_terminal():  # a suite started in the background inherits SIGINT ignored: undo that
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=ctrl_c_as_in_a_terminal)
    try:
        stats = os.path.join(run_dir, "stats.jsonl")
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline and (
                not os.path.exists(stats) or sum(1 for _ in open(stats)) < 20):
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:  # never leave a million-step run behind
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("decm.launch: interrupted at step ") and last.endswith("; rerun the same command to resume")
    step = int(last.split("interrupted at step ")[1].split(";")[0])
    assert step >= 20
    path, state = checkpoint.latest_valid(os.path.join(run_dir, "checkpoints"))
    assert path == checkpoint.path_for(os.path.join(run_dir, "checkpoints"), step) and state["step"] == step
    assert "Traceback" not in err


def test_launch_says_new_run_or_resume_and_how_to_continue_a_run_of_the_same_gin(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # default run directories: runs/<gin stem>[-<bindings hash>]
    os.symlink(os.path.join(ROOT, "gin"), "gin")
    assert launch.main(argv(None, "distill/train.steps = 6")) == 0
    assert "[decm] new run in runs/toy2d_exact_teacher-" in capsys.readouterr().err
    first = launch.default_run_dir(["gin/toy2d_exact_teacher.gin"], TINY + ["distill/train.steps = 6"])
    assert launch.main(argv(None, "distill/train.steps = 6")) == 0
    assert f"[decm] resuming {first} from step 6\n" in capsys.readouterr().err
    assert launch.main(argv(None, "distill/train.steps = 8")) == 0  # a changed binding: another directory
    err = capsys.readouterr().err
    second = launch.default_run_dir(["gin/toy2d_exact_teacher.gin"], TINY + ["distill/train.steps = 8"])
    assert f"[decm] new run in {second}\n" in err
    assert f"[decm] {first} holds a run of the same gin file (at step 6) with other bindings; to continue it " \
           f"with these bindings instead, add --run-dir {first} --force" in err
    # the hint's command extends the finished run
    assert launch.main(argv(first, "distill/train.steps = 8") + ["--force"]) == 0
    assert f"[decm] resuming {first} from step 6\n" in capsys.readouterr().err
    assert checkpoint.latest_valid(os.path.join(first, "checkpoints"))[1]["step"] == 8


def test_a_skipped_corrupt_checkpoint_is_named_with_its_reason(tmp_path, capsys):
    run_dir = str(tmp_path / "run")
    bind = ["distill/train.steps = 10", "distill/train.ckpt_every_steps = 5"]
    assert launch.main(argv(run_dir, *bind)) == 0
    newest = checkpoint.path_for(os.path.join(run_dir, "checkpoints"), 10)
    size = os.path.getsize(newest)
    with open(newest, "r+b") as f:
        f.truncate(size // 2)
    capsys.readouterr()
    assert launch.main(argv(run_dir, *bind)) == 0
    err = capsys.readouterr().err
    assert f"[decm] resuming {run_dir} from step 5\n" in err
    assert (f"[decm] skipping checkpoint {newest}: {size // 2} bytes where its sentinel records {size} "
            "(truncated or overwritten)") in err
    assert os.path.exists(newest)  # reported, never deleted


def test_slurm_backend_with_an_unreachable_controller_is_one_line_exit_2_and_creates_nothing(tmp_path, capsys,
                                                                                          monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("sbatch", "sinfo"):  # what Slurm's clients print when slurmctld cannot be reached
        (bin_dir / name).write_text(
            "#!/bin/sh\necho 'slurm_load_partitions: Unable to contact slurm controller (connect failure)' >&2\n"
            "exit 1\n")
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    run_dir = str(tmp_path / "run")
    assert launch.main(argv(run_dir, "distill/train.steps = 5") + ["--backend", "slurm"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("decm.launch: error: backend 'slurm': the Slurm controller does not "
                                               "answer (sinfo: slurm_load_partitions: Unable to contact"), err
    assert not os.path.exists(run_dir)


def test_ctrl_c_in_a_sweep_trial_leaves_it_waiting_and_a_rerun_resumes_the_same_trial(tmp_path, monkeypatch):
    from optuna.trial import TrialState

    from decm import preemption, sweep

    spec = sweep.SweepSpec(("gin/toy2d_exact_teacher.gin",), (), {"distill/train.lr": {
        "type": "float", "low": 1e-4, "high": 1e-2, "log": True}}, str(tmp_path / "sw"), "t", trials=1)
    seen = []

    def interrupted(spec_, study, trial):  # the trial's training loop saw Ctrl-C and wrote its checkpoint
        seen.append((trial.number, trial.suggest_float("distill/train.lr", 1e-4, 1e-2, log=True)))
        raise preemption.Interrupted(7, "ckpt")

    monkeypatch.setattr(sweep, "run_trial", interrupted)
    try:
        sweep.worker(spec)
    except preemption.Interrupted:
        pass
    else:
        raise AssertionError("the interrupt must reach the command (exit 130)")
    study = sweep.load_study(spec)
    assert [t.state for t in study.get_trials()] == [TrialState.WAITING]  # neither FAIL nor a dangling RUNNING
    assert sweep.reap(study) == []

    def resumed(spec_, study, trial):
        seen.append((trial.number, trial.suggest_float("distill/train.lr", 1e-4, 1e-2, log=True)))
        return 0.5

    monkeypatch.setattr(sweep, "run_trial", resumed)
    assert sweep.worker(spec) == 1
    assert seen[1] == seen[0]  # the same trial: number (so run directory) and parameters
    assert [(t.number, t.state) for t in sweep.load_study(spec).get_trials()] == [(0, TrialState.COMPLETE)]
