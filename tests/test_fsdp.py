"""FSDP2 (train.parallel = 'fsdp') against DDP on CPU/gloo, with the full DE-CM objective.

The runs go through decm.train.train in spawned processes (2 and 4 ranks): all three terms, both
JVPs, CFG with clipping (η = 1, active), backward per term. Compared with DDP on the same global
batch, the per-step losses must agree to 1e-6 and the parameters after 5 steps to 1e-5; sharded
checkpoints must resume bit-identically, reshard from 4 ranks to 2, and export to a single file that
DDP runs and evaluation read. A skipped step (non-finite targets on one rank) must leave FSDP equal to
DDP, never hang, and gradient memory must stay a shard during the step. Every multi-process run has a
deadline: a hang fails the test instead of blocking the suite.
"""

import json
import math
import os
import socket
import time

import gin
import pytest
import torch
import torch.multiprocessing as mp

from decm import checkpoint, sharded_checkpoint, train_state

STEPS = 5
DEADLINE_S = 300  # per multi-process run; a step of these tiny models takes well under a second
BF16_GATHER_RTOL = 0.05  # bf16 weights in the blocks against fp32 ones: losses move by ~1e-2 relative

SIT = ["train.dataset = @datasets.digits()", "datasets.digits.conditional = True", "train.backbone = @backbones.sit",
       "backbones.sit.preset = 'tiny'", "backbones.sit.time_scale = 1.0", "guidance.cfg.scale = 1.5",
       "guidance.cfg.clip_norm = 1.0"]
MLP = ["train.dataset = @datasets.gaussian_mixture_2d()", "train.backbone = @backbones.mlp",
       "backbones.mlp.width = 32", "backbones.mlp.depth = 2", "guidance.cfg.scale = 1.0"]


