"""Encode an ImageFolder into `decm-latents-v1` shards (see decm.data.latents): distributed, resumable.

    torchrun --nproc-per-node 8 -m decm.data.encode_latents --image-folder /data/imagenet/train \
        --out /data/in256-vavae --vae vavae-f16d32 --vae-path /ckpt/vavae-imagenet256-f16d32-dinov2.pt \
        --latent-stats /ckpt/latents_stats.pt
    python -m decm.data.encode_latents --image-folder /data/imagenet/train --out /data/in256-sdvae \
        --vae sd-vae-ft-ema --image-size 256 --shard-size 10000 [--flip]

Images are sorted by (class folder, file name); shard i holds images [i·S, (i+1)·S). Rank r encodes
shards i ≡ r (mod world size), writing each shard's arrays to temporary files, renaming them, then
writing `shard-XXXXX.ok`; a rerun skips every shard whose `.ok` matches. Rank 0 writes index.json once
all shards are present. Preprocessing: ADM center crop to `image-size`, values in [−1, 1]; the encoder
stores raw latents (a posterior sample or the mean, `--posterior`) and index.json records how the model
inputs are made from them (scale, or per-channel statistics).

VAEs:
  - `vavae-f16d32`: the VA-VAE of LightningDiT (decm.models.vavae; weights: --vae-path). Stored and
    normalised as LightningDiT's `extract_features.py` and `ImgLatentDataset` do: by default a posterior
    *sample* of every image and of its horizontal flip, float32; per-channel mean and std (unbiased) over
    the stored non-flipped latents of min(10,000, N) images drawn without replacement — or the released
    `latents_stats.pt` with --latent-stats, which the released teacher was trained with — and model inputs
    (z − mean) / std × latent_multiplier (1.0). The statistics go into index.json (channel_mean,
    channel_std) and, in the official format, into `<out>/latents_stats.pt`. Posterior noise comes from a
    CPU generator seeded by (seed, shard), so a shard's latents do not depend on the world size.
  - `vavae-small`: the same layout at base width 32 (tests, CPU runs of the whole path).
  - `sd-vae-ft-ema` / `sd-vae-ft-mse` (diffusers AutoencoderKL; needs `pip install diffusers` and the
    weights in the Hugging Face cache or --vae-path): posterior mean, scale 0.18215, no flips by default.
  - `avgpool-test`, a deterministic stand-in (8× average pooling, fixed 3→4 channel mix) used by the tests
    and for dry plumbing runs on CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch

from decm.data.latents import FORMAT

# name → scale (the latent multiplier), channel statistics, default posterior, default flips, default dtype.
VAES = {
    "vavae-f16d32": dict(scale=1.0, channel_stats=True, posterior="sample", flip=True, dtype="float32"),
    "vavae-small": dict(scale=1.0, channel_stats=True, posterior="sample", flip=True, dtype="float32"),
    "sd-vae-ft-ema": dict(scale=0.18215, channel_stats=False, posterior="mean", flip=False, dtype="float16"),
    "sd-vae-ft-mse": dict(scale=0.18215, channel_stats=False, posterior="mean", flip=False, dtype="float16"),
    "avgpool-test": dict(scale=1.0, channel_stats=False, posterior="mean", flip=False, dtype="float16"),
}
VAVAE_LAYOUTS = {"vavae-f16d32": {}, "vavae-small": {"ch": 32}}  # VAVAE arguments over the f16d32 defaults
STATS_IMAGES = 10000  # LightningDiT's ImgLatentDataset.compute_latent_stats: min(10000, N) random images
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".JPEG")


def list_images(folder: str) -> tuple[list[tuple[str, int]], list[str]]:
    """(path, class index) sorted by class folder then file name, and the class names."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"image folder not found: {folder}")
    classes = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
    if not classes:
        raise ValueError(f"{folder} has no class sub-folders (ImageFolder layout: <folder>/<class>/<image>)")
    items = []
    for ci, c in enumerate(classes):
        for name in sorted(os.listdir(os.path.join(folder, c))):
            if name.endswith(IMAGE_EXTENSIONS):
                items.append((os.path.join(folder, c, name), ci))
    if not items:
        raise ValueError(f"{folder} holds no images with extensions {IMAGE_EXTENSIONS}")
    return items, classes


