"""Benchmarks run and write their JSON; the cost optimisations leave the losses unchanged."""

import json

import pytest
import torch
from conftest import load_bench

from decm.method.guidance import CFG
from decm.method.objective import decm_objective
from decm.method.teachers import NetworkTeacher
from decm.models.sit import sit
from decm.seeding import step_generator


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


def test_per_term_backward_gives_the_same_losses_and_gradients_with_less_live_memory():
    """backward_per_term (the default in training) vs one backward of the summed loss, at an N2N step."""
    teacher, student = tiny_pair()
    x1, y = torch.randn(4, 2, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2, 0])
    saved = load_bench("step_cost").SavedBytes
    out = []
    for per_term in (False, True):
        obj = decm_objective(guidance=CFG(scale=1.5))
        student.zero_grad()
        with saved() as sb:
            loss, stats, _ = obj(student, teacher, x1, y, 0, step_generator(0, 0, 0), backward=per_term)
            if not per_term:
                loss.backward()
        out.append((stats, [p.grad.clone() for p in student.parameters() if p.requires_grad], sb.peak))
    (s_one, g_one, m_one), (s_per, g_per, m_per) = out
    assert {"loss/cm", "loss/fm", "loss/n2n"} <= set(s_one)
    assert all(s_one[k] == s_per[k] for k in s_one if k.startswith("loss/"))
    for a, b in zip(g_one, g_per):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert sum(float(g.norm()) for g in g_one) > 0
    assert m_per < 0.6 * m_one, (m_per, m_one)  # three terms' activations alive at once vs one


@pytest.mark.parametrize("method", ["forward_ad", "forward_ad_grad"])
def test_jvp_variants_give_the_same_losses_and_gradients(method):
    """Dual-number JVPs (no-grad, or the with-grad dual forward that doubles as the prediction) vs the
    default no-grad torch.func.jvp + separate forward, all three terms active, CFG teacher."""
    teacher, student = tiny_pair()
    x1, y = torch.randn(4, 2, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2, 0])
    out = []
    for jvp_method in ("autograd", method):
        obj = decm_objective(guidance=CFG(scale=1.5))
        obj.jvp_method = jvp_method
        calls = []
        hook = student.register_forward_hook(lambda *a: calls.append(1))
        student.zero_grad()
        _, stats, _ = obj(student, teacher, x1, y, 0, step_generator(0, 0, 0), backward=True)
        hook.remove()
        out.append((stats, [p.grad.clone() for p in student.parameters() if p.requires_grad], len(calls)))
    (s_ref, g_ref, n_ref), (s_new, g_new, n_new) = out
    for k in ("loss/cm", "loss/fm", "loss/n2n", "loss/total"):
        assert s_new[k] == pytest.approx(s_ref[k], rel=1e-5, abs=1e-7), k
    for a, b in zip(g_ref, g_new):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # student forwards: the default runs a JVP and a separate forward per JVP term (cm, n2n);
    # forward_ad_grad's dual forward is the prediction, so two forwards fewer.
    assert n_new == (n_ref - 2 if method == "forward_ad_grad" else n_ref), (n_ref, n_new)


def test_batched_cfg_equals_separate_conditional_and_unconditional_calls():
    teacher, _ = tiny_pair()
    x, t, y = torch.randn(5, 2, 8, 8), torch.rand(5), torch.tensor([0, 1, 2, 0, 1])
    batched = CFG(scale=1.75)(teacher, x, t, y)
    with torch.no_grad():
        v_c, v_u = teacher(x, t, y), teacher(x, t, torch.full_like(y, 3))
    torch.testing.assert_close(batched, v_c + 0.75 * (v_c - v_u), rtol=1e-5, atol=1e-6)


def test_step_cost_and_sampling_benchmarks_write_results(tmp_path):
    out = tmp_path / "cost.json"
    assert load_bench("step_cost").main(["--preset", "tiny", "--batch", "4", "--image-size", "8", "--repeats", "1",
                                   "--warmup", "0", "--out", str(out)]) == 0
    r = json.loads(out.read_text())["results"]
    assert set(r) == {"fm", "cm", "cm_fwad", "cm_dual", "cm_fd", "fm_term", "n2n", "decm", "decm_dual", "scm",
                      "meanflow"}
    assert r["fm"]["time_ratio"] == 1.0 and all(v["seconds"] > 0 and v["memory_bytes"] > 0 for v in r.values())
    parts = json.loads(out.read_text())["parts_seconds"]
    assert set(parts) == {"T", "J", "W", "O", "J_pytorch"} and all(v > 0 for v in parts.values())
    assert r["decm"]["floor_seconds"] == pytest.approx(
        (1 + 2 / 3) * parts["T"] + (1 + 1 / 3) * parts["J"] + (2 + 1 / 3) * parts["W"] + parts["O"])
    out2 = tmp_path / "sampling.json"
    assert load_bench("sampling").main(["--preset", "tiny", "--batch", "8", "--image-size", "8", "--repeats", "1",
                                  "--teacher-nfe", "4", "--out", str(out2)]) == 0
    s = json.loads(out2.read_text())["results"]
    assert s["student_nfe1"]["speedup_vs_teacher"] > 1.0


