"""VA-VAE f16d32: the LDM-style KL autoencoder that LightningDiT and FACM train and sample in.

The released tokenizer (hustvl/LightningDiT `tokenizer/autoencoder.py`, `tokenizer/vavae.py`,
`tokenizer/configs/vavae_f16d32.yaml`; the same file in ali-vilab/FACM `ldit/autoencoder.py`) is the
LDM "VQGAN-KL" autoencoder: base width 128, channel multipliers (1, 1, 2, 2, 4) (four 2× down-samplings:
f16), two residual blocks per level (three on the way up), single-head spatial self-attention at 16×16
and in the middle, GroupNorm(32, eps 1e-6) + SiLU, 32 latent channels, a 1×1 `quant_conv` (64 → 64) on
the encoder output and a 1×1 `post_quant_conv` (32 → 32) before the decoder. The encoder's moments
split into mean and log-variance; the log-variance is clamped to [−30, 20]; a posterior sample is
mean + exp(½·logvar)·ε. Down-sampling pads right/bottom by one and convolves 3×3 with stride 2;
up-sampling is nearest 2× then a 3×3 convolution.

Our module keeps the official parameter names (`encoder.down.{i}.block.{j}.conv1.weight`, …), so a
released checkpoint (`vavae-imagenet256-f16d32-dinov2.pt`, a `{'state_dict': ...}` dict that also holds
the training loss's and the vision foundation model's weights) loads by name; `load_vavae` keeps only
the autoencoder's keys and reports missing or mis-shaped ones in one line. Checkpoints are read with
weights-only unpickling; a training checkpoint that holds other objects (a trainer's state) is refused,
and `python -m decm.models.vavae IN.pt OUT.pt` — full unpickling, for a file you trust — keeps only the
autoencoder's tensors in OUT.pt, which then loads weights-only.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

F16D32 = dict(ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(16,), resolution=256,
              z_channels=32)
# Keys of a released checkpoint that are not the autoencoder's (training loss, VF alignment model).
FOREIGN_PREFIXES = ("loss.", "foundation_model.", "linear_proj.")
LOGVAR_RANGE = (-30.0, 20.0)


def swish(x: torch.Tensor) -> torch.Tensor:
    """x·sigmoid(x), written as the official code computes it (F.silu differs in the last bits)."""
    return x * torch.sigmoid(x)


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6, affine=True)


class ResBlock(nn.Module):
    """norm → SiLU → 3×3 conv, twice, plus a 1×1 shortcut when the width changes (no time embedding)."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = _norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        if c_in != c_out:
            self.nin_shortcut = nn.Conv2d(c_in, c_out, 1)

    def forward(self, x):
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(swish(self.norm2(h)))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class SpatialAttention(nn.Module):
    """One-head self-attention over the H·W positions with 1×1-conv projections and a residual."""

    def __init__(self, c: int):
        super().__init__()
        self.norm = _norm(c)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x):
        n, c, hh, ww = x.shape
        h = self.norm(x)
        q, k, v = (m(h).flatten(2) for m in (self.q, self.k, self.v))  # n, c, hw
        weights = torch.softmax(torch.einsum("nci,ncj->nij", q, k) * c ** -0.5, dim=-1)  # query i, key j
        out = torch.einsum("ncj,nij->nci", v, weights)
        return x + self.proj_out(out.reshape(n, c, hh, ww))


class Down(nn.Module):
    """Zero-pad right and bottom by one, then a 3×3 convolution with stride 2."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Up(nn.Module):
    """Nearest-neighbour 2× up-sampling, then a 3×3 convolution."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _level(blocks, attns) -> nn.Module:
    m = nn.Module()
    m.block, m.attn = nn.ModuleList(blocks), nn.ModuleList(attns)
    return m


def _middle(c: int) -> nn.Module:
    m = nn.Module()
    m.block_1, m.attn_1, m.block_2 = ResBlock(c, c), SpatialAttention(c), ResBlock(c, c)
    return m


