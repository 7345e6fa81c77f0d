"""A real one-node Slurm (started by .ci/slurm.sh; SLURM_CONF exported): submission through submitit.

Under CI=true a missing Slurm is a failure, never a skip. Locally, start it with
`.ci/slurm.sh start && export SLURM_CONF=/tmp/decm-slurm/slurm.conf`.
"""

import glob
import os
import shutil
import subprocess
import time

import pytest
from conftest import assert_same_state

from decm import checkpoint, launch
from decm.cluster import ClusterSpec, submit
from decm.job import RunSpec, parse, prepare, run
from decm.tracking import read_stats

# One xdist worker runs them all, in order: the test Slurm is one node with 2 CPUs.
pytestmark = [pytest.mark.slurm, pytest.mark.xdist_group("slurm")]

TOY = [
    "experiment.stages = ('distill',)",
    "distill/train.batch_size = 32",
    "distill/train.log_every_steps = 10",
    "train.progress = False",
    "backbones.mlp.width = 32",
    "backbones.mlp.depth = 1",
]
SLURM = ClusterSpec(backend="slurm", cpus_per_task=1, timeout_min=20, signal_delay_s=30, job_name="decm-test")


@pytest.fixture(scope="module", autouse=True)
def slurm_up():
    ok = bool(os.environ.get("SLURM_CONF")) and shutil.which("sbatch") is not None
    if ok:
        try:
            out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20).stdout
            ok = "idle" in out or "mix" in out or "alloc" in out
        except (OSError, subprocess.SubprocessError):
            ok = False
    if not ok:
        msg = "no running Slurm (run .ci/slurm.sh start and export SLURM_CONF=/tmp/decm-slurm/slurm.conf)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)


def logs(run_dir):
    return "".join(open(p).read() for p in sorted(glob.glob(os.path.join(run_dir, "submitit", "*", "*_log.*"))))


def test_slurm_tiny_distillation_job_through_the_launcher(tmp_path, capsys):
    run_dir = str(tmp_path / "tiny")
    argv = ["--gin", "gin/toy2d_exact_teacher.gin", "--gin", "gin/cluster/ci_one_node.gin", "--run-dir", run_dir, "--wait"]
    for b in TOY + ["distill/train.steps = 40", "distill/train.ckpt_every_steps = 20"]:
        argv += ["--bind", b]
    assert launch.main(argv) == 0
    out = capsys.readouterr().out
    assert "submitted slurm job" in out and "distill: step 40/40" in out
    assert checkpoint.latest_valid(os.path.join(run_dir, "checkpoints"))[1]["step"] == 40
    assert "SLURM_JOB_ID" not in os.environ  # the test process itself is not a job
    assert "Job completed successfully" in logs(run_dir)


def test_slurm_two_task_ddp_job(tmp_path):
    run_dir = str(tmp_path / "ddp")
    spec = RunSpec(("gin/toy2d_exact_teacher.gin",), tuple(TOY + ["distill/train.steps = 30", "distill/train.ckpt_every_steps = 10"]),
                   run_dir)
    parse(spec.gin_files, spec.bindings)
    prepare(spec)
    job = submit(spec, ClusterSpec(**{**SLURM.__dict__, "tasks_per_node": 2}))
    results = job.results()
    assert len(results) == 2
    d0, d1 = results[0]["distill"], results[1]["distill"]
    assert d0["world_size"] == d1["world_size"] == 2 and {d0["rank"], d1["rank"]} == {0, 1}
    assert d0["step"] == d1["step"] == 30
    assert d0["param_checksum"] == d1["param_checksum"]  # DDP kept the replicas identical
    state = checkpoint.latest_valid(os.path.join(run_dir, "checkpoints"))[1]
    assert state["step"] == 30