def test_compiled_student_trains_to_the_same_losses(tmp_path):
    """train.compile_backend wraps the with-grad student in torch.compile ('aot_eager' here: no C
    compiler needed); the JVP keeps the plain module, checkpoints keep the plain keys."""
    from decm import checkpoint
    from decm.data.builtin import GaussianMixture2D
    from decm.models.mlp import mlp
    from decm.tracking import read_stats
    from decm.train import train

    runs = {}
    for backend in ("off", "aot_eager"):
        run_dir = tmp_path / backend
        train(str(run_dir), stage="distill", dataset=GaussianMixture2D(), backbone=lambda **k: mlp(width=16, depth=1, **k),
              objective=decm_objective(), teacher_source="analytic", steps=6, batch_size=16, ckpt_every_steps=6,
              log_every_steps=1, progress=False, compile_backend=backend)
        runs[backend] = (read_stats(str(run_dir)), checkpoint.latest_valid(str(run_dir / "checkpoints"))[1])
    (s_off, c_off), (s_on, c_on) = runs["off"], runs["aot_eager"]
    for a, b in zip(s_off, s_on):
        for k in ("loss/cm", "loss/fm", "loss/total"):
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), k
    assert set(c_on["model"]) == set(c_off["model"])  # no "_orig_mod." prefix
    for k in c_off["model"]:
        torch.testing.assert_close(c_on["model"][k], c_off["model"][k], rtol=1e-4, atol=1e-6)


def test_unknown_compile_backend_is_a_clear_error(tmp_path):
    from decm.data.builtin import GaussianMixture2D
    from decm.models.mlp import mlp
    from decm.train import train

    with pytest.raises(ValueError, match="compile_backend"):
        train(str(tmp_path / "x"), stage="distill", dataset=GaussianMixture2D(), backbone=lambda **k: mlp(**k),
              objective=decm_objective(), steps=2, batch_size=4, compile_backend="no_such_backend", progress=False)


def test_memory_benchmark_measures_the_peak_during_the_step_and_the_model_predicts_it(tmp_path):
    """bench/memory.py on 2 CPU ranks through decm.train's own loop: the peak measured during the step (the
    profiler's allocation events) is within 15% of decm.memory's prediction for DDP and for FSDP with the
    teacher sharded; the bytes held when a step starts are the predicted resident state (params, AdamW, EMA,
    teacher, DDP's buckets) within 5% plus what a gloo thread frees unseen (one gradient copy under DDP, one
    transient unit under FSDP); FSDP's peak is below DDP's; the meta-device rows for XL are written."""
    r = _run_bench(["bench/memory.py", "--presets", "tiny", "--worlds", "2", "--modes", "ddp", "fsdp+st",
                    "--no-timing", "--computed-worlds", "8", "--out", str(tmp_path)])
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads((tmp_path / "memory.json").read_text())["rows"]
    measured = {r["mode"]: r for r in rows if r["kind"] == "measured"}
    assert set(measured) == {"ddp", "fsdp+st"}
    for row in measured.values():
        assert 0.85 <= row["peak"] / row["predicted"]["peak"] <= 1.15, (row["mode"], row["peak"], row["predicted"])
        # Buffers freed on a gloo thread are not seen by the profiler, so they may still count as held when the
        # next step starts: under DDP up to one gradient copy (its bucket; seen on an idle machine: +5.5 MB on
        # tiny), under FSDP up to the transient unsharded unit (reduce-scatter buffers; seen under load: +1.3 MB)
        slack = row["predicted"]["grads"] if row["mode"] == "ddp" else row["predicted"]["unit"]
        held, resident = row["resident_at_step_start"], row["predicted"]["resident"]
        assert 0.95 * resident <= held <= 1.05 * resident + slack, (row["mode"], held, resident, slack)
        assert row["peak"] > row["resident_at_step_start"]
    assert measured["fsdp+st"]["peak"] < measured["ddp"]["peak"]
    xl = {r["mode"]: r for r in rows if r["kind"] == "computed" and r["preset"] == "XL/2" and r["precision"] == "fp32"}
    assert xl["ddp"]["predicted"]["params"] == 4 * 676_735_504 and xl["fsdp+st"]["predicted"]["peak"] < xl["ddp"]["predicted"]["peak"]
    assert "| tiny | 2 | fsdp+st |" in (tmp_path / "memory.md").read_text()