class Encoder(nn.Module):
    """Image (3×R×R) → moments (2·z_channels × R/f × R/f), f = 2^(len(ch_mult) − 1)."""

    def __init__(self, ch, ch_mult, num_res_blocks, attn_resolutions, resolution, z_channels):
        super().__init__()
        self.conv_in = nn.Conv2d(3, ch, 3, padding=1)
        widths_in = [ch] + [ch * m for m in ch_mult]
        res = resolution
        self.down = nn.ModuleList()
        for i, mult in enumerate(ch_mult):
            c_in, c_out = widths_in[i], ch * mult
            blocks = [ResBlock(c_in if j == 0 else c_out, c_out) for j in range(num_res_blocks)]
            attns = [SpatialAttention(c_out) for _ in range(num_res_blocks)] if res in attn_resolutions else []
            level = _level(blocks, attns)
            if i < len(ch_mult) - 1:
                level.downsample = Down(c_out)
                res //= 2
            self.down.append(level)
        c = ch * ch_mult[-1]
        self.mid = _middle(c)
        self.norm_out = _norm(c)
        self.conv_out = nn.Conv2d(c, 2 * z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[j](h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent (z_channels × r × r) → image (3 × f·r × f·r); `up[i]` is level i (0 = full resolution)."""

    def __init__(self, ch, ch_mult, num_res_blocks, attn_resolutions, resolution, z_channels):
        super().__init__()
        levels = len(ch_mult)
        c = ch * ch_mult[-1]
        res = resolution // 2 ** (levels - 1)
        self.conv_in = nn.Conv2d(z_channels, c, 3, padding=1)
        self.mid = _middle(c)
        ups = [None] * levels
        for i in reversed(range(levels)):  # lowest resolution first, as the data flows
            c_out = ch * ch_mult[i]
            blocks = [ResBlock(c if j == 0 else c_out, c_out) for j in range(num_res_blocks + 1)]
            attns = [SpatialAttention(c_out) for _ in range(num_res_blocks + 1)] if res in attn_resolutions else []
            level = _level(blocks, attns)
            if i > 0:
                level.upsample = Up(c_out)
                res *= 2
            ups[i], c = level, c_out
        self.up = nn.ModuleList(ups)
        self.norm_out = _norm(c)
        self.conv_out = nn.Conv2d(c, 3, 3, padding=1)

    def forward(self, z):
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for level in reversed(self.up):
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[j](h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))


class VAVAE(nn.Module):
    """The KL autoencoder (official parameter names); defaults are the released f16d32 tokenizer.

    Args:
      ch: base width (channels of the full-resolution level).
      ch_mult: width multiplier per level; len − 1 down-samplings.
      num_res_blocks: residual blocks per encoder level (decoder: one more).
      attn_resolutions: feature-map sizes (for a `resolution`-pixel input) that get self-attention.
      resolution: image size in pixels the attention placement refers to.
      z_channels: latent channels.
    """

    def __init__(self, ch: int = 128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks: int = 2, attn_resolutions=(16,),
                 resolution: int = 256, z_channels: int = 32):
        super().__init__()
        cfg = dict(ch=ch, ch_mult=tuple(ch_mult), num_res_blocks=num_res_blocks,
                   attn_resolutions=tuple(attn_resolutions), resolution=resolution, z_channels=z_channels)
        self.config = cfg
        self.encoder = Encoder(**cfg)
        self.decoder = Decoder(**cfg)
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * z_channels, 1)
        self.post_quant_conv = nn.Conv2d(z_channels, z_channels, 1)
        self.downsample = 2 ** (len(ch_mult) - 1)
        self.z_channels = z_channels

    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, log-variance clamped to [−30, 20]) of q(z | x) for images x in [−1, 1]."""
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        return mean, logvar.clamp(*LOGVAR_RANGE)

    def encode(self, x: torch.Tensor, sample: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
        """A posterior sample mean + exp(½·logvar)·ε (ε drawn with `generator` on its device, by default the
        CPU as the official sampler draws it), or the posterior mean with `sample=False`."""
        mean, logvar = self.posterior(x)
        if not sample:
            return mean
        dev = generator.device if generator is not None else torch.device("cpu")
        eps = torch.randn(mean.shape, generator=generator, device=dev, dtype=mean.dtype).to(mean.device)
        return mean + torch.exp(0.5 * logvar) * eps

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latents → images (unclamped; [−1, 1] is the data range)."""
        return self.decoder(self.post_quant_conv(z))


def autoencoder_state(obj) -> dict:
    """The autoencoder's tensors inside a loaded checkpoint object (`state_dict` wrapper, foreign keys dropped)."""
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ValueError("no state dict found (expected tensors or {'state_dict': ...})")
    return {k: v for k, v in obj.items() if not k.startswith(FOREIGN_PREFIXES)}


def load_vavae(path: str, option: str = "--vae-path", **config) -> VAVAE:
    """A VAVAE built from `config` (default f16d32) with the weights of an official checkpoint file.

    Args:
      path: the released `.pt` (or a plain state dict with the official names).
      option: the setting that names `path`, quoted in the error when the file is missing.
      **config: VAVAE arguments (e.g. a smaller test layout).
    """
    if not path or not os.path.isfile(path):
        raise FileNotFoundError(f"VA-VAE checkpoint not found: {path!r} (set {option}; the release is "
                                "vavae-imagenet256-f16d32-dinov2.pt)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 — any unpickling problem is a bad file
        raise ValueError(f"cannot read VA-VAE checkpoint {path} with weights-only loading ({type(e).__name__}); "
                         f"if you trust the file, keep its weights once: python -m decm.models.vavae {path} "
                         f"{os.path.splitext(path)[0]}-weights.pt") from None
    state = autoencoder_state(obj)
    model = VAVAE(**{**F16D32, **config})
    own = model.state_dict()
    missing = sorted(k for k in own if k not in state)
    unexpected = sorted(k for k in state if k not in own)
    shapes = sorted(k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape))
    if missing or unexpected or shapes:
        parts = [f"{name} {keys[:3]}{' …' if len(keys) > 3 else ''}"
                 for name, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shapes)) if keys]
        raise ValueError(f"{path} is not a VA-VAE f16d32 checkpoint: " + "; ".join(parts))
    model.load_state_dict(state)
    return model.eval().requires_grad_(False)


def main(argv=None) -> int:
    """python -m decm.models.vavae IN.pt OUT.pt: the autoencoder's tensors of a trusted checkpoint, weights-only."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m decm.models.vavae",
                                description="Keep the VA-VAE weights of a trusted checkpoint (full unpickling) in a "
                                            "file that loads weights-only.")
    p.add_argument("src", help="the released checkpoint (e.g. vavae-imagenet256-f16d32-dinov2.pt); unpickled in full")
    p.add_argument("dst", help="output file: {'state_dict': autoencoder tensors}")
    args = p.parse_args(argv)
    if not os.path.isfile(args.src):
        print(f"decm.models.vavae: error: {args.src} does not exist", file=sys.stderr)
        return 2
    try:
        state = autoencoder_state(torch.load(args.src, map_location="cpu", weights_only=False))
        state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
        tmp = args.dst + ".tmp"
        torch.save({"state_dict": state}, tmp)
        os.replace(tmp, args.dst)
    except (ValueError, RuntimeError, OSError) as e:
        print(f"decm.models.vavae: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(f"{len(state)} tensors → {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
