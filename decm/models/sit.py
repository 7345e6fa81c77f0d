"""Flow-map SiT / DiT / LightningDiT built on timm blocks.

F_θ(x, t, s, y): a DiT whose adaLN condition is t_emb(t) + s_emb(s) + y_emb(y). The s-embedder's
output layer is zero-initialised, so a student loaded from a teacher returns exactly the teacher's
velocity at initialisation for every s. Module and parameter names follow the official SiT/DiT files
(`x_embedder.proj`, `t_embedder.mlp.{0,2}`, `y_embedder.embedding_table`, `blocks.i.attn.qkv`,
`blocks.i.adaLN_modulation.1`, `final_layer.linear`, ...) and LightningDiT's (`mlp.w12`, `mlp.w3`,
RMSNorm weights, `feat_rope.freqs_cos/sin`), so official checkpoints map by name.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Attention, Mlp
from torch import nn

from decm.dtypes import at_least_fp32
from decm.registry import register

# name: (depth, hidden_size, num_heads, patch_size, extra options)
PRESETS = {
    "tiny": dict(depth=4, hidden_size=128, num_heads=4, patch_size=2),
    "tiny/1": dict(depth=4, hidden_size=128, num_heads=4, patch_size=1),
    "small-cpu": dict(depth=6, hidden_size=192, num_heads=6, patch_size=2),
    "S/2": dict(depth=12, hidden_size=384, num_heads=6, patch_size=2),
    "B/2": dict(depth=12, hidden_size=768, num_heads=12, patch_size=2),
    "L/2": dict(depth=24, hidden_size=1024, num_heads=16, patch_size=2),
    "XL/2": dict(depth=28, hidden_size=1152, num_heads=16, patch_size=2),
    # ≈ 2.1B parameters (DiT-style, width 2048, 28 blocks): the size of today's smaller MMDiT teachers, the
    # scale at which one GPU's fp32 training state (≈ 34 GB + a teacher copy) asks for sharding (FSDP).
    "2B/2": dict(depth=28, hidden_size=2048, num_heads=16, patch_size=2),
    # LightningDiT-XL/1 (VA-VAE f16d32 latents 32×16×16): SwiGLU, RMSNorm, 2-D RoPE, learn_sigma off.
    "LightningDiT-XL/1": dict(depth=28, hidden_size=1152, num_heads=16, patch_size=1, mlp_type="swiglu",
                              norm_type="rms", use_rope=True, learn_sigma=False),
}


def flow_map_condition(model, t, s, y):
    """The condition t_emb(t) + s_emb(s) + y_emb(y) shared by every flow-map backbone.

    s_emb is absent on velocity models and zero at initialisation on students (so F = v for any s);
    s = None means s = t; y = None means the null class `model.num_classes`.
    """
    c = model.t_embedder(t)
    if model.s_embedder is not None:
        c = c + model.s_embedder(t if s is None else s)
    if model.y_embedder is not None:
        if y is None:
            y = torch.full((t.shape[0],), model.num_classes, dtype=torch.long, device=t.device)
        c = c + model.y_embedder(y)
    return c


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class TimestepEmbedder(nn.Module):
    """Sinusoidal embedding of a scalar time followed by a 2-layer MLP, computed in float32."""

    def __init__(self, hidden_size: int, frequency_size: int = 256, time_scale: float = 1.0, zero_init: bool = False):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))
        self.frequency_size, self.time_scale, self.zero_init = frequency_size, time_scale, zero_init

    def embedding(self, t):
        half = self.frequency_size // 2
        dtype = at_least_fp32(t.dtype)
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=dtype) / half)
        args = (self.time_scale * t.to(dtype)).unsqueeze(1) * freqs.unsqueeze(0)
        return torch.cat([torch.cos(args), torch.sin(args)], dim=1)

    def forward(self, t):
        with torch.autocast(device_type=t.device.type, enabled=False):
            emb = self.embedding(t)
            return self.mlp(emb.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class embedding table with one extra row (index num_classes) for the null / dropped class."""

    def __init__(self, num_classes: int, hidden_size: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)
        self.num_classes = num_classes

    def forward(self, y):
        return self.embedding_table(y)


class RMSNorm(nn.Module):
    """RMSNorm with a learned scale (LightningDiT's norm1 / norm2 / norm_final)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class SwiGLU(nn.Module):
    """SwiGLU MLP: w3(silu(a) ⊙ b), [a; b] = w12(x) (LightningDiT key names)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x):
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)


