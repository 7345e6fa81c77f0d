"""Benchmarks run and write their JSON; the cost optimisations leave the losses unchanged."""

import importlib.util
import json

import torch

from decm.method.guidance import CFG
from decm.method.objective import decm_objective
from decm.method.teachers import NetworkTeacher
from decm.models.sit import sit
from decm.train import step_generator


def load(name):
    spec = importlib.util.spec_from_file_location(name, f"bench/{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def tiny_pair():
    torch.manual_seed(0)
    t_net = sit("tiny", input_size=8, in_channels=2, num_classes=3, flow_map=False)
    for p in t_net.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    student = sit("tiny", input_size=8, in_channels=2, num_classes=3, flow_map=True)
    student.load_state_dict(t_net.state_dict(), strict=False)
    for p in student.parameters():
        p.data.add_(0.02 * torch.randn_like(p))
    return NetworkTeacher(t_net), student


def test_shared_teacher_call_gives_identical_losses_and_gradients():
    teacher, student = tiny_pair()
    x1, y = torch.randn(4, 2, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2, 0])
    out = []
    for share in (True, False):
        obj = decm_objective(guidance=CFG(scale=1.5))
        obj.share_teacher_calls = share
        calls = []
        hook = teacher.net.register_forward_hook(lambda *a: calls.append(1))
        student.zero_grad()
        loss, stats, _ = obj(student, teacher, x1, y, 0, step_generator(0, 0, 0))
        loss.backward()
        hook.remove()
        out.append((loss.detach(), [p.grad.clone() for p in student.parameters() if p.grad is not None], len(calls)))
    assert torch.equal(out[0][0], out[1][0])
    assert all(torch.equal(a, b) for a, b in zip(out[0][1], out[1][1]))
    assert out[0][2] < out[1][2]  # sharing saves teacher forwards (L_cm and L_fm at the same x_t)


def test_batched_cfg_equals_separate_conditional_and_unconditional_calls():
    teacher, _ = tiny_pair()
    x, t, y = torch.randn(5, 2, 8, 8), torch.rand(5), torch.tensor([0, 1, 2, 0, 1])
    batched = CFG(scale=1.75)(teacher, x, t, y)
    with torch.no_grad():
        v_c, v_u = teacher(x, t, y), teacher(x, t, torch.full_like(y, 3))
    torch.testing.assert_close(batched, v_c + 0.75 * (v_c - v_u), rtol=1e-5, atol=1e-6)


def test_step_cost_and_sampling_benchmarks_write_results(tmp_path):
    out = tmp_path / "cost.json"
    assert load("step_cost").main(["--preset", "tiny", "--batch", "4", "--image-size", "8", "--repeats", "1",
                                   "--warmup", "0", "--out", str(out)]) == 0
    r = json.loads(out.read_text())["results"]
    assert set(r) == {"fm", "cm", "cm_fd", "fm_term", "n2n", "decm", "scm", "meanflow"}
    assert r["fm"]["time_ratio"] == 1.0 and all(v["seconds"] > 0 and v["memory_bytes"] > 0 for v in r.values())
    out2 = tmp_path / "sampling.json"
    assert load("sampling").main(["--preset", "tiny", "--batch", "8", "--image-size", "8", "--repeats", "1",
                                  "--teacher-nfe", "4", "--out", str(out2)]) == 0
    s = json.loads(out2.read_text())["results"]
    assert s["student_nfe1"]["speedup_vs_teacher"] > 1.0
