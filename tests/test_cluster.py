"""Backends without a scheduler: the XL dry run with its sbatch script, cluster bindings, and
preemption through submitit's local executor (signal → save at a step boundary → requeue → exact resume)."""

import glob
import os
import signal
import time

import pytest
from conftest import assert_same_state, newest_checkpoint_step

from decm import checkpoint, launch
from decm.cluster import ClusterSpec, submit
from decm.job import RunSpec, parse, prepare, run

PREEMPT = [
    "experiment.stages = ('distill',)",
    "distill/train.steps = 800",
    "distill/train.batch_size = 32",
    "distill/train.ckpt_every_steps = 50",
    "distill/train.log_every_steps = 10",
    "train.progress = False",
    "backbones.mlp.width = 32",
    "backbones.mlp.depth = 1",
]


def test_xl_dry_run_prints_params_config_and_sbatch_script(tmp_path, capsys):
    run_dir = tmp_path / "xl"
    assert launch.main(["--gin", "gin/decm_xl.gin", "--dry-run", "--run-dir", str(run_dir),
                        "--bind", "cluster.partition = 'gpu'", "--bind", "cluster.account = 'proj'",
                        "--bind", "cluster.extra_sbatch = {'exclusive': True}"]) == 0
    out = capsys.readouterr().out
    assert '"parameters": 676881056' in out                           # ≈675M LightningDiT-XL/1 + the s-embedder
    assert "sit.preset = 'LightningDiT-XL/1'" in out                   # the resolved config: the paper's setup
    for line in ("#SBATCH --gpus-per-node=8", "#SBATCH --ntasks-per-node=8", "#SBATCH --signal=USR2@180",
                 "#SBATCH --partition=gpu", "#SBATCH --account=proj", "#SBATCH --exclusive", "srun --unbuffered"):
        assert line in out, line
    assert "set datasets.latents.path" in out                          # missing inputs are listed, not fatal
    assert not run_dir.exists()


def test_multinode_fsdp_dry_run_prints_the_sbatch_script_and_the_per_gpu_estimate(tmp_path, capsys):
    from decm import memory
    from decm.models.sit import sit

    argv = ["--gin", "gin/decm_xl.gin", "--gin", "gin/cluster/slurm_multinode_example.gin", "--dry-run",
            "--run-dir", str(tmp_path / "xl")]
    assert launch.main(argv) == 0
    out = capsys.readouterr().out
    assert "#SBATCH --nodes=2" in out and "#SBATCH --ntasks-per-node=8" in out and "#SBATCH --gpus-per-node=8" in out
    import torch

    with torch.device("meta"):
        student = memory.shard_profile(sit("LightningDiT-XL/1", input_size=16, in_channels=32, num_classes=1000))
        teacher = memory.shard_profile(sit("LightningDiT-XL/1", input_size=16, in_channels=32, num_classes=1000,
                                           flow_map=False))
    line = next(line for line in out.splitlines() if line.startswith("# distill: per-rank training state"))
    assert line == "# distill: " + memory.describe(student, 16, "fsdp", teacher, True, 2)  # 2 post-hoc EMA profiles
    assert "fsdp over 16 ranks" in line and "params 0.17 GB" in line  # 677M × 4 B / 16
    assert "post-hoc EMA 2 × 0.17 GB" in line
    assert not (tmp_path / "xl").exists()


def test_fsdp_in_one_process_is_a_one_line_error_before_anything_runs(tmp_path, capsys):
    argv = ["--gin", "gin/toy2d_exact_teacher.gin", "--dry-run", "--bind", "train.parallel = 'fsdp'"]
    assert launch.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs several processes" in err


def test_xl_dry_run_shows_the_papers_setup(capsys):
    assert launch.main(["--gin", "gin/decm_xl.gin", "--dry-run", "--backend", "local"]) == 0
    out = capsys.readouterr().out
    assert '"parameters": 676881056' in out and "[\n        32,\n        16,\n        16\n      ]" in out
    for line in ("sit.preset = 'LightningDiT-XL/1'", "distill/train.teacher_source = 'lightningdit'",
                 "cfg.scale = 1.75", "cfg.guided_channels = None", "cfg.interval = (0.125, 1.0)",
                 "latents.shape = (32, 16, 16)", "latents.flip = True", "evaluate.vae = 'vavae-f16d32'",
                 "n2n_loss.lam = 0.5", "n2n/term.every = 3", "distill/train.lr = 0.0001",
                 "distill/train.phema_sigma_rels = (0.05, 0.2)"):
        assert line in out, line


