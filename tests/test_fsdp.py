"""FSDP2 (train.parallel = 'fsdp') against DDP on CPU/gloo, with the full DE-CM objective.

The runs go through decm.train.train in spawned processes (2 and 4 ranks): all three terms, both
JVPs, CFG with clipping (η = 1, active), backward per term. Compared with DDP on the same global
batch, the per-step losses must agree to 1e-6 and the parameters after 5 steps to 1e-5; sharded
checkpoints must resume bit-identically, reshard from 4 ranks to 2, and export to a single file that
DDP runs and evaluation read.
"""

import json
import os
import socket

import gin
import pytest
import torch
import torch.multiprocessing as mp

from decm import checkpoint, sharded_checkpoint, train_state

STEPS = 5

SIT = ["train.dataset = @datasets.digits()", "datasets.digits.conditional = True", "train.backbone = @backbones.sit",
       "backbones.sit.preset = 'tiny'", "backbones.sit.time_scale = 1.0", "guidance.cfg.scale = 1.5",
       "guidance.cfg.clip_norm = 1.0"]
MLP = ["train.dataset = @datasets.gaussian_mixture_2d()", "train.backbone = @backbones.mlp",
       "backbones.mlp.width = 32", "backbones.mlp.depth = 2", "guidance.cfg.scale = 1.0"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_teacher(kind: str, path: str, width: int = 32) -> str:
    """A perturbed random teacher written as a decm checkpoint (EMA weights), shared by every run."""
    from decm.data.builtin import GaussianMixture2D
    from decm.models.build import backbone_kwargs
    from decm.models.mlp import mlp
    from decm.models.sit import sit

    torch.manual_seed(0)
    if kind == "sit":
        net = sit("tiny", input_size=8, in_channels=1, num_classes=10, flow_map=False, time_scale=1.0)
    else:
        net = mlp(**backbone_kwargs(GaussianMixture2D()), width=width, depth=2, flow_map=False)
    for p in net.parameters():  # DiT init zeroes the output layer: make every path non-trivial
        p.data.add_(0.05 * torch.randn_like(p))
    checkpoint.save(os.path.join(path, "checkpoints"), 1, {"ema": net.state_dict()})
    return path


def worker(rank, world, port, run_dir, teacher_dir, bindings, train_kwargs):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    import decm.data  # noqa: F401  (registers the components)
    import decm.method  # noqa: F401
    import decm.models  # noqa: F401
    from decm.distributed import shutdown
    from decm.train import train

    gin.parse_config_files_and_bindings(["gin/method/decm.gin"], bindings)
    try:
        with gin.config_scope("distill"):
            summary = train(run_dir=run_dir, stage="distill", teacher_checkpoint=teacher_dir, **train_kwargs)
        if rank == 0:
            with open(os.path.join(run_dir, "summary.json"), "w") as f:
                json.dump(summary, f)
    finally:
        shutdown()


def launch(run_dir, teacher_dir, world, backbone, parallel, steps=STEPS, extra=(), **train_kwargs):
    bindings = list(SIT if backbone == "sit" else MLP) + [
        f"distill/train.parallel = '{parallel}'", "distill/train.teacher_source = 'checkpoint'",
        f"distill/train.steps = {steps}", "distill/train.batch_size = 4", "distill/train.log_every_steps = 1",
        f"distill/train.ckpt_every_steps = {STEPS}", "distill/train.progress = False", "distill/train.lr = 1e-3",
        "distill/train.keep_last = 0"] + list(extra)
    mp.start_processes(worker, args=(world, free_port(), str(run_dir), teacher_dir, bindings, train_kwargs),
                       nprocs=world, start_method="spawn")
    with open(os.path.join(run_dir, "summary.json")) as f:
        return json.load(f)


def losses(run_dir):
    with open(os.path.join(run_dir, "stats.jsonl")) as f:
        return [json.loads(line)["loss/total"] for line in f]


def final_state(run_dir):
    """Model, EMA and optimizer moments of the newest checkpoint of either kind, as full tensors."""
    path, kind = train_state.newest(os.path.join(run_dir, "checkpoints"), "ddp")
    state = sharded_checkpoint.load_full(path) if kind == "dcp" else torch.load(path, weights_only=True)
    return state, kind


def assert_states_close(a, b, atol=1e-5):
    for section in ("model", "ema"):
        assert a[section].keys() == b[section].keys()
        for k in a[section]:
            torch.testing.assert_close(a[section][k], b[section][k], rtol=0, atol=atol, msg=f"{section}.{k}")


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    return {k: make_teacher(k, str(root / k)) for k in ("sit", "mlp")}


@pytest.mark.parametrize("backbone,world", [("sit", 2), ("sit", 4), ("mlp", 2), ("mlp", 4)])
def test_fsdp_matches_ddp_losses_and_parameters(tmp_path, teachers, backbone, world):
    ddp = launch(tmp_path / "ddp", teachers[backbone], world, backbone, "ddp")
    fsdp = launch(tmp_path / "fsdp", teachers[backbone], world, backbone, "fsdp")
    assert (ddp["parallel"], fsdp["parallel"], fsdp["world_size"]) == ("ddp", "fsdp", world)
    l_ddp, l_fsdp = losses(tmp_path / "ddp"), losses(tmp_path / "fsdp")
    assert len(l_ddp) == len(l_fsdp) == STEPS
    torch.testing.assert_close(torch.tensor(l_fsdp), torch.tensor(l_ddp), rtol=0, atol=1e-6)
    (s_ddp, k_ddp), (s_fsdp, k_fsdp) = final_state(tmp_path / "ddp"), final_state(tmp_path / "fsdp")
    assert (k_ddp, k_fsdp) == ("pt", "dcp")
    assert_states_close(s_fsdp, s_ddp)
    start = torch.load(os.path.join(teachers[backbone], "checkpoints", "ckpt-00000001.pt"), weights_only=True)["ema"]
    moved = max(float((s_fsdp["model"][k] - v).abs().max()) for k, v in start.items())
    assert moved > 1e-4  # the comparison is not between two untrained copies
    assert abs(fsdp["param_checksum"] - ddp["param_checksum"]) < 1e-4 * abs(ddp["param_checksum"])


def test_fsdp_resume_is_bit_identical_and_skips_an_invalid_newer_checkpoint(tmp_path, teachers):
    whole = launch(tmp_path / "whole", teachers["mlp"], 2, "mlp", "fsdp")
    launch(tmp_path / "cut", teachers["mlp"], 2, "mlp", "fsdp", stop_after_steps=3)
    ckpts = tmp_path / "cut" / "checkpoints"
    assert sharded_checkpoint.latest_valid(str(ckpts)).endswith("ckpt-00000003.dcp")
    junk = ckpts / "ckpt-00000004.dcp"  # a crash after the rename, before the sentinel: never taken as valid
    junk.mkdir()
    (junk / ".metadata").write_bytes(b"truncated")
    (ckpts / "ckpt-00000004.dcp.tmp").mkdir()  # a crash mid-save
    resumed = launch(tmp_path / "cut", teachers["mlp"], 2, "mlp", "fsdp")
    assert junk.exists() and (junk / ".metadata").read_bytes() == b"truncated"  # reported, not deleted
    a, _ = final_state(tmp_path / "whole")
    b, _ = final_state(tmp_path / "cut")
    assert_states_close(b, a, atol=0)
    for k, v in a["optimizer"]["state"].items():
        assert torch.equal(v["exp_avg_sq"], b["optimizer"]["state"][k]["exp_avg_sq"]), k
    assert resumed["param_checksum"] == whole["param_checksum"]
    assert losses(tmp_path / "cut")[-2:] == losses(tmp_path / "whole")[-2:]


def test_resume_from_4_ranks_on_2_and_the_export_resumes_ddp(tmp_path, teachers):
    import shutil

    from decm.export import main as export_main

    launch(tmp_path / "four", teachers["mlp"], 4, "mlp", "fsdp", stop_after_steps=3)
    shutil.copytree(tmp_path / "four", tmp_path / "ddp")
    assert export_main([str(tmp_path / "ddp")]) == 0
    exported = torch.load(tmp_path / "ddp" / "checkpoints" / "ckpt-00000003.pt", weights_only=True)
    assert isinstance(next(iter(exported["optimizer"]["state"])), int)  # torch's own layout, readable by DDP
    launch(tmp_path / "four", teachers["mlp"], 2, "mlp", "fsdp")  # 4 → 2 ranks, resharded by DCP
    launch(tmp_path / "ddp", teachers["mlp"], 2, "mlp", "ddp")    # the consolidated file, under DDP
    a, kind_a = final_state(tmp_path / "four")
    b, kind_b = final_state(tmp_path / "ddp")
    assert (kind_a, kind_b, a["step"], b["step"]) == ("dcp", "pt", STEPS, STEPS)
    assert_states_close(a, b)
    torch.testing.assert_close(torch.tensor(losses(tmp_path / "four")[-2:]), torch.tensor(losses(tmp_path / "ddp")[-2:]),
                               rtol=0, atol=1e-6)
    # evaluation's reader takes the sharded folder directly (the newest valid checkpoint of either kind)
    path, state = checkpoint.latest_valid(str(tmp_path / "four" / "checkpoints"))
    assert path.endswith("ckpt-00000005.dcp") and state["model"].keys() == a["model"].keys()


def test_a_sharded_checkpoint_of_another_model_is_refused_naming_the_mismatch(tmp_path, teachers):
    launch(tmp_path / "run", teachers["mlp"], 2, "mlp", "fsdp", stop_after_steps=2)
    before = sorted(os.listdir(tmp_path / "run" / "checkpoints"))
    wide = make_teacher("mlp", str(tmp_path / "wide"), width=64)
    with pytest.raises(Exception, match=r"does not fit this run's model: shape .*\[64.*\] here"):
        launch(tmp_path / "run", wide, 2, "mlp", "fsdp", extra=["backbones.mlp.width = 64"])
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == before  # nothing lost


def tangent_worker(rank, world, port, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from decm import distributed, parallel
    from decm.method.jvp import flow_map_jvp, unwrap
    from decm.models.sit import sit

    info = distributed.init("cpu")
    torch.manual_seed(0)
    net = sit("tiny", input_size=8, in_channels=1, num_classes=10, flow_map=True, time_scale=1.0)
    for p in net.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    wrapped = parallel.wrap(net, sit("tiny", input_size=8, in_channels=1, num_classes=10, flow_map=True), None,
                            "fsdp", info.world_size, info.device)
    g = torch.Generator().manual_seed(1)
    x, t, s = torch.randn(3, 1, 8, 8, generator=g), torch.rand(3, generator=g), torch.rand(3, generator=g)
    y = torch.tensor([1, 2, 10])
    res = {}
    for method in ("autograd", "forward_ad"):
        with torch.no_grad():
            res[method] = flow_map_jvp(unwrap(wrapped), x, t, s, y, torch.randn(3, 1, 8, 8, generator=g),
                                       torch.ones(3), -torch.ones(3), method=method)
    if rank == 0:
        torch.save(res, out)
    distributed.shutdown()


def test_the_jvp_on_the_sharded_student_equals_the_single_process_one(tmp_path):
    from decm.method.jvp import flow_map_jvp
    from decm.models.sit import sit

    out = str(tmp_path / "tangents.pt")
    mp.start_processes(tangent_worker, args=(2, free_port(), out), nprocs=2, start_method="spawn")
    sharded = torch.load(out)
    torch.manual_seed(0)
    net = sit("tiny", input_size=8, in_channels=1, num_classes=10, flow_map=True, time_scale=1.0)
    for p in net.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    g = torch.Generator().manual_seed(1)
    x, t, s = torch.randn(3, 1, 8, 8, generator=g), torch.rand(3, generator=g), torch.rand(3, generator=g)
    y = torch.tensor([1, 2, 10])
    for method in ("autograd", "forward_ad"):
        with torch.no_grad():
            f, df = flow_map_jvp(net, x, t, s, y, torch.randn(3, 1, 8, 8, generator=g), torch.ones(3), -torch.ones(3),
                                 method=method)
        assert df.abs().max() > 1e-3
        torch.testing.assert_close(sharded[method][0], f, rtol=0, atol=1e-6)
        torch.testing.assert_close(sharded[method][1], df, rtol=0, atol=1e-5)


def test_fsdp_bad_input_is_one_line(tmp_path):
    import subprocess
    import sys

    from torch import nn

    from decm import parallel

    with pytest.raises(parallel.ParallelConfigError, match="Linear has no non-empty `blocks`"):
        parallel.block_list(nn.Linear(2, 2))
    with pytest.raises(parallel.ParallelConfigError, match="'fd'"):
        parallel.check_fsdp_compatible("fsdp", "fd", "off")
    with pytest.raises(parallel.ParallelConfigError, match="compile_backend"):
        parallel.check_fsdp_compatible("fsdp", "autograd", "aot_eager")
    with pytest.raises(parallel.ParallelConfigError, match="must be one of"):
        parallel.resolve("zero3", 2)
    assert (parallel.resolve("auto", 1), parallel.resolve("auto", 4), parallel.resolve("fsdp", 2)) == ("none", "ddp", "fsdp")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    r = subprocess.run([sys.executable, "-m", "decm.launch", "--gin", "gin/toy2d_exact_teacher.gin", "--run-dir",
                        str(tmp_path / "run"), "--bind", "train.parallel = 'fsdp'", "--bind", "train.steps = 2"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 2, r.stderr
    err = [line for line in r.stderr.splitlines() if "error" in line]
    assert len(err) == 1 and "needs several processes" in err[0], r.stderr


def test_mixed_precision_policy_keeps_the_jvp_fp32_unless_asked():
    from decm import parallel

    cpu = parallel.mixed_precision(torch.device("cpu"), "bf16", "bf16")
    assert cpu.param_dtype is None and cpu.reduce_dtype is None  # CPU: fp32 throughout
    default = parallel.mixed_precision(torch.device("cuda", 0), "bf16", "fp32")
    assert default.param_dtype is None and default.reduce_dtype == torch.float32  # fp32 gathers: the JVP stays fp32
    lean = parallel.mixed_precision(torch.device("cuda", 0), "bf16", "bf16")
    assert lean.param_dtype == torch.bfloat16 and lean.reduce_dtype == torch.float32
    assert parallel.mixed_precision(torch.device("cuda", 0), "fp32", "bf16").param_dtype is None
    with pytest.raises(parallel.ParallelConfigError, match="gather_dtype"):
        gin.parse_config("fsdp.gather_dtype = 'fp8'")
        parallel.fsdp_options()
