"""End-to-end launches: run directory contents, exact resume, dry run, bad input → exit 2."""

import json
import os
import subprocess
import sys

import pytest
import torch

from decm import checkpoint
from decm.launch import main
from decm.tracking import read_stats

TINY = [
    "experiment.stages = ('distill',)",
    "distill/train.steps = 12",
    "distill/train.batch_size = 32",
    "distill/train.ckpt_every_steps = 4",
    "distill/train.log_every_steps = 1",
    "train.progress = False",
    "backbones.mlp.width = 32",
    "backbones.mlp.depth = 1",
]


def launch(tmp_path, name, extra=(), gin_file="gin/toy2d_exact_teacher.gin"):
    run_dir = str(tmp_path / name)
    argv = ["--gin", gin_file, "--run-dir", run_dir]
    for b in list(TINY) + list(extra):
        argv += ["--bind", b]
    return main(argv), run_dir


def final_state(run_dir):
    path, state = checkpoint.latest_valid(os.path.join(run_dir, "checkpoints"))
    return state


def test_tiny_launch_writes_run_directory(tmp_path):
    rc, run_dir = launch(tmp_path, "a")
    assert rc == 0
    for name in ("config.gin", "operative_config.gin", "stats.jsonl", "summary.json", "gin/bindings.gin"):
        assert os.path.exists(os.path.join(run_dir, name)), name
    assert [r["step"] for r in read_stats(run_dir)] == list(range(1, 13))
    state = torch.load(checkpoint.path_for(os.path.join(run_dir, "checkpoints"), 12), weights_only=True)
    assert state["step"] == 12
    operative = open(os.path.join(run_dir, "operative_config.gin")).read()
    assert "n2n_loss.lam = 0.5" in operative and "terms = " in operative


def test_resume_is_bit_identical_to_uninterrupted(tmp_path):
    rc, full = launch(tmp_path, "full")
    assert rc == 0
    # Same command, stopped after 5 steps (checkpoint at 5), then rerun to the end.
    rc, part = launch(tmp_path, "part", ["distill/train.stop_after_steps = 5"])
    assert rc == 0 and final_state(part)["step"] == 5
    rc, part = launch(tmp_path, "part", ["distill/train.stop_after_steps = 5"])  # resumes 5 → 10
    rc, part = launch(tmp_path, "part", ["distill/train.stop_after_steps = 5"])  # resumes 10 → 12
    a, b = final_state(full), final_state(part)
    assert b["step"] == 12
    for key in ("model", "ema"):
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), (key, k)
    assert json.dumps(a["optimizer"]["state"], default=lambda t: t.tolist()) == \
        json.dumps(b["optimizer"]["state"], default=lambda t: t.tolist())
    assert read_stats(full) == read_stats(part)


def test_resume_with_different_config_is_refused_unless_forced(tmp_path, capsys):
    rc, run_dir = launch(tmp_path, "a")
    rc2, _ = launch(tmp_path, "a", ["losses.n2n_loss.lam = 0.25"])
    assert rc2 == 2
    err = capsys.readouterr().err
    assert "different gin config" in err and "n2n_loss.lam: 0.5 → 0.25" in err
    argv = ["--gin", "gin/toy2d_exact_teacher.gin", "--run-dir", run_dir, "--force"]
    for b in TINY + ["losses.n2n_loss.lam = 0.25"]:
        argv += ["--bind", b]
    assert main(argv) == 0