def test_sit_xl_dry_run_builds_sit_xl2_on_sd_vae_latents(capsys):
    assert launch.main(["--gin", "gin/decm_xl_sit.gin", "--dry-run", "--backend", "local"]) == 0
    out = capsys.readouterr().out
    assert '"parameters": 676753952' in out                           # ≈675M SiT-XL/2 + the s-embedder
    assert "sit.preset = 'XL/2'" in out and "latents.shape = (4, 32, 32)" in out and "cfg.guided_channels = 3" in out


@pytest.mark.parametrize("bind,needle", [
    ("cluster.backend = 'kubernetes'", "cluster.backend must be one of"),
    ("cluster.nodes = 0", "cluster.nodes must be ≥ 1"),
    ("cluster.gpus = 8", "cluster"),
])
def test_bad_cluster_bindings_are_one_line_errors(tmp_path, capsys, bind, needle):
    assert launch.main(["--gin", "gin/toy2d_exact_teacher.gin", "--run-dir", str(tmp_path / "r"), "--bind", bind]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]


def test_cluster_bindings_do_not_count_as_a_config_change(tmp_path):
    spec = RunSpec(("gin/toy2d_exact_teacher.gin",), tuple(PREEMPT), str(tmp_path / "r"))
    prepare(spec)
    prepare(RunSpec(spec.gin_files, spec.bindings + ("cluster.timeout_min = 5",), spec.run_dir))  # no refusal


def wait_for(predicate, timeout_s, what):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def task_pids(root_pid):
    """PIDs of the submitit task processes below `root_pid` (the local controller)."""
    out, todo = [], [root_pid]
    while todo:
        pid = todo.pop()
        for children in glob.glob(f"/proc/{pid}/task/*/children"):
            with open(children) as f:
                todo += [int(c) for c in f.read().split()]
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"submitit.core._submit" in f.read():
                    out.append(pid)
        except FileNotFoundError:
            pass
    return out



def test_local_subprocess_preemption_requeues_and_resumes_exactly(tmp_path):
    ref_dir, pre_dir = str(tmp_path / "reference"), str(tmp_path / "preempted")
    ref = RunSpec(("gin/toy2d_exact_teacher.gin",), tuple(PREEMPT), ref_dir)
    prepare(ref)
    run(ref)

    spec = RunSpec(("gin/toy2d_exact_teacher.gin",), tuple(PREEMPT), pre_dir)
    parse(spec.gin_files, spec.bindings)
    prepare(spec)
    job = submit(spec, ClusterSpec(backend="local-subprocess", timeout_min=10, signal_delay_s=5))
    wait_for(lambda: newest_checkpoint_step(pre_dir) >= 100, 120, "a checkpoint at step ≥ 100")
    pids = task_pids(job._process.pid)
    assert len(pids) == 1
    os.kill(pids[0], signal.SIGUSR2)  # what Slurm sends on preemption or before the time limit
    result = job.result()
    assert result["distill"]["step"] == 800
    log = "".join(open(p).read() for p in glob.glob(os.path.join(pre_dir, "submitit", "*", "*_0_log.*")))
    assert "caught signal SIGUSR2" in log and "preempted at step" in log and "Requeued job" in log
    assert "resuming distill from" in log
    a = checkpoint.latest_valid(os.path.join(ref_dir, "checkpoints"))[1]
    b = checkpoint.latest_valid(os.path.join(pre_dir, "checkpoints"))[1]
    assert a["step"] == b["step"] == 800
    assert_same_state(a, b)  # model, EMA, optimizer moments, objective state, counters


def test_local_subprocess_two_task_ddp_training(tmp_path):
    spec = RunSpec(("gin/toy2d_exact_teacher.gin",), tuple(PREEMPT[:1] + PREEMPT[2:] + ["distill/train.steps = 20"]),
                   str(tmp_path / "ddp"))
    parse(spec.gin_files, spec.bindings)
    prepare(spec)
    results = submit(spec, ClusterSpec(backend="local-subprocess", tasks_per_node=2, timeout_min=10)).results()
    d = [r["distill"] for r in results]
    assert [x["world_size"] for x in d] == [2, 2] and sorted(x["rank"] for x in d) == [0, 1]
    assert d[0]["param_checksum"] == d[1]["param_checksum"] and d[0]["step"] == 20
    assert checkpoint.latest_valid(os.path.join(spec.run_dir, "checkpoints"))[1]["step"] == 20
