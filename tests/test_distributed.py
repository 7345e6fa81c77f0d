"""DDP on CPU (gloo, 2 processes) with the full DE-CM objective (JVP terms active).

The JVP runs on the unwrapped module, the with-grad forward through the DDP wrapper: gradients must be
identical on both ranks and equal to one process's gradient of the mean loss over both ranks' halves
with the same per-rank random draws. The control (with-grad forward on `.module`, the py-meanflow
pitfall) must give different gradients per rank, so the equality is not vacuous.
"""

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from decm.method.guidance import CFG
from decm.method.objective import decm_objective
from decm.method.teachers import NetworkTeacher
from decm.models.sit import sit
from decm.seeding import step_generator

STEP = 0  # N2N (every 3rd step) is active at step 0, so all three terms and both JVPs run


def build():
    torch.manual_seed(0)
    teacher_net = sit("tiny", input_size=8, in_channels=2, num_classes=3, flow_map=False)
    for p in teacher_net.parameters():  # a non-trivial teacher (DiT init zeroes the output layer)
        p.data.add_(0.05 * torch.randn_like(p))
    student = sit("tiny", input_size=8, in_channels=2, num_classes=3, flow_map=True)
    student.load_state_dict(teacher_net.state_dict(), strict=False)
    for p in student.parameters():
        p.data.add_(0.02 * torch.randn_like(p))
    return NetworkTeacher(teacher_net), student, decm_objective(guidance=CFG(scale=1.5))


def half(rank):
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(3, 2, 8, 8, generator=g), torch.randint(0, 3, (3,), generator=g)


def grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])


def agree_across_ranks(bad):
    flag = torch.tensor([float(bad)])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item() > 0)


def worker(rank, world, store, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    teacher, student, objective = build()
    ddp = torch.nn.parallel.DistributedDataParallel(student)
    x1, y = half(rank)
    loss, _, _ = objective(ddp, teacher, x1, y, STEP, step_generator(0, rank, STEP))
    loss.backward()
    good = grads(student).clone()
    student.zero_grad()
    loss, _, _ = objective(ddp.module, teacher, x1, y, STEP, step_generator(0, rank, STEP))  # the pitfall
    loss.backward()
    unwrapped = grads(student).clone()
    student.zero_grad()  # per-term backward through DDP: the first terms under no_sync, one all-reduce at the end
    objective(ddp, teacher, x1, y, STEP, step_generator(0, rank, STEP), backward=True,
              agree=agree_across_ranks)
    per_term = grads(student).clone()
    student.zero_grad()  # the with-grad dual forward (JVP primal = prediction) through the DDP wrapper
    objective.jvp_method = "forward_ad_grad"
    objective(ddp, teacher, x1, y, STEP, step_generator(0, rank, STEP), backward=True, agree=agree_across_ranks)
    torch.save({"ddp": good, "unwrapped": unwrapped, "per_term": per_term, "dual_grad": grads(student).clone()},
               os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_ddp_gradients_match_single_process_on_the_concatenated_batch(tmp_path):
    mp.start_processes(worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, start_method="spawn")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert torch.equal(r0["ddp"], r1["ddp"])
    assert torch.equal(r0["per_term"], r1["per_term"])
    torch.testing.assert_close(r0["per_term"], r0["ddp"], rtol=1e-5, atol=1e-7)
    assert torch.equal(r0["dual_grad"], r1["dual_grad"])
    torch.testing.assert_close(r0["dual_grad"], r0["ddp"], rtol=1e-4, atol=1e-6)

    teacher, student, objective = build()
    total = 0
    for rank in (0, 1):
        x1, y = half(rank)
        loss, stats, _ = objective(student, teacher, x1, y, STEP, step_generator(0, rank, STEP))
        assert {"loss/cm", "loss/fm", "loss/n2n"} <= set(stats)
        total = total + loss / 2
    total.backward()
    single = grads(student)
    assert single.norm() > 0
    torch.testing.assert_close(r0["ddp"], single, rtol=1e-4, atol=1e-6)
    # Control: without the all-reduce the ranks disagree (and each differs from the mean).
    assert not torch.allclose(r0["unwrapped"], r1["unwrapped"], rtol=1e-3, atol=1e-5)
    torch.testing.assert_close((r0["unwrapped"] + r1["unwrapped"]) / 2, single, rtol=1e-4, atol=1e-6)
