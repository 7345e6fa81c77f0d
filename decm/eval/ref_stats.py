"""Reference statistics for FID/KID/PRC: `python -m decm.eval.ref_stats --source SRC --out stats.npz`.

Sources:
  digits                 the scikit-learn digits (CPU-scale reference; extractor 'digits')
  folder:/path/to/train  an ImageFolder (ADM center crop to --image-size)
  latents:/path/shards   decm-latents-v1 shards, decoded with --vae (e.g. vavae-f16d32 with --vae-path)
Writes mu, sigma (ADM layout), up to --keep-features reference features (KID, precision/recall),
the extractor name and n (decm/eval/fidelity.py). Bad input: one line, exit 2.
"""

from __future__ import annotations

import sys

import numpy as np
import torch


def reference_images(source: str, n: int, image_size: int, vae: str | None, seed: int,
                     vae_path: str | None = None) -> torch.Tensor:
    """Up to n reference images in [−1, 1] (N×C×H×W), a fixed random subset when there are more."""
    g = torch.Generator().manual_seed(seed)
    if source == "digits":
        from decm.data.builtin import Digits

        x, _ = Digits(image_size=8, conditional=False).reference(n, g)
        return x
    kind, _, path = source.partition(":")
    if kind == "folder":
        from decm.data.encode_latents import list_images, load_batch

        items, _ = list_images(path)
        pick = torch.randperm(len(items), generator=g)[:n].sort().values.tolist()
        return torch.cat([load_batch([items[i][0] for i in pick[j: j + 64]], image_size)
                          for j in range(0, len(pick), 64)])
    if kind == "latents":
        import json
        import os

        from decm.data.encode_latents import make_vae
        from decm.data.latents import Latents

        with open(os.path.join(path, "index.json")) as f:
            index = json.load(f)
        if not vae:
            raise ValueError("latents need --vae to decode them (e.g. sd-vae-ft-ema)")
        ds = Latents(path, shape=tuple(index["shape"]), num_classes=0)
        idx = torch.randperm(len(ds), generator=g)[:n].sort().values.numpy()
        decoder = make_vae(vae, vae_path).eval()
        out = []
        for j in range(0, len(idx), 64):
            x, _ = ds.read(idx[j: j + 64])
            out.append(decoder.decode(ds.denormalize(x)).clamp(-1, 1))
        return torch.cat(out)
    raise ValueError(f"unknown --source {source!r}: use digits, folder:PATH or latents:PATH")


def main(argv=None) -> int:
    from decm import cli

    p = cli.parser("python -m decm.eval.ref_stats", __doc__)
    p.add_argument("--source", required=True, help="digits | folder:PATH | latents:PATH")
    p.add_argument("--out", required=True, help="output .npz")
    p.add_argument("--extractor", default="inception", help="inception or digits")
    p.add_argument("--weights", default=None, help="extractor weights file (or $DECM_INCEPTION_WEIGHTS)")
    p.add_argument("--n", type=int, default=50000, help="reference images (all when fewer)")
    p.add_argument("--keep-features", type=int, default=10000, help="features stored for KID / precision-recall")
    p.add_argument("--image-size", type=int, default=256, help="pixels (folder sources)")
    p.add_argument("--vae", default=None, help="decoder for latent sources")
    p.add_argument("--vae-path", default=None, help="the decoder's weights (VA-VAE checkpoint file)")
    p.add_argument("--seed", type=int, default=0, help="subset seed")
    args = p.parse_args(argv)
    from decm.eval import fidelity

    try:
        weights = fidelity.resolve_weights(args.extractor, args.weights)
        x = reference_images(args.source, args.n, args.image_size, args.vae, args.seed, args.vae_path)
        feats = fidelity.features(fidelity.to_uint8(x), args.extractor, weights)
        stats = fidelity.ReferenceStats.from_features(feats, args.extractor, args.keep_features)
        stats.extractor = fidelity.fidelity_name(args.extractor)
        stats.save(args.out)
    except (FileNotFoundError, ValueError) as e:
        print(f"decm.eval.ref_stats: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(f"{stats.n} reference images → {args.out} (features {np.asarray(stats.mu).shape[0]}-d, "
          f"{0 if stats.features is None else len(stats.features)} kept)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
