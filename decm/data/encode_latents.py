"""Encode an ImageFolder into `decm-latents-v1` shards (see decm.data.latents): distributed, resumable.

    python -m decm.data.encode_latents --image-folder /data/imagenet/train --out /data/in256-sdvae \
        --vae sd-vae-ft-ema --image-size 256 --shard-size 10000 [--flip]
    torchrun --nproc-per-node 8 -m decm.data.encode_latents ...   # or srun: one rank per GPU

Images are sorted by (class folder, file name); shard i holds images [i·S, (i+1)·S). Rank r encodes
shards i ≡ r (mod world size), writing each shard's arrays to temporary files, renaming them, then
writing `shard-XXXXX.ok`; a rerun skips every shard whose `.ok` matches. Rank 0 writes index.json once
all shards are present. Preprocessing: ADM center crop to `image-size`, values in [−1, 1]; the encoder
stores the posterior mean (or a sample with --sample) as raw latents; index.json records the scale.

VAEs: `sd-vae-ft-ema` / `sd-vae-ft-mse` (diffusers AutoencoderKL; needs `pip install diffusers` and
the weights in the Hugging Face cache or --vae-path), and `avgpool-test`, a deterministic stand-in
(8× average pooling, fixed 3→4 channel mix) used by the tests and for dry plumbing runs on CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch

from decm.data.latents import FORMAT

VAES = {"sd-vae-ft-ema": 0.18215, "sd-vae-ft-mse": 0.18215, "avgpool-test": 1.0}
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


def make_vae(name: str, path: str | None):
    if name == "avgpool-test":
        return AvgPoolTestVAE()
    if name in ("sd-vae-ft-ema", "sd-vae-ft-mse"):
        return DiffusersVAE(name, path)
    raise SystemExit(f"encode_latents: error: unknown --vae {name!r}; choices: {', '.join(VAES)}")


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
    lat, lab, lat_flip = [], [], []
    g = torch.Generator(device=device).manual_seed(args.seed * 100003 + i)
    for b in range(0, len(items), args.batch_size):
        chunk = items[b: b + args.batch_size]
        x = load_batch([p for p, _ in chunk], args.image_size).to(device)
        with torch.no_grad():
            lat.append(vae.encode(x, args.sample, g).float().cpu().numpy())
            if args.flip:
                lat_flip.append(vae.encode(x.flip(-1), args.sample, g).float().cpu().numpy())
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


def write_index(out: str, shards, classes, shape, args) -> None:
    index = {"format": FORMAT, "shape": list(shape), "num_classes": len(classes),
             "num_samples": sum(len(s) for s in shards),
             "shards": [{"name": shard_name(i), "count": len(s)} for i, s in enumerate(shards)],
             "vae": args.vae, "scale": VAES[args.vae], "shift": 0.0, "channel_mean": None, "channel_std": None,
             "has_flip": bool(args.flip), "image_size": args.image_size, "classes": classes,
             "posterior": "sample" if args.sample else "mean"}
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
    p.add_argument("--vae-path", default=None, help="local weights directory for the diffusers VAE")
    p.add_argument("--image-size", type=int, default=256, help="pixels (center crop)")
    p.add_argument("--shard-size", type=int, default=10000, help="images per shard")
    p.add_argument("--batch-size", type=int, default=64, help="images per encoder call")
    p.add_argument("--dtype", default="float16", choices=("float16", "float32"), help="stored latent dtype")
    p.add_argument("--flip", action="store_true", help="also store latents of the mirrored images")
    p.add_argument("--sample", action="store_true", help="store a posterior sample instead of the mean")
    p.add_argument("--seed", type=int, default=0, help="seed of posterior samples")
    p.add_argument("--device", default="auto", help="'cpu', 'cuda' or 'auto'")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from decm import distributed

    try:
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
        write_index(args.out, shards, classes, shape, args)
        print(f"[encode_latents] {sum(map(len, shards))} images → {len(shards)} shards, latent shape "
              f"{tuple(shape)} in {args.out}")
    distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
