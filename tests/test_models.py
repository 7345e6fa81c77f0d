"""Backbones: JVP equals float64 finite differences (attention included); student-from-teacher."""

import pytest
import torch
from conftest import load_bench
from torch.nn.attention import SDPBackend, sdpa_kernel

from decm.method.jvp import flow_map_jvp
from decm.models.mlp import mlp
from decm.models.sit import sit


def randomize(model, seed=0):
    """Gives every parameter (the zero-initialised ones too) a random value so the test is non-trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.2)
    return model


BACKBONES = {
    "sit-tiny": lambda: sit("tiny", input_size=8, in_channels=1, num_classes=10, depth=2),
    "lightning-style": lambda: sit("tiny/1", input_size=4, in_channels=2, num_classes=3, depth=2, mlp_type="swiglu",
                                   norm_type="rms", use_rope=True, qk_norm=True),
    "mlp": lambda: mlp(width=32, depth=2, dim=2, num_classes=4),
}


@pytest.mark.parametrize("method", ["autograd", "forward_ad"])
@pytest.mark.parametrize("name", list(BACKBONES))
def test_jvp_matches_finite_differences(name, method):
    model = randomize(BACKBONES[name]().double())
    g = torch.Generator().manual_seed(1)
    n = 3
    x = torch.randn((n, *((2,) if name == "mlp" else (1, 8, 8) if name == "sit-tiny" else (2, 4, 4))),
                    generator=g, dtype=torch.float64)
    t, s = torch.rand(n, generator=g, dtype=torch.float64) * 0.5, 0.5 + torch.rand(n, generator=g, dtype=torch.float64) * 0.5
    y = torch.tensor([0, 1, model.num_classes])  # includes the null class
    dx, dt, ds = torch.randn(x.shape, generator=g, dtype=torch.float64), torch.ones(n, dtype=torch.float64), -0.5 * torch.ones(n, dtype=torch.float64)
    out_a, jvp_a = flow_map_jvp(model, x, t, s, y, dx, dt, ds, method=method)
    out_f, jvp_f = flow_map_jvp(model, x, t, s, y, dx, dt, ds, method="fd", fd_eps=1e-6)
    assert torch.allclose(out_a, out_f)
    assert jvp_a.abs().max() > 1e-3
    assert torch.allclose(jvp_a, jvp_f, rtol=1e-6, atol=1e-7), (jvp_a - jvp_f).abs().max()


def jvp_inputs(name, model, n=3, dtype=torch.float32):
    g = torch.Generator().manual_seed(2)
    shape = (2,) if name == "mlp" else (1, 8, 8) if name == "sit-tiny" else (2, 4, 4)
    x = torch.randn((n, *shape), generator=g, dtype=dtype)
    t, s = torch.rand(n, generator=g, dtype=dtype) * 0.5, 0.5 + torch.rand(n, generator=g, dtype=dtype) * 0.5
    y = torch.tensor([0, 1, model.num_classes])[:n]
    return x, t, s, y, torch.randn(x.shape, generator=g, dtype=dtype), torch.ones(n, dtype=dtype), -0.5 * torch.ones(n, dtype=dtype)


@pytest.mark.parametrize("method", ["autograd", "forward_ad"])
@pytest.mark.parametrize("name", list(BACKBONES))
def test_lean_tangent_rules_are_bit_identical_to_pytorchs_own(name, method):
    """The lean linear/GELU rules drop only zero terms: the tangent must not change by one bit (fp32)."""
    model = randomize(BACKBONES[name]())
    args = jvp_inputs(name, model)
    out_lean, jvp_lean = flow_map_jvp(model, *args[:4], *args[4:], method=method, lean=True)
    out_ref, jvp_ref = flow_map_jvp(model, *args[:4], *args[4:], method=method, lean=False)
    assert jvp_ref.abs().max() > 1e-3
    assert torch.equal(jvp_lean, jvp_ref)
    torch.testing.assert_close(out_lean, out_ref, rtol=1e-6, atol=1e-6)  # primal: same math, may differ by 1 ulp
    with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]):
        torch.testing.assert_close(out_lean, model(*args[:4]), rtol=1e-6, atol=1e-6)


def test_lean_tangents_do_two_matmuls_per_linear_instead_of_three():
    model = randomize(BACKBONES["mlp"]())
    args = jvp_inputs("mlp", model)
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    counts = {}
    for lean in (True, False):
        with torch.profiler.profile() as prof:
            flow_map_jvp(model, *args[:4], *args[4:], lean=lean)
        counts[lean] = sum(e.count for e in prof.key_averages() if e.key in ("aten::mm", "aten::addmm"))
    assert counts[True] == 2 * n_linear and counts[False] >= 3 * n_linear, counts


def test_fused_attention_is_used_outside_the_jvp():
    """Plain forwards keep the fused SDPA (no forward-AD support) — the JVP path switches to MATH."""
    model = randomize(BACKBONES["sit-tiny"]())
    x, t = torch.randn(2, 1, 8, 8), torch.rand(2)
    with pytest.raises(Exception, match="forward AD"):
        torch.func.jvp(lambda a: model(a, t, t, None), (x,), (x,))
    flow_map_jvp(model, x, t, t, None, x, torch.ones(2), torch.zeros(2))  # does not raise


@pytest.mark.parametrize("name", list(BACKBONES))
def test_student_from_teacher_equals_teacher_for_all_s(name):
    if name == "mlp":
        teacher_v = mlp(width=32, depth=2, dim=2, num_classes=4, flow_map=False)
        student = mlp(width=32, depth=2, dim=2, num_classes=4, flow_map=True)
        shape = (2,)
    else:
        base = BACKBONES[name]()
        teacher_v = type(base)(**{**_ctor_args(base), "flow_map": False})
        student = type(base)(**{**_ctor_args(base), "flow_map": True})
        shape = (base.in_channels, base.input_size, base.input_size)
    randomize(teacher_v, seed=3)
    missing, unexpected = student.load_state_dict(teacher_v.state_dict(), strict=False)
    assert unexpected == [] and missing and all(k.startswith("s_embedder.") for k in missing)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn((4, *shape), generator=g), torch.rand(4, generator=g)
    y = torch.tensor([0, 1, 2, teacher_v.num_classes])  # the last one is the null class
    v = teacher_v(x, t, None, y)
    for s in (t, torch.ones(4), torch.rand(4, generator=g)):
        assert torch.equal(student(x, t, s, y), v)


def _ctor_args(model):
    """Rebuilds the constructor arguments of the tiny test models."""
    blk = model.blocks[0]
    return dict(input_size=model.input_size, in_channels=model.in_channels, patch_size=model.patch_size,
                hidden_size=model.pos_embed.shape[-1], depth=len(model.blocks),
                num_heads=blk.attn.num_heads, num_classes=model.num_classes, learn_sigma=False,
                mlp_type="swiglu" if hasattr(blk.mlp, "w12") else "gelu",
                norm_type="rms" if hasattr(blk.norm1, "weight") and blk.norm1.weight is not None else "layernorm",
                use_rope=model.feat_rope is not None,
                qk_norm=not isinstance(blk.attn.q_norm, torch.nn.Identity))


def test_presets_param_counts_on_meta_device():
    with torch.device("meta"):
        xl = sit("XL/2", input_size=32, in_channels=4, num_classes=1000, flow_map=False, learn_sigma=True)
        lxl = sit("LightningDiT-XL/1", input_size=16, in_channels=32, num_classes=1000, flow_map=False)
    n_xl = sum(p.numel() for p in xl.parameters())
    n_lxl = sum(p.numel() for p in lxl.parameters())
    assert 670e6 < n_xl < 680e6, n_xl          # SiT-XL/2: 675M
    assert 660e6 < n_lxl < 690e6, n_lxl       # LightningDiT-XL/1: ≈675M


def test_image_size_not_divisible_by_patch_raises():
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        sit("tiny", input_size=7, in_channels=1, num_classes=0)


def test_bf16_autocast_keeps_the_jvp_and_time_embeddings_in_fp32():
    from decm.method.guidance import NoGuidance
    from decm.method.objective import Context

    model = randomize(BACKBONES["sit-tiny"]())
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(3, 1, 8, 8, generator=g), torch.rand(3, generator=g)
    s, dx = torch.ones(3), torch.randn(3, 1, 8, 8, generator=g)
    ctx = Context(model, None, NoGuidance(), x, x, None, 0)
    ref_out, ref_tan = ctx.jvp(x, t, s, dx, torch.ones(3), torch.zeros(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, tan = ctx.jvp(x, t, s, dx.bfloat16(), torch.ones(3), torch.zeros(3))
        emb = model.t_embedder(t)
        plain = model(x, t, s)
    assert out.dtype == tan.dtype == emb.dtype == torch.float32
    assert plain.dtype == torch.bfloat16  # the with-grad forward does run in bf16
    torch.testing.assert_close(tan, ref_tan, rtol=0, atol=1e-2 * float(ref_tan.abs().max()))  # only dx was rounded
    torch.testing.assert_close(out, ref_out)


@pytest.mark.parametrize("name", ["sit-tiny", "lightning-style"])
def test_grad_checkpointing_gives_the_same_outputs_and_gradients_with_less_saved_memory(name):
    """backbones.sit.grad_checkpointing recomputes blocks in the backward: identical numbers, less memory."""
    step_cost = load_bench("step_cost")
    model = randomize(BACKBONES[name]())
    x, t, s, y = jvp_inputs(name, model)[:4]
    results = []
    for flag in (False, True):
        model.grad_checkpointing = flag
        model.zero_grad()
        with step_cost.SavedBytes() as sb:
            out = model(x, t, s, y)
            out.square().mean().backward()
        results.append((out.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None], sb.peak))
        if flag:  # the JVP path (no grad) is unaffected
            _, tangent = flow_map_jvp(model, x, t, s, y, *jvp_inputs(name, model)[4:])
            model.grad_checkpointing = False
            _, reference = flow_map_jvp(model, x, t, s, y, *jvp_inputs(name, model)[4:])
            assert torch.equal(tangent, reference)
    (o0, g0, m0), (o1, g1, m1) = results
    assert torch.equal(o0, o1)
    assert len(g0) == len(g1) and all(torch.equal(a, b) for a, b in zip(g0, g1))
    assert m1 < 0.8 * m0, (m1, m0)