class Rope2D(nn.Module):
    """2-D rotary embedding for a √N × √N token grid (half the head dim per axis); cos/sin are buffers."""

    def __init__(self, head_dim: int, grid_size: int, theta: float = 10000.0):
        super().__init__()
        quarter = head_dim // 4
        inv = 1.0 / theta ** (torch.arange(quarter, dtype=torch.float64) / quarter)
        pos = torch.arange(grid_size, dtype=torch.float64)
        ang = torch.outer(pos, inv)                                      # (G, D/4)
        ang = torch.repeat_interleave(ang, 2, dim=-1)                    # (G, D/2), pairs adjacent
        rows = ang.unsqueeze(1).expand(grid_size, grid_size, -1)
        cols = ang.unsqueeze(0).expand(grid_size, grid_size, -1)
        full = torch.cat([rows, cols], dim=-1).reshape(grid_size * grid_size, -1)  # (N, D)
        self.register_buffer("freqs_cos", full.cos().float())
        self.register_buffer("freqs_sin", full.sin().float())

    def forward(self, x):
        x1, x2 = x[..., 0::2], x[..., 1::2]
        rotated = torch.stack([-x2, x1], dim=-1).flatten(-2)
        return x * self.freqs_cos.to(x.dtype) + rotated * self.freqs_sin.to(x.dtype)


class RopeAttention(nn.Module):
    """Multi-head self-attention with optional qk-norm and 2-D RoPE (LightningDiT); fused SDPA."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.q_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, rope=None):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = rope(q), rope(k)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class DiTBlock(nn.Module):
    """adaLN-zero transformer block: timm Attention / Mlp (SiT) or RoPE attention / SwiGLU (LightningDiT)."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, mlp_type="gelu", norm_type="layernorm",
                 qk_norm=False, use_rope=False):
        super().__init__()
        if norm_type == "rms":
            self.norm1, self.norm2 = RMSNorm(hidden_size), RMSNorm(hidden_size)
        else:
            self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
            self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        if use_rope:
            self.attn = RopeAttention(hidden_size, num_heads, qk_norm=qk_norm)
        else:
            self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True, qk_norm=qk_norm)
        hidden = int(hidden_size * mlp_ratio)
        if mlp_type == "swiglu":
            self.mlp = SwiGLU(hidden_size, int(2 * hidden / 3))
        else:
            self.mlp = Mlp(hidden_size, hidden, act_layer=lambda: nn.GELU(approximate="tanh"))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))
        self.use_rope = use_rope

    def forward(self, x, c, rope=None):
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaLN_modulation(c).chunk(6, dim=1)
        h = modulate(self.norm1(x), shift_a, scale_a)
        h = self.attn(h, rope) if self.use_rope else self.attn(h)
        x = x + gate_a.unsqueeze(1) * h
        x = x + gate_m.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_m, scale_m))
        return x