class Hang(AssertionError):
    """The processes did not finish before the deadline (they were killed)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn, args, nprocs: int, deadline_s: float = DEADLINE_S) -> None:
    """mp.start_processes with a deadline: raises Hang (after killing them) when the ranks are not done."""
    ctx = mp.start_processes(fn, args=args, nprocs=nprocs, start_method="spawn", join=False)
    end = time.monotonic() + deadline_s
    while not ctx.join(timeout=1.0):  # raises ProcessRaisedException when a rank fails
        if time.monotonic() > end:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            for p in ctx.processes:
                p.join()
            raise Hang(f"{nprocs} ranks still running after {deadline_s:.0f} s (killed)")


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


def inject_nonfinite_targets(rank: int, at: dict) -> None:
    """Makes the targets of term `at['term']` all NaN on the ranks `at['ranks']` at step `at['step']` (their
    verdict for the term is 'skip the step')."""
    from decm.method.objective import Context

    original = Context.sanitize

    def sanitize(self, target, pred):
        if rank in at["ranks"] and self.step == at["step"] and list(self.selected)[-1] == at["term"]:
            target = torch.full_like(target, float("nan"))
        return original(self, target, pred)

    Context.sanitize = sanitize


def forbid_reads_off_rank0(rank: int) -> None:
    """Any checkpoint read or validity check on a rank other than 0 fails the run (rank 0 alone chooses
    and reads each checkpoint)."""
    if rank == 0:
        return

    def refuse(*a, **k):
        raise AssertionError(f"rank {rank} read a checkpoint")

    real_load = torch.load

    def load(f, *a, **k):  # files are refused; in-memory buffers (object collectives unpickle tensors) are not
        if isinstance(f, (str, os.PathLike)):
            refuse()
        return real_load(f, *a, **k)

    sharded_checkpoint.load_full = refuse
    sharded_checkpoint.is_valid = refuse
    checkpoint.why_invalid = refuse
    torch.load = load


def hide_metadata(rank: int, at: dict) -> None:
    """On the ranks `at['ranks']`, reading the metadata of a checkpoint folder ending in `at['folder']`
    fails (that rank's view of a shared file system differs)."""
    if rank not in at["ranks"]:
        return
    real = sharded_checkpoint.metadata

    def metadata(path):
        if str(path).endswith(at["folder"]):
            raise FileNotFoundError(f"rank {rank} cannot see {path}/.metadata")
        return real(path)

    sharded_checkpoint.metadata = metadata


def worker(rank, world, port, run_dir, teacher_dir, bindings, train_kwargs, inject=None, one_reader=False,
           hidden=None):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    if one_reader:
        forbid_reads_off_rank0(rank)
    if hidden is not None:
        hide_metadata(rank, hidden)
    import decm.data  # noqa: F401  (registers the components)
    import decm.method  # noqa: F401
    import decm.models  # noqa: F401
    from decm.distributed import shutdown
    from decm.train import train

    if inject is not None:
        inject_nonfinite_targets(rank, inject)
    gin.parse_config_files_and_bindings(["gin/method/decm.gin"], bindings)
    try:
        with gin.config_scope("distill"):
            summary = train(run_dir=run_dir, stage="distill", teacher_checkpoint=teacher_dir, **train_kwargs)
        with open(os.path.join(run_dir, f"summary-{rank}.json"), "w") as f:
            json.dump(summary, f)
    finally:
        shutdown()


def launch(run_dir, teacher_dir, world, backbone, parallel, steps=STEPS, extra=(), inject=None, one_reader=False,
           hidden=None, **train_kwargs):
    bindings = list(SIT if backbone == "sit" else MLP) + [
        f"distill/train.parallel = '{parallel}'", "distill/train.teacher_source = 'checkpoint'",
        f"distill/train.steps = {steps}", "distill/train.batch_size = 4", "distill/train.log_every_steps = 1",
        f"distill/train.ckpt_every_steps = {STEPS}", "distill/train.progress = False", "distill/train.lr = 1e-3",
        "distill/train.keep_last = 0"] + list(extra)
    spawn(worker, (world, free_port(), str(run_dir), teacher_dir, bindings, train_kwargs, inject, one_reader, hidden),
          world)
    with open(os.path.join(run_dir, "summary-0.json")) as f:
        return json.load(f)


def stats(run_dir):
    with open(os.path.join(run_dir, "stats.jsonl")) as f:
        return [json.loads(line) for line in f]


def losses(run_dir):
    return [record["loss/total"] for record in stats(run_dir)]


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


@pytest.mark.parametrize("backbone,world,jvp", [("sit", 2, "autograd"), ("sit", 4, "autograd"), ("mlp", 2, "autograd"),
                                               ("mlp", 4, "autograd"), ("sit", 2, "forward_ad")])
def test_fsdp_matches_ddp_losses_and_parameters(tmp_path, teachers, backbone, world, jvp):
    extra = [f"objectives.objective.jvp_method = '{jvp}'"]
    ddp = launch(tmp_path / "ddp", teachers[backbone], world, backbone, "ddp", extra=extra)
    fsdp = launch(tmp_path / "fsdp", teachers[backbone], world, backbone, "fsdp", extra=extra)
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
    # keep_last = 1: the resumed run prunes after its save at step 5 (ckpt-3 goes), so a deletion path is
    # reached — the torn, invalid ckpt-4 must survive it
    resumed = launch(tmp_path / "cut", teachers["mlp"], 2, "mlp", "fsdp", extra=["distill/train.keep_last = 1"])
    assert junk.exists() and (junk / ".metadata").read_bytes() == b"truncated"  # reported, not deleted
    assert not (ckpts / "ckpt-00000003.dcp").exists()  # the pruning did run
    a, _ = final_state(tmp_path / "whole")
    b, _ = final_state(tmp_path / "cut")
    assert_states_close(b, a, atol=0)
    for k, v in a["optimizer"]["state"].items():
        assert torch.equal(v["exp_avg_sq"], b["optimizer"]["state"][k]["exp_avg_sq"]), k
    assert resumed["param_checksum"] == whole["param_checksum"]
    assert losses(tmp_path / "cut")[-2:] == losses(tmp_path / "whole")[-2:]


@pytest.mark.parametrize("backbone", ["mlp", "sit"])  # sit: first dimensions 4 ranks do not divide (pos_embed: 1)
def test_resume_from_4_ranks_on_2_and_the_export_resumes_ddp(tmp_path, teachers, backbone):
    import shutil

    from decm.export import main as export_main

    launch(tmp_path / "four", teachers[backbone], 4, backbone, "fsdp", stop_after_steps=3)
    if backbone == "sit":
        meta = sharded_checkpoint.metadata(str(tmp_path / "four" / "checkpoints" / "ckpt-00000003.dcp"))
        uneven = [k for k, v in meta.state_dict_metadata.items()
                  if k.startswith("model.") and getattr(v, "size", None) and len(v.size) and v.size[0] % 4]
        assert "model.pos_embed" in uneven
    shutil.copytree(tmp_path / "four", tmp_path / "ddp")
    assert export_main([str(tmp_path / "ddp")]) == 0
    exported = torch.load(tmp_path / "ddp" / "checkpoints" / "ckpt-00000003.pt", weights_only=True)
    assert isinstance(next(iter(exported["optimizer"]["state"])), int)  # torch's own layout, readable by DDP
    launch(tmp_path / "four", teachers[backbone], 2, backbone, "fsdp")  # 4 → 2 ranks, resharded by DCP
    launch(tmp_path / "ddp", teachers[backbone], 2, backbone, "ddp")    # the consolidated file, under DDP
    a, kind_a = final_state(tmp_path / "four")
    b, kind_b = final_state(tmp_path / "ddp")
    assert (kind_a, kind_b, a["step"], b["step"]) == ("dcp", "pt", STEPS, STEPS)
    assert_states_close(a, b)
    torch.testing.assert_close(torch.tensor(losses(tmp_path / "four")[-2:]), torch.tensor(losses(tmp_path / "ddp")[-2:]),
                               rtol=0, atol=1e-6)
    # evaluation's reader takes the sharded folder directly (the newest valid checkpoint of either kind)
    path, state = checkpoint.latest_valid(str(tmp_path / "four" / "checkpoints"))
    assert path.endswith("ckpt-00000005.dcp") and state["model"].keys() == a["model"].keys()


def test_a_ddp_run_resumes_from_a_sharded_checkpoint_read_by_rank_0_alone(tmp_path, teachers):
    """DDP continuing an FSDP run's .dcp (and loading its teacher): only rank 0 reads (any read on rank 1
    fails the run), and the continuation equals FSDP's own."""
    import shutil

    launch(tmp_path / "fsdp", teachers["mlp"], 2, "mlp", "fsdp", stop_after_steps=3)
    shutil.copytree(tmp_path / "fsdp", tmp_path / "ddp")
    launch(tmp_path / "fsdp", teachers["mlp"], 2, "mlp", "fsdp")
    launch(tmp_path / "ddp", teachers["mlp"], 2, "mlp", "ddp", one_reader=True)
    a, kind_a = final_state(tmp_path / "fsdp")
    b, kind_b = final_state(tmp_path / "ddp")
    assert (kind_a, kind_b, a["step"], b["step"]) == ("dcp", "pt", STEPS, STEPS)
    assert_states_close(a, b)


def test_a_ddp_run_resumes_from_its_own_checkpoint_chosen_by_rank_0_alone(tmp_path, teachers):
    """Resuming DDP from its own single file: rank 0 alone validates, chooses and reads the checkpoint
    (any validity check or read on rank 1 fails the run), so a rank whose view of the folder differs
    cannot start from another step and hang; the continuation equals an uninterrupted run."""
    launch(tmp_path / "whole", teachers["mlp"], 2, "mlp", "ddp")
    launch(tmp_path / "cut", teachers["mlp"], 2, "mlp", "ddp", stop_after_steps=3)
    launch(tmp_path / "cut", teachers["mlp"], 2, "mlp", "ddp", one_reader=True)
    a, kind_a = final_state(tmp_path / "whole")
    b, kind_b = final_state(tmp_path / "cut")
    assert (kind_a, kind_b, a["step"], b["step"]) == ("pt", "pt", STEPS, STEPS)
    assert_states_close(b, a, atol=0)


def zero_shards(folder) -> None:
    """Overwrites every shard file of a sharded checkpoint with zeros of the same size: the sentinel's
    file count and bytes still match, so the folder passes validation but cannot be read."""
    shards = list(folder.glob("*.distcp"))
    assert shards
    for f in shards:
        f.write_bytes(b"\0" * f.stat().st_size)


@pytest.mark.parametrize("resume_as", ["fsdp", "ddp"])
def test_a_valid_looking_but_unreadable_checkpoint_is_skipped_on_resume(tmp_path, teachers, resume_as):
    """The newest sharded checkpoint has zeroed shard bytes (it passes validation): the resume reports
    it, leaves it on disk, and continues from the next older one on every rank alike — ending where an
    uninterrupted run ends."""
    extra = ["distill/train.ckpt_every_steps = 1"]
    launch(tmp_path / "whole", teachers["mlp"], 2, "mlp", "fsdp", extra=extra)
    launch(tmp_path / "cut", teachers["mlp"], 2, "mlp", "fsdp", stop_after_steps=3, extra=extra)
    ckpts = tmp_path / "cut" / "checkpoints"
    bad = ckpts / "ckpt-00000003.dcp"
    zero_shards(bad)
    assert sharded_checkpoint.is_valid(str(bad))
    launch(tmp_path / "cut", teachers["mlp"], 2, "mlp", resume_as)
    assert bad.exists() and all(set(f.read_bytes()) == {0} for f in bad.glob("*.distcp"))  # reported, not deleted
    b, kind_b = final_state(tmp_path / "cut")
    assert b["step"] == STEPS and kind_b == ("dcp" if resume_as == "fsdp" else "pt")
    assert_states_close(b, final_state(tmp_path / "whole")[0])  # resumed from step 2, not from scratch
    torch.testing.assert_close(torch.tensor(losses(tmp_path / "cut")[-2:]),
                               torch.tensor(losses(tmp_path / "whole")[-2:]), rtol=0, atol=1e-6)


def test_a_checkpoint_one_rank_cannot_see_is_skipped_by_every_rank_without_a_hang(tmp_path, teachers):
    """Rank 1 cannot read the newest checkpoint's metadata (rank 0 can): every rank agrees to skip it
    before any collective of the load, and the run resumes from the older one to the uninterrupted end."""
    extra = ["distill/train.ckpt_every_steps = 1"]
    launch(tmp_path / "whole", teachers["mlp"], 2, "mlp", "fsdp", extra=extra)
    launch(tmp_path / "cut", teachers["mlp"], 2, "mlp", "fsdp", stop_after_steps=3, extra=extra)
    launch(tmp_path / "cut", teachers["mlp"], 2, "mlp", "fsdp", hidden={"ranks": [1], "folder": "ckpt-00000003.dcp"})
    assert_states_close(final_state(tmp_path / "cut")[0], final_state(tmp_path / "whole")[0])


def test_a_save_after_skipping_an_unreadable_newer_checkpoint_keeps_itself(tmp_path, teachers):
    """keep_last = 1 after a resume skipped an unreadable newer checkpoint: the step just saved is kept
    (pruning counts only steps up to it), so a restart resumes from it."""
    launch(tmp_path / "run", teachers["mlp"], 2, "mlp", "fsdp", stop_after_steps=4,
           extra=["distill/train.ckpt_every_steps = 2"])
    ckpts = tmp_path / "run" / "checkpoints"
    zero_shards(ckpts / "ckpt-00000004.dcp")
    launch(tmp_path / "run", teachers["mlp"], 2, "mlp", "fsdp", stop_after_steps=1,
           extra=["distill/train.ckpt_every_steps = 2", "distill/train.keep_last = 1"])
    assert sharded_checkpoint.is_valid(str(ckpts / "ckpt-00000003.dcp"))
    assert sharded_checkpoint.load_full(str(ckpts / "ckpt-00000003.dcp"))["step"] == 3


def test_another_post_hoc_ema_setting_is_a_config_error_not_an_unreadable_checkpoint(tmp_path, teachers):
    """Resuming an FSDP run that tracked 2 post-hoc EMA profiles with 3: one error naming the profiles, no
    checkpoint reported unreadable (DCP would fail planning the load)."""
    phema = ["distill/train.phema_every_steps = 2"]
    launch(tmp_path / "run", teachers["mlp"], 2, "mlp", "fsdp", stop_after_steps=2,
           extra=phema + ["distill/train.phema_sigma_rels = (0.05, 0.2)", "distill/train.ckpt_every_steps = 2"])
    with pytest.raises(Exception, match="tracks 2 post-hoc EMA profiles") as raised:
        launch(tmp_path / "run", teachers["mlp"], 2, "mlp", "fsdp",
               extra=phema + ["distill/train.phema_sigma_rels = (0.05, 0.1, 0.2)"])
    assert "UnrecoverableResumeError" not in str(raised.value)
    assert sharded_checkpoint.is_valid(str(tmp_path / "run" / "checkpoints" / "ckpt-00000002.dcp"))


def test_an_unreadable_only_checkpoint_stops_a_sharded_resume_with_one_error(tmp_path, teachers):
    """The only checkpoint passes validation but cannot be read after DCP has started writing into the
    model: the run stops with UnrecoverableResumeError (it does not train on from step 0 with mixed
    weights) and the folder stays."""
    launch(tmp_path / "cut", teachers["mlp"], 2, "mlp", "fsdp", stop_after_steps=3,
           extra=["distill/train.keep_last = 1", "distill/train.ckpt_every_steps = 3"])
    bad = tmp_path / "cut" / "checkpoints" / "ckpt-00000003.dcp"
    zero_shards(bad)
    with pytest.raises(Exception, match="UnrecoverableResumeError"):
        launch(tmp_path / "cut", teachers["mlp"], 2, "mlp", "fsdp")
    assert bad.exists() and sharded_checkpoint.is_valid(str(bad))


def one_reader_worker(rank, world, port, ckpts, out):
    rank_env(rank, world, port)
    from decm import distributed
    from decm.one_reader import read_once

    distributed.init("cpu")
    forbid_reads_off_rank0(rank)
    path, state = checkpoint.latest_valid(ckpts, verbose=rank == 0, collective=True)

    def mismatch():
        raise sharded_checkpoint.CheckpointMismatchError("the checkpoint does not fit")

    try:
        read_once(mismatch)
        raised = None
    except Exception as e:
        raised = [type(e).__name__, str(e)]
    torch.save({"path": path, "state": state, "raised": raised}, f"{out}-{rank}.pt")
    distributed.shutdown()


def test_one_reader_sends_every_rank_the_same_state_and_the_same_error(tmp_path):
    """checkpoint.latest_valid(collective=True) on 2 ranks: rank 0 alone reads (rank 1's readers refuse),
    skips a newer sharded checkpoint whose shard is corrupt, and both ranks get the same state, dtypes
    and shapes included (bf16, bool, 0-dim, empty, nested); a reader's error reaches every rank."""
    ckpts = str(tmp_path / "checkpoints")
    g = torch.Generator().manual_seed(0)
    state = {"step": 2, "totals": {"skipped_steps": 1},
             "model": {"w": torch.randn(5, 3, generator=g), "b": torch.randn(3, generator=g).bfloat16(),
                       "mask": torch.tensor([True, False, True]), "n": torch.tensor(7),
                       "empty": torch.zeros(0, 4)},
             "optimizer": {"param_groups": [{"lr": 1e-3, "params": ["w", "b"]}],
                           "state": {"w": {"step": torch.tensor(3.0), "exp_avg": torch.randn(5, 3, generator=g)}}}}
    sharded_checkpoint.save(ckpts, 2, state, main=True)
    newer = sharded_checkpoint.save(ckpts, 3, {**state, "step": 3}, main=True)
    shard = next(os.path.join(newer, f) for f in os.listdir(newer) if f.endswith(".distcp"))
    size = os.path.getsize(shard)
    with open(shard, "wb") as f:  # same size, so the sentinel still matches: only reading finds it out
        f.write(b"\0" * size)
    assert sharded_checkpoint.is_valid(newer)
    spawn(one_reader_worker, (2, free_port(), ckpts, str(tmp_path / "res")), 2)
    r0, r1 = (torch.load(tmp_path / f"res-{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["path"] == r1["path"] and r0["path"].endswith("ckpt-00000002.dcp")
    assert r0["raised"] == r1["raised"] == ["CheckpointMismatchError", "the checkpoint does not fit"]
    assert r1["state"]["step"] == 2 and r1["state"]["totals"] == {"skipped_steps": 1}
    for section in ("model",):
        for k, v in state[section].items():
            got = r1["state"][section][k]
            assert got.dtype == v.dtype and got.shape == v.shape and torch.equal(got, v), k
    torch.testing.assert_close(r1["state"]["optimizer"]["state"]["w"]["exp_avg"],
                               state["optimizer"]["state"]["w"]["exp_avg"], rtol=0, atol=0)
    assert r1["state"]["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]


def eval_reader_worker(rank, world, port, run_dir, out):
    rank_env(rank, world, port)
    from decm import distributed
    from decm.data.builtin import GaussianMixture2D
    import decm.sampling  # noqa: F401  (registers the samplers)
    from decm.eval.evaluate import evaluate, load_student
    from decm.models.mlp import mlp

    distributed.init("cpu")
    forbid_reads_off_rank0(rank)
    build = lambda **k: mlp(width=32, depth=2, **k)  # noqa: E731
    newest, step = load_student(run_dir, build, GaussianMixture2D(), collective=True)
    chosen, chosen_step = load_student(run_dir, build, GaussianMixture2D(), step=1, collective=True)
    metrics = evaluate(run_dir=run_dir, dataset=GaussianMixture2D(), backbone=build, student_nfe=(1,), teacher_nfe=(),
                       n_samples=64, batch_size=32, grid_samples=4, out_dir=os.path.join(run_dir, "eval"))
    torch.save({"newest": (newest.state_dict(), step), "chosen": (chosen.state_dict(), chosen_step),
                "evaluated_step": metrics.get("step") if metrics else None}, f"{out}-{rank}.pt")
    distributed.shutdown()


def test_evaluation_under_torchrun_reads_the_student_on_rank_0_alone(tmp_path):
    """Evaluation on 2 ranks: the student checkpoint (newest, and a chosen step) is read by rank 0 only
    (any read on rank 1 fails), every rank gets the same weights, and evaluate() itself runs that way."""
    from decm.data.builtin import GaussianMixture2D
    from decm.models.build import backbone_kwargs
    from decm.models.mlp import mlp

    net = mlp(**backbone_kwargs(GaussianMixture2D()), width=32, depth=2, flow_map=True)
    for step in (1, 2):
        ema = {k: v + step for k, v in net.state_dict().items()}
        checkpoint.save(str(tmp_path / "run" / "checkpoints"), step, {"step": step, "ema": ema, "model": ema})
    spawn(eval_reader_worker, (2, free_port(), str(tmp_path / "run"), str(tmp_path / "res")), 2)
    r0, r1 = (torch.load(tmp_path / f"res-{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["evaluated_step"] == 2
    for key, step in (("newest", 2), ("chosen", 1)):
        assert r0[key][1] == r1[key][1] == step
        for k, v in r0[key][0].items():
            assert torch.equal(v, r1[key][0][k]), (key, k)


def test_a_sharded_checkpoint_of_another_model_is_refused_naming_the_mismatch(tmp_path, teachers):
    launch(tmp_path / "run", teachers["mlp"], 2, "mlp", "fsdp", stop_after_steps=2)
    before = sorted(os.listdir(tmp_path / "run" / "checkpoints"))
    wide = make_teacher("mlp", str(tmp_path / "wide"), width=64)
    with pytest.raises(Exception, match=r"does not fit this run's model: shape .*\[64.*\] here"):
        launch(tmp_path / "run", wide, 2, "mlp", "fsdp", extra=["backbones.mlp.width = 64"])
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == before  # nothing lost


def rank_env(rank: int, world: int, port: int) -> None:
    """This process is rank `rank` of `world` on localhost (torch.distributed's env:// variables), one thread."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)


def tangent_worker(rank, world, port, out):
    rank_env(rank, world, port)
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
    spawn(tangent_worker, (2, free_port(), out), 2)
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


def precision_worker(rank, world, port, out):
    """The JVP and the with-grad forward of a student sharded under the bf16-gather policy (CPU, gloo),
    recording what the time embedder and the first block receive."""
    rank_env(rank, world, port)
    import torch.autograd.forward_ad as fwAD

    from decm import distributed, parallel
    from decm.method.guidance import NoGuidance
    from decm.method.objective import Context
    from decm.models.sit import sit

    info = distributed.init("cpu")
    torch.manual_seed(0)
    net = sit("tiny", input_size=8, in_channels=1, num_classes=10, flow_map=True, time_scale=1.0)
    for p in net.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    parallel.shard(net, world, info.device, "bf16", {"gather_dtype": "bf16", "reshard_after_forward": True})
    seen = {"t": [], "block": []}

    def record_t(module, args):
        t = args[0]
        primal, tangent = fwAD.unpack_dual(t)
        seen["t"].append({"dtype": str(t.dtype), "values": [float(v) for v in primal],
                          "tangent_dtype": str(tangent.dtype) if tangent is not None else None,
                          "tangent": [float(v) for v in tangent] if tangent is not None else None})

    net.t_embedder.register_forward_pre_hook(record_t)
    net.blocks[0].register_forward_pre_hook(lambda module, args: seen["block"].append(str(args[0].dtype)))
    t = torch.tensor([0.999, 0.3])
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    dx = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([1, 2])
    outputs = {}
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as the loop runs train.precision = 'bf16'
        for method in ("autograd", "forward_ad"):
            ctx = Context(parallel.Sharded(net), None, NoGuidance(), x, x, y, 0, jvp_method=method)
            f, df = ctx.jvp(x, t, torch.ones(2), dx, torch.ones(2), torch.zeros(2))
            outputs[method] = (str(f.dtype), str(df.dtype), bool(torch.isfinite(df).all()))
        net(x, t, torch.ones(2), y).float().square().mean().backward()  # the with-grad forward
    if rank == 0:
        with open(out, "w") as fh:
            json.dump({"seen": seen, "outputs": outputs}, fh)
    distributed.shutdown()


def test_bf16_gathers_keep_the_time_inputs_and_jvp_tangents_fp32(tmp_path):
    """fsdp.gather_dtype = 'bf16' under train.precision = 'bf16', the actual policy on CPU: the blocks
    compute in bf16, but the time embedder gets t in fp32 (0.999, not bf16's 1.0) with an fp32 tangent,
    in both JVPs and in the with-grad forward, and the JVP returns fp32."""
    out = str(tmp_path / "seen.json")
    spawn(precision_worker, (2, free_port(), out), 2)
    with open(out) as f:
        res = json.load(f)
    seen, outputs = res["seen"], res["outputs"]
    assert seen["block"] == ["torch.bfloat16"] * 3  # the policy is active: the blocks' inputs are bf16
    assert len(seen["t"]) == 3  # torch.func.jvp, forward-AD, the with-grad forward
    for record in seen["t"]:
        assert record["dtype"] == "torch.float32", seen["t"]
        assert record["values"] == [pytest.approx(0.999, abs=1e-7), pytest.approx(0.3, abs=1e-7)], seen["t"]
    assert seen["t"][1]["tangent_dtype"] == "torch.float32" and seen["t"][1]["tangent"] == [1.0, 1.0]
    for method, (f_dtype, df_dtype, finite) in outputs.items():
        assert (f_dtype, df_dtype, finite) == ("torch.float32", "torch.float32", True), method


def test_mixed_precision_policy_reduces_in_fp32_and_keeps_the_root_fp32():
    from decm import parallel

    blocks, root = parallel.mixed_precision("fp32", "bf16")
    assert blocks.param_dtype is None and root.param_dtype is None  # fp32 runs: no policy at all
    blocks, root = parallel.mixed_precision("bf16", "fp32")
    assert blocks.param_dtype is None and blocks.reduce_dtype == torch.float32  # fp32 gathers: the JVP stays fp32
    assert blocks.output_dtype is None
    blocks, root = parallel.mixed_precision("bf16", "bf16")
    assert blocks.param_dtype == torch.bfloat16 and blocks.reduce_dtype == torch.float32
    assert blocks.output_dtype == torch.float32  # the root's fp32 layers get fp32 from the last block
    assert root.param_dtype is None and root.cast_forward_inputs is False
    with pytest.raises(parallel.ParallelConfigError, match="gather_dtype"):
        gin.parse_config("fsdp.gather_dtype = 'fp8'")
        parallel.fsdp_options()


def test_a_skipped_step_leaves_no_gradient_behind_fsdp_equals_ddp(tmp_path, teachers):
    """N2N targets all NaN on rank 1 at step 0 (cm and fm have run their backwards by then): every rank
    skips the step, and the next steps' gradients and the final parameters are DDP's."""
    nan = {"ranks": [1], "step": 0, "term": "n2n"}
    ddp = launch(tmp_path / "ddp", teachers["mlp"], 2, "mlp", "ddp", steps=3, inject=nan)
    fsdp = launch(tmp_path / "fsdp", teachers["mlp"], 2, "mlp", "fsdp", steps=3, inject=nan)
    assert ddp["totals"]["skipped_steps"] == fsdp["totals"]["skipped_steps"] == 1
    g_ddp = [r["grad_norm"] for r in stats(tmp_path / "ddp") if "grad_norm" in r]
    g_fsdp = [r["grad_norm"] for r in stats(tmp_path / "fsdp") if "grad_norm" in r]
    assert len(g_ddp) == len(g_fsdp) == 2
    torch.testing.assert_close(torch.tensor(g_fsdp), torch.tensor(g_ddp), rtol=1e-5, atol=0)
    assert_states_close(final_state(tmp_path / "fsdp")[0], final_state(tmp_path / "ddp")[0])
    assert abs(fsdp["param_checksum"] - ddp["param_checksum"]) < 1e-6 * abs(ddp["param_checksum"])


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_one_backward_with_nonfinite_targets_on_one_rank_skips_without_hanging(tmp_path, teachers, parallel):
    """backward_per_term = False: rank 1's L_cm targets are NaN at step 1, so the other rank would go on to
    L_fm's with-grad forward — collectives under FSDP (all-gathers) and under DDP (its bucket rebuild
    after the first backward). Every rank must agree on the term before any collective diverges: within
    the deadline, one skipped step on both ranks, and the same parameters as when every rank's targets
    are NaN at that step (no collective was paired with a different one)."""
    extra = ["objectives.objective.backward_per_term = False"]
    one = launch(tmp_path / "one", teachers["mlp"], 2, "mlp", parallel, steps=3,
                 inject={"ranks": [1], "step": 1, "term": "cm"}, extra=extra)
    every = launch(tmp_path / "every", teachers["mlp"], 2, "mlp", parallel, steps=3,
                   inject={"ranks": [0, 1], "step": 1, "term": "cm"}, extra=extra)
    with open(tmp_path / "one" / "summary-1.json") as f:
        other = json.load(f)
    assert one["totals"]["skipped_steps"] == other["totals"]["skipped_steps"] == every["totals"]["skipped_steps"] == 1
    assert one["step"] == other["step"] == 3
    assert_states_close(final_state(tmp_path / "one")[0], final_state(tmp_path / "every")[0], atol=1e-7)
    assert one["param_checksum"] == pytest.approx(every["param_checksum"], rel=1e-9)


def test_part_gradient_diagnostics_under_fsdp_equal_ddp(tmp_path, teachers):
    """train.part_grad_every_steps: the CM supervised / self-supervised gradient norms (averaged over the
    ranks like the training gradient) are the same numbers under FSDP as under DDP."""
    extra = ["distill/train.part_grad_every_steps = 1"]
    launch(tmp_path / "ddp", teachers["sit"], 2, "sit", "ddp", steps=2, extra=extra)
    launch(tmp_path / "fsdp", teachers["sit"], 2, "sit", "fsdp", steps=2, extra=extra)
    for a, b in zip(stats(tmp_path / "ddp"), stats(tmp_path / "fsdp"), strict=True):
        for key in ("grad/cm_sup", "grad/cm_self", "grad/cm_sup_self_cos"):
            assert abs(a[key]) > 1e-3, (key, a[key])
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (key, a[key], b[key])


def test_fsdp_under_bf16_autocast_follows_ddp(tmp_path, teachers):
    """train.precision = 'bf16' (fp32 gathers): FSDP's losses follow DDP's over 3 steps to bf16's
    precision, and nothing but the gradient shards is left after the run. (With autocast's weight
    cache on under FSDP, the later terms' gradients bypass the reduce-scatter: the third step's loss
    differs by about 40%.)"""
    extra = ["distill/train.precision = 'bf16'"]
    launch(tmp_path / "ddp", teachers["sit"], 2, "sit", "ddp", steps=3, extra=extra)
    launch(tmp_path / "fsdp", teachers["sit"], 2, "sit", "fsdp", steps=3, extra=extra)
    a, b = losses(tmp_path / "ddp"), losses(tmp_path / "fsdp")
    assert len(a) == len(b) == 3 and all(math.isfinite(v) for v in a + b)
    torch.testing.assert_close(torch.tensor(b), torch.tensor(a), rtol=1e-3, atol=0)


@pytest.mark.parametrize("backbone", ["mlp", "sit"])
def test_bf16_gathers_train_every_backbone_close_to_fp32_gathers(tmp_path, teachers, backbone):
    """fsdp.gather_dtype = 'bf16' under train.precision = 'bf16' trains any backbone (the blocks hand fp32
    back to the root's fp32 layers, in the JVP too, which runs outside autocast): finite losses within
    a few percent of the fp32-gather run's (the same steps, only the blocks' weights rounded to bf16)."""
    extra = ["distill/train.precision = 'bf16'"]
    launch(tmp_path / "fp32", teachers[backbone], 2, backbone, "fsdp", steps=2, extra=extra)
    launch(tmp_path / "bf16", teachers[backbone], 2, backbone, "fsdp", steps=2,
           extra=extra + ["fsdp.gather_dtype = 'bf16'"])
    a, b = losses(tmp_path / "fp32"), losses(tmp_path / "bf16")
    assert len(a) == len(b) == 2 and all(math.isfinite(v) for v in b)
    torch.testing.assert_close(torch.tensor(b), torch.tensor(a), rtol=BF16_GATHER_RTOL, atol=0)


def grad_memory_worker(rank, world, port, out, precision="fp32"):
    """One DE-CM step with backward per term on a sharded SiT, under the loop's autocast for `precision`:
    gradient bytes held after each term and after the step."""
    rank_env(rank, world, port)
    import copy

    from decm import distributed, parallel
    from decm.method.guidance import CFG
    from decm.method.objective import Objective, decm_objective
    from decm.method.teachers import NetworkTeacher
    from decm.models.sit import sit
    from decm.seeding import step_generator

    info = distributed.init("cpu")
    torch.manual_seed(0)
    teacher = sit("tiny", input_size=8, in_channels=1, num_classes=10, flow_map=False, time_scale=1.0)
    for p in teacher.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    student = sit("tiny", input_size=8, in_channels=1, num_classes=10, flow_map=True, time_scale=1.0)
    student.load_state_dict(teacher.state_dict(), strict=False)
    full = sum(p.numel() * p.element_size() for p in student.parameters())
    wrapped = parallel.wrap(student, copy.deepcopy(student), None, "fsdp", world, info.device, precision)
    held = []
    backward_term = Objective._backward_term

    def counted(term, ctx, t, s, agree):
        value = backward_term(term, ctx, t, s, agree)
        held.append(parallel.held_grad_bytes(student))
        return value

    Objective._backward_term = staticmethod(counted)
    g = torch.Generator().manual_seed(10 + rank)
    x1, y = torch.randn(4, 1, 8, 8, generator=g), torch.randint(0, 10, (4,), generator=g)
    with parallel.autocast("cpu", precision, "fsdp"):
        decm_objective(guidance=CFG(scale=1.5, clip_norm=1.0))(
            wrapped, NetworkTeacher(teacher), x1, y, 0, step_generator(0, rank, 0), backward=True,
            agree=lambda bad: distributed.any_true(bad, info))
    held.append(parallel.held_grad_bytes(student))  # after the step, autocast's region closed
    with open(f"{out}-{rank}.json", "w") as f:
        json.dump({"held": held, "full": full}, f)
    distributed.shutdown()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_fsdp_holds_a_shard_of_the_gradients_from_the_first_term_on(tmp_path, precision):
    """After each term's backward (cm, fm, n2n) and after the step every rank holds ≤ 1.1 × the full
    gradient bytes ÷ world: no unsharded gradient is kept between the terms, nor left behind, in fp32 and
    under bf16 autocast (whose weight cache, if it were on under FSDP, leaves unsharded gradients)."""
    out = str(tmp_path / "held")
    spawn(grad_memory_worker, (2, free_port(), out, precision), 2)
    for rank in (0, 1):
        with open(f"{out}-{rank}.json") as f:
            res = json.load(f)
        assert len(res["held"]) == 4 and res["held"][-1] > 0
        assert max(res["held"]) <= 1.1 * res["full"] / 2, (res["held"], res["full"])


def test_rewriting_a_step_keeps_it_resumable_when_the_rename_fails(tmp_path, monkeypatch):
    """A second save of the same step (e.g. preemption right after a periodic save) that dies at the
    rename of its new folder: the step's first checkpoint is still valid and loads; the next save of
    that step completes and leaves one folder."""
    ckpts = str(tmp_path / "checkpoints")
    first = {"step": 4, "model": {"w": torch.arange(6.0).reshape(3, 2)}}
    sharded_checkpoint.save(ckpts, 4, first, main=True, keep_last=1)
    real_replace = os.replace

    def failing_replace(src, dst):
        if str(src).endswith(".dcp.tmp"):
            raise OSError("killed at the rename")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="killed at the rename"):
        sharded_checkpoint.save(ckpts, 4, {"step": 4, "model": {"w": torch.zeros(3, 2)}}, main=True, keep_last=1)
    monkeypatch.setattr(os, "replace", real_replace)
    path = sharded_checkpoint.latest_valid(ckpts)
    assert path is not None and sharded_checkpoint.step_of(path) == 4
    assert torch.equal(sharded_checkpoint.load_full(path)["model"]["w"], first["model"]["w"])
    assert train_state.newest(ckpts, "fsdp") == (path, "dcp")
    sharded_checkpoint.save(ckpts, 4, {"step": 4, "model": {"w": torch.ones(3, 2)}}, main=True, keep_last=1)
    assert sorted(os.listdir(ckpts)) == ["ckpt-00000004.dcp", "ckpt-00000004.dcp.ok"]
    assert torch.equal(sharded_checkpoint.load_full(sharded_checkpoint.latest_valid(ckpts))["model"]["w"],
                       torch.ones(3, 2))


def test_a_save_clears_what_older_crashed_saves_left_and_keeps_torn_folders(tmp_path):
    """Publishing step 4 removes an older step's partial `.tmp` folder and sentinels whose folder is gone;
    a folder without a sentinel (reported on resume) and a newer step's `.tmp` stay."""
    ckpts = tmp_path / "checkpoints"
    (ckpts / "ckpt-00000002.dcp.tmp").mkdir(parents=True)
    (ckpts / "ckpt-00000002.dcp.tmp" / "__0_0.distcp").write_bytes(b"partial")
    (ckpts / "ckpt-00000001.dcp.ok").write_text("3 100\n")  # its folder was pruned before the kill
    (ckpts / "ckpt-00000001.dcp.prev.ok").write_text("3 100\n")
    (ckpts / "ckpt-00000003.dcp").mkdir()  # torn: no sentinel
    (ckpts / "ckpt-00000009.dcp.tmp").mkdir()  # not older than the step being saved
    sharded_checkpoint.save(str(ckpts), 4, {"step": 4, "model": {"w": torch.ones(2)}}, main=True, keep_last=1)
    assert sorted(os.listdir(ckpts)) == ["ckpt-00000003.dcp", "ckpt-00000004.dcp", "ckpt-00000004.dcp.ok",
                                         "ckpt-00000009.dcp.tmp"]


def test_a_chosen_step_of_a_sharded_run_is_evaluated_and_exported_also_from_its_prev(tmp_path):
    """`decm.evaluate --step N` and `decm.export --step N` find step N of an FSDP run: its folder, or the
    `.prev` that is the step's valid checkpoint while it is being rewritten."""
    import shutil

    from decm.data.builtin import GaussianMixture2D
    from decm.eval.evaluate import load_student
    from decm.export import main as export_main
    from decm.models.build import backbone_kwargs
    from decm.models.mlp import mlp

    build = lambda **k: mlp(width=32, depth=2, **k)  # noqa: E731
    net = build(**backbone_kwargs(GaussianMixture2D()), flow_map=True)
    ckpts = tmp_path / "run" / "checkpoints"
    for step in (1, 2):
        ema = {k: v + step for k, v in net.state_dict().items()}
        first = next(iter(ema))  # the loop's layout: AdamW state under parameter names (DCP drops empty dicts)
        optimizer = {"state": {first: {"step": torch.tensor(1.0), "exp_avg": torch.zeros_like(ema[first]),
                                       "exp_avg_sq": torch.zeros_like(ema[first])}},
                     "param_groups": [{"params": list(ema), "lr": 1e-3}]}
        sharded_checkpoint.save(str(ckpts), step, {"step": step, "ema": ema, "model": ema, "optimizer": optimizer},
                                main=True)
    chosen, step = load_student(str(tmp_path / "run"), build, GaussianMixture2D(), step=1)
    assert step == 1 and all(torch.equal(v, net.state_dict()[k] + 1) for k, v in chosen.state_dict().items())
    plain = ckpts / "ckpt-00000002.dcp"  # a rewrite of step 2 killed after the old one became `.prev`
    shutil.move(str(plain), str(plain) + ".prev")
    shutil.move(str(plain) + ".ok", str(plain) + ".prev.ok")
    chosen, step = load_student(str(tmp_path / "run"), build, GaussianMixture2D(), step=2)
    assert step == 2 and all(torch.equal(v, net.state_dict()[k] + 2) for k, v in chosen.state_dict().items())
    assert export_main([str(tmp_path / "run"), "--step", "2"]) == 0
    assert torch.load(ckpts / "ckpt-00000002.pt", weights_only=True)["step"] == 2
    with pytest.raises(FileNotFoundError, match="at step 3"):
        load_student(str(tmp_path / "run"), build, GaussianMixture2D(), step=3)


def test_reading_a_sharded_checkpoint_leaves_nothing_behind_when_killed(tmp_path):
    """load_full (DDP resume from a .dcp, teachers, evaluation) killed mid-read writes nothing into the
    checkpoints folder: no temporary full copy."""
    import subprocess
    import sys

    ckpts = tmp_path / "checkpoints"
    sharded_checkpoint.save(str(ckpts), 2, {"step": 2, "model": {"w": torch.randn(64, 8)}, "totals": {"n": 1}},
                            main=True)
    before = sorted(os.listdir(ckpts))
    code = ("import os, torch; from decm import sharded_checkpoint as sc\n"
            "torch.load = lambda *a, **k: os._exit(9)  # killed while reading\n"
            f"sc.load_full({str(ckpts / 'ckpt-00000002.dcp')!r})\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 9, r.stderr
    assert sorted(os.listdir(ckpts)) == before
    assert sharded_checkpoint.load_full(str(ckpts / "ckpt-00000002.dcp"))["totals"] == {"n": 1}