def test_dry_run_trains_nothing(tmp_path, capsys):
    run_dir = str(tmp_path / "dry")
    assert main(["--gin", "gin/toy2d_exact_teacher.gin", "--run-dir", run_dir, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "distill/train.steps" in out and '"parameters"' in out
    assert not os.path.exists(run_dir)


@pytest.mark.parametrize("argv,needle", [
    (["--gin", "gin/does_not_exist.gin"], "gin file not found"),
    (["--gin", "gin/toy2d_exact_teacher.gin", "--bind", "train.no_such_arg = 3"], "no_such_arg"),
    (["--gin", "gin/toy2d_exact_teacher.gin", "--bind", "train.dataset = @datasets.no_such_dataset()"], "no_such_dataset"),
    (["--gin", "gin/toy2d_exact_teacher.gin", "--bind", "this is not gin"], "bad gin config"),
    (["--gin", "gin/toy2d_exact_teacher.gin", "--bind", "losses.cm_loss.target = 'wrong'"], "cm_loss.target"),
    (["--gin", "gin/quickstart.gin", "--bind", "datasets.digits.image_size = 9"], "not divisible by patch_size"),
    (["--gin", "gin/toy2d_exact_teacher.gin", "--bind", "distill/train.steps = 'many'"], "train.steps must be an integer"),
    (["--gin", "gin/toy2d_exact_teacher.gin", "--bind", "distill/train.batch_size = 0"], "train.batch_size must be ≥ 1"),
    (["--gin", "gin/decm_xl.gin", "--bind", "datasets.latents.path = '/nonexistent/in256'"], "set datasets.latents.path"),
    (["--gin", "gin/toy2d_exact_teacher.gin", "--backend", "slurm", "--bind", "cluster.nodes = 0"], "cluster.nodes must be ≥ 1"),
    (["--gin", "gin/ablations/fm_cd.gin"], "is an ablation diff, not an experiment: put a benchmark gin before it"),
    (["--gin", "gin/toy2d_exact_teacher.gin", "--bind", "losses.n2n_loss.form = 'discrete'",
      "--bind", "losses.n2n_loss.lam = 0.0"], "lam not used by form='discrete'"),
    (["--gin", "gin/toy2d_exact_teacher.gin", "--bind", "losses.cm_supervised.robust_c = 1.0"], "robust_c"),
    (["--gin", "gin/decm_xl.gin"], "2 missing input(s): (1) latents path is not set"),
    (["--gin", "gin/decm_xl.gin", "--bind", "experiment.teacher_dir = '/nonexistent/teacher.pt'"],
     "2 missing input(s): (1) latents path is not set"),  # the teacher once, not twice
    (["--gin", "gin/toy2d_exact_teacher.gin", "--bind", "distill/train.stpes = 3"], "did you mean 'steps'"),
    (["--gin", "gin/toy2d_exact_teacher.gin", "--bind", "losses.cm_los.target = 'x'"], "did you mean 'losses.cm_loss'"),
    (["--gin", "gin/toy2d_exact_teacher.gin", "--bind", "objectives.objective.time_sampler = @time_samplers.logitnormal()"],
     "did you mean '@time_samplers.logit_normal()'"),
    (["--gin", "gin/toy2d_exact_teacher.gin", "--bind", "objectives.objective.time_sampler = @logitnormal()"],
     "did you mean '@time_samplers.logit_normal()'"),
])
def test_bad_input_one_line_exit_2_no_run_dir(tmp_path, argv, needle):
    run_dir = tmp_path / "bad"
    proc = subprocess.run([sys.executable, "-m", "decm.launch", *argv, "--run-dir", str(run_dir)],
                          capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert proc.returncode == 2, proc.stderr
    err_lines = [l for l in proc.stderr.splitlines() if l.startswith("decm.launch: error:")]
    assert len(err_lines) == 1 and needle in err_lines[0], proc.stderr
    assert "In call to configurable" not in err_lines[0] and "<function" not in err_lines[0]  # no gin noise
    assert not run_dir.exists()


def test_xl_launch_names_every_missing_input_with_its_bind_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "decm.launch", "--gin", "gin/decm_xl.gin", "--run-dir",
                           str(tmp_path / "xl")], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(__file__)))
    assert proc.returncode == 2
    line = proc.stderr.strip().splitlines()[-1]
    for needle in ("--bind \"datasets.latents.path = '/path/to/latents'\"",
                   "--bind \"experiment.teacher_dir = '/path/to/teacher.pt'\"", "--dry-run"):
        assert needle in line, line
    assert not (tmp_path / "xl").exists()


def test_slurm_backend_without_slurm_is_one_line_and_creates_nothing(tmp_path):
    env = dict(os.environ, PATH=str(tmp_path))  # no sbatch anywhere on PATH
    run_dir = tmp_path / "r"
    proc = subprocess.run([sys.executable, "-m", "decm.launch", "--gin", "gin/toy2d_exact_teacher.gin", "--backend",
                           "slurm", "--run-dir", str(run_dir)], capture_output=True, text=True, env=env,
                          cwd=os.path.dirname(os.path.dirname(__file__)))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("decm.launch: error: backend 'slurm' needs Slurm")
    assert "--backend local" in proc.stderr and "Traceback" not in proc.stderr
    assert not run_dir.exists()