def _run_bench(args, timeout=600):
    import os
    import subprocess
    import sys

    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_xl_cpu_reduced_trains_finite_with_an_exact_jvp_and_the_predicted_peak(tmp_path):
    """bench/xl_cpu.py at reduced width — the real-size script's own code path (meta-device build,
    sharded materialisation, the loop's step) on LightningDiT-XL/1's inputs (32 × 16 × 16, SwiGLU, RMSNorm,
    RoPE): one process and FSDP over 2 ranks, fp32. Every loss is finite, the JVP tangent
    equals the float64 central difference, FSDP's fp32 losses are the single process's, and the measured
    per-rank peak is within 15% of decm.memory's prediction."""
    out = tmp_path / "xl.json"
    r = _run_bench(["bench/xl_cpu.py", "--reduced", "--models", "lightningdit-xl1", "--configs", "single:fp32",
                    "fsdp2:fp32", "--passes", "--out", str(out)])
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {row["config"]: row for row in json.loads(out.read_text())["rows"]}
    single, fsdp = rows["single:fp32"], rows["fsdp2:fp32"]
    for row in (single, fsdp):
        assert row["status"] == "ok" and row["losses_finite"], row.get("status")
        assert 0.85 <= row["peak_over_predicted"] <= 1.15, (row["peak"], row["predicted"]["peak"])
        assert len(row["peak_per_rank"]) == row["world"]
    check = single["jvp_check"]
    assert check["finite"] and check["relative_error"] < 1e-4 and check["tangent_norm"] > 0, check
    l_single, l_fsdp = single["ranks"][0]["steps"][0]["losses"], fsdp["ranks"][0]["steps"][0]["losses"]
    assert set(l_single) == {"loss/cm", "loss/fm", "loss/n2n", "loss/total"}
    for k in ("loss/cm", "loss/n2n"):  # rank 0 draws the same batch in both; the JVP terms see the same weights
        assert l_fsdp[k] == pytest.approx(l_single[k], rel=1e-4), k
    passes = single["passes"]  # what bench/gpu_check.sh reports on CUDA, here on CPU
    assert passes["attention"] == {"forward": ["flash (CPU)"], "jvp": ["matmul + softmax (decm's JVP rule)"],
                                   "with_grad": ["flash (CPU)"], "teacher_cfg": ["flash (CPU)"]}
    sec = passes["seconds"]  # times are recorded, never asserted
    assert set(sec) == {"forward", "jvp", "with_grad", "teacher_cfg", "fm_step", "cm_step"} and min(sec.values()) > 0
    assert passes["jvp_in_forwards"] == sec["jvp"] / sec["forward"]


def test_xl_cpu_refuses_a_configuration_predicted_above_the_memory_limit(tmp_path):
    """A configuration whose predicted memory (per-rank peak + each process's own, times the ranks) exceeds
    --max-gib is not started; the file says which limit it exceeds and by how much."""
    out = tmp_path / "xl.json"
    r = _run_bench(["bench/xl_cpu.py", "--reduced", "--models", "sit-xl2", "--configs", "fsdp2:fp32", "--max-gib", "0.5",
                    "--out", str(out)])
    assert r.returncode == 0, r.stderr[-3000:]
    (row,) = json.loads(out.read_text())["rows"]
    assert row["status"] == "refused" and "over --max-gib 0.5 by" in row["reason"], row
    if row["predicted_machine_bytes"] <= row["available_bytes_at_launch"] - 2 ** 30:
        assert "available" not in row["reason"], row  # names only the limits the prediction exceeds
    assert row["predicted_machine_bytes"] == 2 * (row["predicted"]["peak"] + load_bench("xl_cpu").PROCESS_BYTES)
    assert "ranks" not in row  # nothing was started