def center_crop(img, size: int):
    """ADM / DiT center crop: halve with BOX while ≥ 2× size, BICUBIC resize, crop the center."""
    from PIL import Image

    while min(*img.size) >= 2 * size:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
    scale = size / min(*img.size)
    img = img.resize(tuple(round(x * scale) for x in img.size), resample=Image.BICUBIC)
    arr = np.array(img)
    y, x = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[y: y + size, x: x + size]


def load_batch(paths, size: int) -> torch.Tensor:
    from PIL import Image

    arrs = [center_crop(Image.open(p).convert("RGB"), size) for p in paths]
    x = torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


class AvgPoolTestVAE(torch.nn.Module):
    """Deterministic stand-in encoder: 8× average pooling and a fixed 3→4 channel mix (no weights)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mix", torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0],
                                                  [1 / 3, 1 / 3, 1 / 3]]))

    def encode(self, x, sample=False, generator=None):  # noqa: ARG002
        h = torch.nn.functional.avg_pool2d(x, 8)
        return torch.einsum("oc,nchw->nohw", self.mix.to(h), h)

    def decode(self, z):
        """Left inverse on the pooled image: the first three channels, upsampled 8× (nearest)."""
        return torch.nn.functional.interpolate(z[:, :3], scale_factor=8, mode="nearest")


class DiffusersVAE(torch.nn.Module):
    """diffusers AutoencoderKL (SD-VAE): posterior mean, or a sample with `sample=True`."""

    def __init__(self, name: str, path: str | None):
        super().__init__()
        try:
            from diffusers.models import AutoencoderKL
        except ImportError:
            raise SystemExit(f"encode_latents: error: --vae {name} needs diffusers (pip install diffusers) "
                             "and the weights (Hugging Face cache or --vae-path)") from None
        self.vae = AutoencoderKL.from_pretrained(path or f"stabilityai/{name}")

    def encode(self, x, sample=False, generator=None):
        dist = self.vae.encode(x).latent_dist
        return dist.sample(generator=generator) if sample else dist.mean

    @torch.no_grad()
    def decode(self, z):
        return self.vae.decode(z).sample


class VAVAECodec(torch.nn.Module):
    """The VA-VAE (decm.models.vavae) behind the encode(x, sample, generator) / decode(z) interface."""

    def __init__(self, name: str, path: str | None, option: str):
        super().__init__()
        from decm.models.vavae import load_vavae

        self.vae = load_vavae(path, option, **VAVAE_LAYOUTS[name])

    @torch.no_grad()
    def encode(self, x, sample=True, generator=None):
        return self.vae.encode(x, sample, generator)

    @torch.no_grad()
    def decode(self, z):
        return self.vae.decode(z)


def make_vae(name: str, path: str | None, option: str = "--vae-path"):
    """The named VAE; `option` is the setting that names its weights file (quoted when it is missing)."""
    if name == "avgpool-test":
        return AvgPoolTestVAE()
    if name in VAVAE_LAYOUTS:
        return VAVAECodec(name, path, option)
    if name in ("sd-vae-ft-ema", "sd-vae-ft-mse"):
        return DiffusersVAE(name, path)
    raise ValueError(f"unknown VAE {name!r}; choices: {', '.join(VAES)}")


def shard_name(i: int) -> str:
    return f"shard-{i:05d}"


def shard_done(out: str, i: int, count: int) -> bool:
    ok = os.path.join(out, shard_name(i) + ".ok")
    if not os.path.isfile(ok):
        return False
    with open(ok) as f:
        return f.read().strip() == str(count)


def save_array(path: str, arr: np.ndarray) -> None:
    tmp = path + ".tmp.npy"
    np.save(tmp, arr)
    os.replace(tmp, path)


def encode_shard(vae, items, out: str, i: int, args, device) -> None:
    """Encodes one shard: per batch the images, then (with flips) the mirrored images, as extract_features.py."""
    lat, lab, lat_flip = [], [], []
    g = torch.Generator().manual_seed(args.seed * 100003 + i)  # CPU: the same latents on any device
    sample = args.posterior == "sample"
    for b in range(0, len(items), args.batch_size):
        chunk = items[b: b + args.batch_size]
        x = load_batch([p for p, _ in chunk], args.image_size).to(device)
        with torch.no_grad():
            lat.append(vae.encode(x, sample, g).float().cpu().numpy())
            if args.flip:
                lat_flip.append(vae.encode(x.flip(-1), sample, g).float().cpu().numpy())
        lab.extend(c for _, c in chunk)
    dtype = np.float16 if args.dtype == "float16" else np.float32
    base = os.path.join(out, shard_name(i))
    save_array(base + ".latents.npy", np.concatenate(lat).astype(dtype))
    save_array(base + ".labels.npy", np.asarray(lab, dtype=np.int64))
    if args.flip:
        save_array(base + ".latents_flip.npy", np.concatenate(lat_flip).astype(dtype))
    with open(base + ".ok.tmp", "w") as f:
        f.write(str(len(items)))
    os.replace(base + ".ok.tmp", base + ".ok")


def computed_stats(out: str, shards, seed: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per-channel mean and std (unbiased) over the stored non-flipped latents of min(10,000, N) images drawn
    without replacement (seeded), as LightningDiT's ImgLatentDataset.compute_latent_stats: (1, C, 1, 1) each."""
    counts = [len(s) for s in shards]
    total = sum(counts)
    pick = np.sort(np.random.default_rng([seed, 7]).choice(total, min(STATS_IMAGES, total), replace=False))
    offsets = np.cumsum([0] + counts)
    rows = []
    for i in range(len(shards)):
        sel = pick[(pick >= offsets[i]) & (pick < offsets[i + 1])] - offsets[i]
        if len(sel):
            arr = np.load(os.path.join(out, shard_name(i) + ".latents.npy"), mmap_mode="r")
            rows.append(torch.from_numpy(np.asarray(arr[sel], dtype=np.float32)))
    z = torch.cat(rows)
    return z.mean(dim=(0, 2, 3), keepdim=True), z.std(dim=(0, 2, 3), keepdim=True), len(z)