def test_list_name_prints_parameters_with_defaults_and_docs(capsys):
    assert main(["--list", "train"]) == 0
    out = capsys.readouterr().out
    assert "  steps = 1000\n      total optimizer steps." in out and "  dataset = REQUIRED" in out
    assert main(["--list", "losses.cm_loss"]) == 0
    assert "  tangent_norm = 'rms'" in capsys.readouterr().out
    assert main(["--list"]) == 0
    out = capsys.readouterr().out
    assert all(f"\n  {name} " in out for name in ("train", "evaluate", "wandb", "cluster", "experiment"))
    assert main(["--list", "trian"]) == 2
    assert "did you mean 'train'" in capsys.readouterr().err


def test_list_prints_every_kind():
    proc = subprocess.run([sys.executable, "-m", "decm.launch", "--list"], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(__file__)))
    assert proc.returncode == 0
    for needle in ("time_samplers:", "uniform_segmented", "n2n_loss", "tangent_note", "cfg", "chain", "sit", "digits"):
        assert needle in proc.stdout


def test_bf16_training_runs_and_stays_finite(tmp_path):
    code, run_dir = launch(tmp_path, "bf16", ["distill/train.precision = 'bf16'", "distill/train.steps = 6"])
    assert code == 0
    stats = read_stats(run_dir)
    assert stats and all(torch.isfinite(torch.tensor(r["loss/total"])) for r in stats)


def test_progress_in_a_log_file_is_plain_lines(tmp_path):
    """Not a terminal: one plain line per log period, no carriage-return frames, no W&B summary."""
    run_dir = tmp_path / "log"
    argv = [sys.executable, "-m", "decm.launch", "--gin", "gin/toy2d_exact_teacher.gin", "--run-dir", str(run_dir)]
    for b in TINY[:-3] + ["distill/train.log_every_steps = 4", "train.progress = True", "backbones.mlp.width = 16",
                          "evaluate.n_samples = 100", "evaluate.student_nfe = (1,)", "evaluate.teacher_nfe = ()"]:
        argv += ["--bind", b]
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)),
                          env=dict(os.environ, WANDB_MODE="offline"))
    assert proc.returncode == 0, proc.stderr
    assert "\r" not in proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.startswith("[decm] distill step")]
    assert [l.split()[3] for l in lines] == ["4/12", "8/12", "12/12"], lines
    assert "loss" in lines[-1] and "it/s" in lines[-1]
    assert all(", ETA " in l for l in lines[:-1]) and "ETA" not in lines[-1]  # time left, until the end
    wandb_lines = [l for l in (proc.stdout + proc.stderr).splitlines() if "wandb" in l.lower()]
    assert len(wandb_lines) == 1 and "wandb sync" in wandb_lines[0], wandb_lines


def test_teacher_cache_key_ignores_distillation_settings_and_follows_teacher_ones():
    """Every ablation row distils from the same cached teacher; anything that changes the teacher
    (its steps, the data, the width, its label dropout) changes the key."""
    from decm.experiment import teacher_key
    from decm.job import parse

    def key(*extra, row="decm"):
        parse(["gin/toy2d_cond.gin", f"gin/ablations/{row}.gin"], ["distill/train.seed = 3", *extra])
        return teacher_key()

    base = key()
    assert {key(row=r) for r in ("fm_only", "fm_cd", "fm_n2n", "scm", "meanflow", "cd_only", "lambda0")} == {base}
    assert key("distill/train.lr = 0.1", "losses.cm_loss.target = 'plain'", "guidance.cfg.scale = 3.0") == base
    assert key("train.progress = False") == key("train.progress = True") == base  # display only
    for teacher_setting in ("teacher/train.steps = 10", "backbones.mlp.width = 64", "train.batch_size = 8",
                            "objectives.flow_matching_pretrain.label_dropout = 0.2",
                            "datasets.gaussian_mixture_2d.std = 0.2"):
        assert key(teacher_setting) != base, teacher_setting
