"""Sharded precomputed VAE latents (ImageNet-256 and friends) with an exactly resumable sampler.

On-disk format `decm-latents-v1` (written by `python -m decm.data.encode_latents`):

    <root>/index.json
        {"format": "decm-latents-v1",
         "shape": [C, H, W],            # one latent, e.g. [4, 32, 32] (SD-VAE f8) or [32, 16, 16] (VA-VAE f16d32)
         "num_classes": 1000,
         "num_samples": N,
         "shards": [{"name": "shard-00000", "count": n0}, ...],   # in order; global index = shard offset + row
         "vae": "sd-vae-ft-ema",        # what encoded them (the decoder evaluation needs)
         "scale": 0.18215, "shift": 0.0, # model input = (latent − shift) · scale
         "channel_mean": null, "channel_std": null,   # or per-channel lists: (latent − mean) / std · scale instead
         "has_flip": false,             # shard-*.latents_flip.npy present (latents of the mirrored images)
         "posterior": "mean"}           # 'sample' or 'mean' of the encoder's posterior
    <root>/latents_stats.pt              # VA-VAE: the statistics in LightningDiT's format ({'mean', 'std'}: 1×C×1×1)
    <root>/shard-00000.latents.npy       # float16 or float32, (n, C, H, W), raw VAE latents
    <root>/shard-00000.labels.npy        # int64, (n,)
    <root>/shard-00000.latents_flip.npy  # optional, (n, C, H, W)
    <root>/shard-00000.ok                # completion marker (the encoder is resumable shard by shard)

Shards are memory-mapped; nothing is read until a batch asks for it, so dry runs need no files.
The sampler is a pure function of (seed, step, rank, world size): epoch e visits a permutation drawn
from (seed, e); step k on rank r reads global positions k·B·W + r·B … + B − 1. Resuming at step k reads
exactly what an uninterrupted run would have read, on any number of restarts.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch

from decm.data.builtin import Dataset
from decm.registry import register

FORMAT = "decm-latents-v1"


def epoch_positions(step: int, batch_per_rank: int, rank: int, world_size: int, num_samples: int,
                    seed: int) -> np.ndarray:
    """Dataset indices of one rank's batch at `step` (distributed, epoch-permuted, stateless)."""
    start = (step * world_size + rank) * batch_per_rank
    pos = np.arange(start, start + batch_per_rank, dtype=np.int64)
    epochs, offsets = pos // num_samples, pos % num_samples
    out = np.empty_like(pos)
    for e in np.unique(epochs):
        perm = np.random.default_rng([seed, int(e)]).permutation(num_samples)
        sel = epochs == e
        out[sel] = perm[offsets[sel]]
    return out


