"""Flow-map backbones: F_θ(x, t, s, y) — SiT/DiT on timm blocks, LightningDiT-style, and an MLP for 2-D."""

from decm.models import mlp, sit  # noqa: F401