class FinalLayer(nn.Module):
    def __init__(self, hidden_size, patch_size, out_channels, norm_type="layernorm"):
        super().__init__()
        self.norm_final = RMSNorm(hidden_size) if norm_type == "rms" else \
            nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def sincos_pos_embed_2d(dim: int, grid: int) -> np.ndarray:
    """Fixed 2-D sin-cos position embedding (grid² × dim), half the channels per axis (DiT layout)."""
    def one_axis(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    gw, gh = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64))
    return np.concatenate([one_axis(dim // 2, gw), one_axis(dim // 2, gh)], axis=1)


class FlowMapDiT(nn.Module):
    """Flow-map DiT/SiT: F_θ(x, t, s, y) with adaLN condition t_emb(t) + s_emb(s) + y_emb(y).

    Args:
      input_size: spatial size of the (latent) image.
      in_channels: channels of the (latent) image.
      patch_size: patch size.
      hidden_size: width.
      depth: number of blocks.
      num_heads: attention heads.
      mlp_ratio: MLP hidden / width.
      num_classes: classes (0: unconditional); row `num_classes` of the table is the null class.
      flow_map: adds the s-embedder (zero-initialised output layer); False makes a plain velocity model.
      learn_sigma: SiT/DiT checkpoints predict 2× channels; only the first `in_channels` are used.
      mlp_type: 'gelu' (timm Mlp) or 'swiglu'.
      norm_type: 'layernorm' (no affine) or 'rms' (with weight).
      qk_norm: RMSNorm on queries and keys.
      use_rope: 2-D RoPE in attention (LightningDiT).
      time_scale: t is multiplied by this before the sinusoidal embedding (SiT feeds raw t: 1.0).
      grad_checkpointing: with grad enabled, recompute each block in the backward
        (torch.utils.checkpoint, non-reentrant): activation memory of about one block instead of
        `depth`, for about one extra forward of time. Same outputs and gradients (tested). No-grad
        forwards and the JVPs never checkpoint.
    """

    def __init__(self, input_size=32, in_channels=4, patch_size=2, hidden_size=1152, depth=28, num_heads=16,
                 mlp_ratio=4.0, num_classes=1000, flow_map=True, learn_sigma=True, mlp_type="gelu",
                 norm_type="layernorm", qk_norm=False, use_rope=False, time_scale=1.0, grad_checkpointing=False):
        super().__init__()
        self.grad_checkpointing = grad_checkpointing
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        self.in_channels, self.patch_size, self.num_classes = in_channels, patch_size, num_classes
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.flow_map, self.input_size = flow_map, input_size
        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size, bias=True)
        self.t_embedder = TimestepEmbedder(hidden_size, time_scale=time_scale)
        self.s_embedder = TimestepEmbedder(hidden_size, time_scale=time_scale, zero_init=True) if flow_map else None
        self.y_embedder = LabelEmbedder(num_classes, hidden_size) if num_classes > 0 else None
        grid = input_size // patch_size
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid, hidden_size), requires_grad=False)
        self.feat_rope = Rope2D(hidden_size // num_heads, grid) if use_rope else None
        self.blocks = nn.ModuleList([
            DiTBlock(hidden_size, num_heads, mlp_ratio, mlp_type, norm_type, qk_norm, use_rope) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, norm_type)
        self.initialize_weights()

    def initialize_weights(self):
        """DiT initialisation: xavier linears, adaLN-zero, zero final layer, zero s-embedder output."""
        if self.pos_embed.is_meta:
            return
        def xavier(m):
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self.apply(xavier)
        grid = self.input_size // self.patch_size
        self.pos_embed.data.copy_(torch.from_numpy(sincos_pos_embed_2d(self.pos_embed.shape[-1], grid)).float().unsqueeze(0))
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        embedders = [self.t_embedder] + ([self.s_embedder] if self.s_embedder is not None else [])
        for emb in embedders:
            nn.init.normal_(emb.mlp[0].weight, std=0.02)
            nn.init.normal_(emb.mlp[2].weight, std=0.02)
        if self.s_embedder is not None:
            zero_s_embedder(self)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def unpatchify(self, x):
        p, c = self.patch_size, self.out_channels
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, h * p, w * p)

    def forward(self, x, t, s=None, y=None):
        """F(x, t, s, y); s is ignored by a plain velocity model (flow_map=False); s = None means s = t."""
        h = self.x_embedder(x) + self.pos_embed.to(x.dtype)
        c = flow_map_condition(self, t, s, y)
        c = c.to(h.dtype)
        recompute = self.grad_checkpointing and torch.is_grad_enabled() and not _is_dual(h)
        for block in self.blocks:
            if recompute:
                h = torch.utils.checkpoint.checkpoint(block, h, c, self.feat_rope, use_reentrant=False)
            else:
                h = block(h, c, self.feat_rope)
        out = self.unpatchify(self.final_layer(h, c))
        return out[:, : self.in_channels]


def _is_dual(x: torch.Tensor) -> bool:
    """True inside a forward-AD JVP (a dual tensor), where blocks are not checkpointed."""
    return torch.autograd.forward_ad.unpack_dual(x).tangent is not None


def zero_s_embedder(model: nn.Module) -> None:
    """Zeroes the s-embedder's output layer, so F(x, t, s) does not depend on s (student = teacher)."""
    nn.init.zeros_(model.s_embedder.mlp[2].weight)
    nn.init.zeros_(model.s_embedder.mlp[2].bias)


@register("backbones", "sit", denylist=("input_size", "in_channels", "num_classes", "flow_map"))
def sit(preset: str = "tiny", input_size: int = 32, in_channels: int = 4, num_classes: int = 1000,
        flow_map: bool = True, **overrides) -> FlowMapDiT:
    """Flow-map SiT/DiT/LightningDiT from a size preset (tiny, tiny/1, small-cpu, S/2, B/2, L/2, XL/2, 2B/2, LightningDiT-XL/1).

    Args:
      preset: a key of `PRESETS`.
      input_size: latent/image size (set by the dataset).
      in_channels: channels (set by the dataset).
      num_classes: classes (set by the dataset; 0 unconditional).
      flow_map: add the zero-initialised s input (students) or not (teachers).
      **overrides: any FlowMapDiT argument (e.g. time_scale, qk_norm, mlp_ratio).
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown sit preset {preset!r}; choices: {', '.join(PRESETS)}")
    cfg = dict(learn_sigma=False)
    cfg.update(PRESETS[preset])
    cfg.update(overrides)
    return FlowMapDiT(input_size=input_size, in_channels=in_channels, num_classes=num_classes, flow_map=flow_map, **cfg)