@register("datasets", "latents")
class Latents(Dataset):
    """Precomputed latents + labels in shards (format in the module docstring).

    Shape and classes come from gin so a dry run needs no files; `check()` compares them with
    index.json before training.

    Args:
      path: directory holding index.json and the shards.
      shape: one latent (C, H, W); must match index.json.
      num_classes: classes (must match index.json); 0 trains unconditionally (labels ignored).
      seed: seed of the epoch permutations.
      flip: with probability ½ use the mirrored image's latents (needs has_flip).
    """

    def __init__(self, path: str = "", shape=(4, 32, 32), num_classes: int = 1000, seed: int = 0,
                 flip: bool = False):
        self.path, self.shape, self.num_classes = path, tuple(shape), num_classes
        self.seed, self.flip = seed, flip
        self._index = None
        self._arrays = None

    def check(self) -> dict:
        """Loads index.json and validates it against the gin settings (one-line errors naming the binding)."""
        if self._index is not None:
            return self._index
        if not self.path:
            raise FileNotFoundError("latents path is not set (set datasets.latents.path)")
        index_path = os.path.join(self.path, "index.json")
        if not os.path.isfile(index_path):
            raise FileNotFoundError(f"latents not found: {index_path} does not exist (set datasets.latents.path; "
                                    "make them with python -m decm.data.encode_latents)")
        with open(index_path) as f:
            index = json.load(f)
        if index.get("format") != FORMAT:
            raise ValueError(f"{index_path}: format {index.get('format')!r}, expected {FORMAT!r}")
        if tuple(index["shape"]) != self.shape:
            raise ValueError(f"{index_path}: latent shape {tuple(index['shape'])} but datasets.latents.shape = {self.shape}")
        if self.num_classes and int(index["num_classes"]) != self.num_classes:
            raise ValueError(f"{index_path}: {index['num_classes']} classes but datasets.latents.num_classes = "
                             f"{self.num_classes}")
        if self.flip and not index.get("has_flip"):
            raise ValueError(f"{index_path}: no flipped latents (has_flip false) but datasets.latents.flip = True")
        total = sum(int(s["count"]) for s in index["shards"])
        if total != int(index["num_samples"]) or total == 0:
            raise ValueError(f"{index_path}: shard counts sum to {total}, num_samples = {index['num_samples']}")
        for s in index["shards"]:
            for suffix in ("latents", "labels"):
                p = os.path.join(self.path, f"{s['name']}.{suffix}.npy")
                if not os.path.isfile(p):
                    raise FileNotFoundError(f"latents shard missing: {p}")
        self._index = index
        return index

    def __len__(self) -> int:
        return int(self.check()["num_samples"])

    def _open(self):
        if self._arrays is None:
            index = self.check()
            lat, lab, flip = [], [], []
            for s in index["shards"]:
                base = os.path.join(self.path, s["name"])
                lat.append(np.load(base + ".latents.npy", mmap_mode="r"))
                lab.append(np.load(base + ".labels.npy", mmap_mode="r"))
                if index.get("has_flip"):
                    flip.append(np.load(base + ".latents_flip.npy", mmap_mode="r"))
            offsets = np.cumsum([0] + [len(a) for a in lat])
            self._arrays = (lat, lab, flip, offsets)
        return self._arrays

    def _channel_stats(self, x: torch.Tensor):
        index = self.check()
        if index.get("channel_mean") is None:
            return None
        mean = torch.tensor(index["channel_mean"], dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(index["channel_std"], dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return mean, std

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Raw VAE latents → model inputs: (x − mean) / std · scale with per-channel statistics (LightningDiT's
        ImgLatentDataset, scale = latent_multiplier), else (x − shift) · scale."""
        index, stats = self.check(), self._channel_stats(x)
        if stats is not None:
            return (x - stats[0]) / stats[1] * float(index.get("scale", 1.0))
        return (x - float(index.get("shift", 0.0))) * float(index.get("scale", 1.0))

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Model outputs → raw VAE latents (for decoding): the inverse of `normalize` (LightningDiT's
        inference.py: x · std / latent_multiplier + mean)."""
        index, stats = self.check(), self._channel_stats(x)
        if stats is not None:
            return x * stats[1] / float(index.get("scale", 1.0)) + stats[0]
        return x / float(index.get("scale", 1.0)) + float(index.get("shift", 0.0))

    def read(self, indices: np.ndarray, use_flip: np.ndarray | None = None):
        """Latents (normalised, float32) and labels at global `indices`."""
        lat, lab, flip, offsets = self._open()
        shard = np.searchsorted(offsets, indices, side="right") - 1
        xs, ys = [], []
        for i, (idx, sh) in enumerate(zip(indices, shard)):
            row = int(idx - offsets[sh])
            src = flip[sh] if (use_flip is not None and use_flip[i]) else lat[sh]
            xs.append(np.asarray(src[row], dtype=np.float32))
            ys.append(int(lab[sh][row]))
        x = self.normalize(torch.from_numpy(np.stack(xs)))
        y = torch.tensor(ys, dtype=torch.long)
        return x, (y if self.num_classes else None)

    def batch_at(self, step: int, n: int, rank: int = 0, world_size: int = 1):
        """The batch of `rank` at `step` (see epoch_positions): the resumable distributed sampler."""
        idx = epoch_positions(step, n, rank, world_size, len(self), self.seed)
        use_flip = None
        if self.flip:
            use_flip = np.random.default_rng([self.seed, step, rank, 1]).random(n) < 0.5
        return self.read(idx, use_flip)

    def batch(self, n: int, generator=None):
        idx = torch.randint(0, len(self), (n,), generator=generator).numpy()
        return self.read(idx)

    def reference(self, n: int, generator=None):
        n = min(n, len(self))
        idx = torch.randperm(len(self), generator=generator)[:n].numpy()
        return self.read(idx)