def released_stats(path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean and std of a `latents_stats.pt` file ({'mean', 'std'}, each (1, C, 1, 1))."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"latent statistics file not found: {path} (set --latent-stats; the release is "
                                "latents_stats.pt beside the VA-VAE checkpoint)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
        return obj["mean"].float(), obj["std"].float()
    except Exception as e:  # noqa: BLE001 — a bad file is one line
        raise ValueError(f"cannot read latent statistics {path}: {type(e).__name__}: {e}".splitlines()[0]) from None


def latent_stats(out: str, shards, shape, args) -> dict:
    """index.json entries for the per-channel statistics (VA-VAE), written also as `<out>/latents_stats.pt`."""
    if not VAES[args.vae]["channel_stats"]:
        return {"channel_mean": None, "channel_std": None}
    if args.latent_stats:
        mean, std = released_stats(args.latent_stats)
        source = os.path.abspath(args.latent_stats)
    else:
        mean, std, n = computed_stats(out, shards, args.seed)
        source = f"computed from {n} stored latents"
    if mean.numel() != shape[0] or std.numel() != shape[0]:
        raise ValueError(f"latent statistics have {mean.numel()} channels, the latents {shape[0]} (--latent-stats)")
    tmp = os.path.join(out, "latents_stats.pt.tmp")
    torch.save({"mean": mean.view(1, -1, 1, 1), "std": std.view(1, -1, 1, 1)}, tmp)
    os.replace(tmp, os.path.join(out, "latents_stats.pt"))
    return {"channel_mean": mean.flatten().tolist(), "channel_std": std.flatten().tolist(), "stats_source": source}


def write_index(out: str, shards, classes, shape, args) -> None:
    index = {"format": FORMAT, "shape": list(shape), "num_classes": len(classes),
             "num_samples": sum(len(s) for s in shards),
             "shards": [{"name": shard_name(i), "count": len(s)} for i, s in enumerate(shards)],
             "vae": args.vae, "scale": VAES[args.vae]["scale"], "shift": 0.0,
             **latent_stats(out, shards, shape, args),
             "has_flip": bool(args.flip), "image_size": args.image_size, "classes": classes,
             "posterior": args.posterior}
    tmp = os.path.join(out, "index.json.tmp")
    with open(tmp, "w") as f:
        json.dump(index, f, indent=1)
    os.replace(tmp, os.path.join(out, "index.json"))


def build_parser() -> argparse.ArgumentParser:
    from decm import cli

    p = cli.parser("python -m decm.data.encode_latents", __doc__)
    p.add_argument("--image-folder", required=True, help="ImageFolder root (<root>/<class>/<image>)")
    p.add_argument("--out", required=True, help="output directory (created; reruns resume)")
    p.add_argument("--vae", default="sd-vae-ft-ema", help=f"one of {', '.join(VAES)}")
    p.add_argument("--vae-path", default=None,
                   help="weights: the VA-VAE checkpoint file (required), or a local diffusers directory")
    p.add_argument("--latent-stats", default=None,
                   help="VA-VAE: the released latents_stats.pt to normalise with (default: computed from the shards)")
    p.add_argument("--image-size", type=int, default=256, help="pixels (center crop)")
    p.add_argument("--shard-size", type=int, default=10000, help="images per shard")
    p.add_argument("--batch-size", type=int, default=64, help="images per encoder call")
    p.add_argument("--dtype", default=None, choices=("float16", "float32"),
                   help="stored latent dtype (default: float32 for the VA-VAE, as released; float16 otherwise)")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                   help="also store latents of the mirrored images (default: on for the VA-VAE, off otherwise)")
    p.add_argument("--posterior", default=None, choices=("sample", "mean"),
                   help="store a posterior sample or its mean (default: sample for the VA-VAE, mean otherwise)")
    p.add_argument("--sample", action="store_true", help="the same as --posterior sample")
    p.add_argument("--seed", type=int, default=0, help="seed of posterior samples")
    p.add_argument("--device", default="auto", help="'cpu', 'cuda' or 'auto'")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from decm import distributed

    try:
        if args.vae not in VAES:
            raise ValueError(f"unknown --vae {args.vae!r}; choices: {', '.join(VAES)}")
        if args.sample and args.posterior == "mean":
            raise ValueError("--sample and --posterior mean contradict each other")
        defaults = VAES[args.vae]
        args.posterior = "sample" if args.sample else (args.posterior or defaults["posterior"])
        args.flip = defaults["flip"] if args.flip is None else args.flip
        args.dtype = args.dtype or defaults["dtype"]
        if args.latent_stats and not defaults["channel_stats"]:
            raise ValueError(f"--latent-stats applies to VAEs with per-channel statistics, not --vae {args.vae}")
        if args.latent_stats:
            released_stats(args.latent_stats)  # a missing file fails before any encoding
        if args.shard_size < 1 or args.batch_size < 1 or args.image_size < 8:
            raise ValueError("--shard-size and --batch-size must be ≥ 1 and --image-size ≥ 8")
        items, classes = list_images(args.image_folder)
        info = distributed.init(args.device)
        vae = make_vae(args.vae, args.vae_path).to(info.device).eval()
    except (FileNotFoundError, ValueError) as e:
        print(f"encode_latents: error: {e}", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    shards = [items[i: i + args.shard_size] for i in range(0, len(items), args.shard_size)]
    for i in range(info.rank, len(shards), info.world_size):
        if shard_done(args.out, i, len(shards[i])):
            continue
        encode_shard(vae, shards[i], args.out, i, args, info.device)
        print(f"[encode_latents] rank {info.rank}: {shard_name(i)} ({len(shards[i])} images)", file=sys.stderr)
    distributed.barrier(info)
    if info.main:
        missing = [i for i in range(len(shards)) if not shard_done(args.out, i, len(shards[i]))]
        if missing:
            print(f"encode_latents: error: shards not finished: {missing[:5]}", file=sys.stderr)
            return 1
        shape = np.load(os.path.join(args.out, shard_name(0) + ".latents.npy"), mmap_mode="r").shape[1:]
        try:
            write_index(args.out, shards, classes, shape, args)
        except (FileNotFoundError, ValueError) as e:
            print(f"encode_latents: error: {e}", file=sys.stderr)
            return 2
        print(f"[encode_latents] {sum(map(len, shards))} images → {len(shards)} shards, latent shape "
              f"{tuple(shape)} in {args.out}")
    distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