def test_slurm_preemption_twice_requeues_and_ends_identical_to_an_uninterrupted_run(tmp_path):
    bindings = tuple(TOY + ["distill/train.steps = 800", "distill/train.ckpt_every_steps = 50"])
    ref = RunSpec(("gin/toy2d_exact_teacher.gin",), bindings, str(tmp_path / "reference"))
    prepare(ref)
    run(ref)

    spec = RunSpec(("gin/toy2d_exact_teacher.gin",), bindings, str(tmp_path / "preempted"))
    parse(spec.gin_files, spec.bindings)
    prepare(spec)
    job = submit(spec, SLURM)
    ckpt_dir = os.path.join(spec.run_dir, "checkpoints")
    for threshold in (100, 400):  # two preemptions: early, and after the first resume
        deadline = time.time() + 240
        while time.time() < deadline:
            path, _ = checkpoint.latest_valid(ckpt_dir)
            if path and int(os.path.basename(path)[5:13]) >= threshold:
                break
            time.sleep(0.2)
        else:
            raise AssertionError(f"no checkpoint at step ≥ {threshold} within 240 s:\n" + logs(spec.run_dir)[-3000:])
        job._interrupt()  # scancel --signal SIGTERM, then --signal USR2: Slurm's preemption sequence
    result = job.result()
    assert result["distill"]["step"] == 800
    text = logs(spec.run_dir)
    assert text.count("caught signal SIGUSR2") == 2 and text.count("preempted at step") == 2, text[-3000:]
    assert text.count("resuming distill from") == 2, text[-3000:]
    a = checkpoint.latest_valid(os.path.join(ref.run_dir, "checkpoints"))[1]
    b = checkpoint.latest_valid(ckpt_dir)[1]
    assert a["step"] == b["step"] == 800
    assert_same_state(a, b)  # model, EMA, optimizer moments, objective state, counters
    assert read_stats(ref.run_dir) == read_stats(spec.run_dir)  # no duplicated or missing records


def test_slurm_sweep_array_of_two_workers(tmp_path):
    import importlib.util

    import optuna

    from decm import sweep

    spec = importlib.util.spec_from_file_location("weight_sweep", "sweeps/weight_sweep.py")
    ws = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ws)
    argv = ["--gin", "sweeps/toy2d_sweep.gin", "--space", "sweeps/spaces/tiny.yaml", "--trials", "2", "--workers", "2",
            "--backend", "slurm", "--sweep-dir", str(tmp_path / "sw"), "--study", "s",
            "--bind", "distill/train.steps = 6", "--bind", "backbones.mlp.width = 16",
            "--bind", "evaluate.n_samples = 200", "--bind", "evaluate.student_nfe = (1,)"]
    assert ws.main(argv) == 0
    study = optuna.load_study(study_name="s", storage=sweep.storage_for(
        sweep.SweepSpec((), (), {}, str(tmp_path / "sw"), "s")))
    done = [t for t in study.get_trials() if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) >= 2 and all(t.user_attrs["job_id"].startswith("slurm:") for t in done)
    assert (tmp_path / "sw" / "best.gin").exists()


def test_slurm_two_task_fsdp_job_preempted_resumes_identical_to_an_uninterrupted_one(tmp_path):
    """2 tasks with train.parallel = 'fsdp' (sharded checkpoints): one preemption and requeue end bit-identical
    to an uninterrupted 2-task FSDP job, and the sharded checkpoint is what evaluation reads."""
    bindings = tuple(TOY + ["distill/train.steps = 120", "distill/train.ckpt_every_steps = 20",
                            "train.parallel = 'fsdp'"])
    two = ClusterSpec(**{**SLURM.__dict__, "tasks_per_node": 2})
    specs = [RunSpec(("gin/toy2d_exact_teacher.gin",), bindings, str(tmp_path / name)) for name in ("ref", "cut")]
    for spec in specs:
        parse(spec.gin_files, spec.bindings)
        prepare(spec)
    ref_job = submit(specs[0], two)
    ref = ref_job.results()
    assert [r["distill"]["parallel"] for r in ref] == ["fsdp", "fsdp"]
    assert ref[0]["distill"]["shard_checksum"] != ref[1]["distill"]["shard_checksum"]  # each rank holds its own shard
    job = submit(specs[1], two)
    ckpt_dir = os.path.join(specs[1].run_dir, "checkpoints")
    deadline = time.time() + 480
    while time.time() < deadline:
        found = sorted(glob.glob(os.path.join(ckpt_dir, "ckpt-*.dcp.ok")))
        if found and int(os.path.basename(found[-1])[5:13]) >= 40:
            break
        time.sleep(0.2)
    else:
        raise AssertionError("no sharded checkpoint at step ≥ 40 within 480 s:\n" + logs(specs[1].run_dir)[-3000:])
    job._interrupt()
    results = job.results()
    text = logs(specs[1].run_dir)
    assert "preempted at step" in text and "resuming distill from" in text and ".dcp at step" in text, text[-3000:]
    assert [r["distill"]["step"] for r in results] == [120, 120]
    a = checkpoint.latest_valid(os.path.join(specs[0].run_dir, "checkpoints"))
    b = checkpoint.latest_valid(ckpt_dir)
    assert a[0].endswith("ckpt-00000120.dcp") and b[0].endswith("ckpt-00000120.dcp")
    assert_same_state(a[1], b[1])
    assert results[0]["distill"]["param_checksum"] == ref[0]["distill"]["param_checksum"]
    assert [r["distill"]["shard_checksum"] for r in results] == [r["distill"]["shard_checksum"] for r in ref]