def test_step_peak_model_counts_the_state_by_hand_and_traces_the_real_activations():
    """decm.memory.predict_step_peak on the tiny SiT: the state parts equal a count of the parameters by hand
    (DDP: + one bucket copy of the trainable ones; FSDP over 4: each ÷ 4 up to dim-0 padding, 5% here), and the
    activations traced on fake tensors equal the bytes a real CPU forward saves for backward."""
    from decm import memory

    build = lambda **k: sit("tiny", time_scale=1.0, **k)  # noqa: E731
    data = dict(input_size=16, in_channels=4, num_classes=10)
    student, t_net = build(**data, flow_map=True), build(**data, flow_map=False)
    n_all = sum(p.numel() for p in student.parameters())
    n_train = sum(p.numel() for p in student.parameters() if p.requires_grad)
    n_teacher = sum(p.numel() for p in t_net.parameters())
    ddp = memory.predict_step_peak(build, data, 4, 2, "ddp")
    assert (ddp["params"], ddp["grads"], ddp["optimizer"], ddp["ema"], ddp["teacher"], ddp["ddp_buckets"]) == (
        4 * n_all, 4 * n_train, 8 * n_train, 4 * n_all, 4 * n_teacher, 4 * n_train)
    fsdp = memory.predict_step_peak(build, data, 4, 4, "fsdp", shard_teacher=True)
    assert n_all <= fsdp["params"] <= 1.05 * n_all and fsdp["ddp_buckets"] == 0  # pos_embed (dim 0 = 1) is whole
    assert n_teacher <= fsdp["teacher"] <= 1.05 * n_teacher
    real = memory.trace_activations(student, 4, (4, 16, 16), 10)
    assert ddp["activations"] == real["saved"] > 0
    bf16 = memory.predict_step_peak(build, data, 4, 1, "none", autocast_dtype=torch.bfloat16)["activations"]
    assert 0.5 * real["saved"] < bf16 < 0.9 * real["saved"]  # autocast saves bf16 matmul inputs, fp32 norms


def test_the_memory_model_counts_each_post_hoc_ema_profile_as_the_bytes_it_holds():
    """train.phema_sigma_rels = (0.05, 0.2): the two profiles PowerFunctionEMA keeps are the bytes
    decm.memory adds to the resident state (per_rank, the dry run's line, predict_step_peak)."""
    from decm import memory
    from decm.phema import PowerFunctionEMA

    build = lambda **k: sit("tiny", time_scale=1.0, **k)  # noqa: E731
    data = dict(input_size=16, in_channels=4, num_classes=10)
    student = build(**data, flow_map=True)
    profiles = PowerFunctionEMA(student, (0.05, 0.2)).profiles
    held = sum(t.numel() * t.element_size() for m in profiles for t in [*m.parameters(), *m.buffers()])
    assert memory.per_rank(memory.shard_profile(student), 1, "none", phema_profiles=2)["phema"] == held
    with_phema = memory.predict_step_peak(build, data, 4, 1, "none", phema_profiles=2)
    without = memory.predict_step_peak(build, data, 4, 1, "none")
    assert with_phema["resident"] - without["resident"] == with_phema["phema"] == held
    assert with_phema["peak"] - without["peak"] == held
    line = memory.describe(memory.shard_profile(student), 1, "none", phema_profiles=2)
    assert f"post-hoc EMA 2 × {held / 2 / 1e9:.2f} GB" in line


def test_gpu_check_without_a_gpu_is_one_line_and_xl_cpu_refuses_a_malformed_configuration():
    """bench/gpu_check.sh with no CUDA device visible (hidden here, so the test means the same on any machine)
    exits 2 with one line; a configuration xl_cpu.py cannot parse is a one-line error too."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PY": sys.executable}
    r = subprocess.run(["bash", "bench/gpu_check.sh"], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 2 and r.stderr.strip() == f"bench/gpu_check.sh: no CUDA device visible to {sys.executable}"
    r = _run_bench(["bench/xl_cpu.py", "--configs", "fsdp1:fp32"])
    assert r.returncode == 2 and "expected single:<p>, ddp<N>:<p> or fsdp<N>:<p> with N ≥ 2" in r.stderr
    r = _run_bench(["bench/xl_cpu.py", "--reduced", "--depth", "1"])
    assert r.returncode == 2 and r.stderr.strip() == (
        "bench/xl_cpu.py: error: --depth must be ≥ 1 and cannot be combined with --reduced")


def test_xl_cpu_depth_keeps_the_real_width_and_measures_both_matmul_rates():
    """`--depth N` builds the real width, heads and tokens with N blocks (the prediction is made for the same
    network); the matmul probe that explains a slow bf16 step measures both precisions at the MLP's shape."""
    xl = load_bench("xl_cpu")
    build, data = xl.architecture("sit-xl2", False, 2)
    with torch.device("meta"):
        net = build(**data, flow_map=False)
    assert len(net.blocks) == 2 and net.pos_embed.shape == (1, 256, 1152)
    full = xl.predicted("sit-xl2", False, "none", 1, "fp32", 2)
    two = xl.predicted("sit-xl2", False, "none", 1, "fp32", 2, depth=2)
    assert two["params"] < full["params"] / 5 and two["activations"] < full["activations"] / 5
    rates = xl.matmul_rates(xl.architecture("sit-xl2", True), batch=2)  # reduced width: a 512 × 64 × 256 product
    assert rates["shape"] == [512, 64, 256] and rates["threads"] == 2 and rates["fp32"] > 0 and rates["bf16"] > 0
