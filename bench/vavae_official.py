"""Our VA-VAE (decm.models.vavae) against the official module, run from a checkout of hustvl/LightningDiT.

    python bench/vavae_official.py --lightningdit /path/to/LightningDiT [--batch 2] [--image-size 256]

The official `tokenizer/autoencoder.py` is imported from a temporary copy of the given checkout (a work
tree, or a bare git directory read with `git archive`; $DECM_LIGHTNINGDIT_SRC when the flag is absent);
nothing of it is copied into this repository. Both networks get the same random weights (the official
module's own initialisation, seeded), then on one random batch in [−1, 1] we compare:
  - the posterior parameters (mean, clamped log-variance),
  - a posterior sample: official `DiagonalGaussianDistribution.sample()` after torch.manual_seed(s)
    against ours with torch.Generator().manual_seed(s) (both draw ε on the CPU),
  - the decode of that sample.
Default: the released f16d32 layout (width 128) on a 256×256 batch of 2, fp32, CPU. Writes
bench/results/vavae_official.json (max |difference| per quantity, the tolerance 1e-5, and the scale).
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TOLERANCE = 1e-5
SRC_ENV = "DECM_LIGHTNINGDIT_SRC"


def official_autoencoder(src: str, workdir: str):
    """The module `tokenizer/autoencoder.py` of the LightningDiT checkout `src`, imported from a copy in workdir."""
    target = os.path.join(workdir, "autoencoder_official.py")
    if os.path.isfile(os.path.join(src, "tokenizer", "autoencoder.py")):
        shutil.copyfile(os.path.join(src, "tokenizer", "autoencoder.py"), target)
    else:  # a bare git directory (a mirror)
        with open(target, "wb") as f:
            f.write(subprocess.run(["git", "--git-dir", src, "show", "HEAD:tokenizer/autoencoder.py"],
                                   check=True, capture_output=True).stdout)
    spec = importlib.util.spec_from_file_location("autoencoder_official", target)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def official_model(module, ch: int, seed: int):
    """The official AutoencoderKL (embed_dim 32, multipliers (1, 1, 2, 2, 4)); for ch ≠ 128 its encoder and
    decoder are the official Encoder / Decoder classes built at that width (the wrapper fixes 128)."""
    torch.manual_seed(seed)
    model = module.AutoencoderKL(embed_dim=32, ch_mult=(1, 1, 2, 2, 4))
    if ch != 128:
        model.encoder = module.Encoder(ch=ch, ch_mult=(1, 1, 2, 2, 4), z_channels=32)
        model.decoder = module.Decoder(ch=ch, ch_mult=(1, 1, 2, 2, 4), z_channels=32, attn_resolutions=(16,))
    return model.eval()


@torch.no_grad()
def compare(src: str, ch: int = 128, batch: int = 2, image_size: int = 256, seed: int = 0) -> dict:
    """Max |ours − official| of posterior mean, log-variance, a sample and its decode (see the docstring)."""
    from decm.models.vavae import VAVAE

    with tempfile.TemporaryDirectory() as work:
        module = official_autoencoder(src, work)
        official = official_model(module, ch, seed)
        ours = VAVAE(ch=ch).eval()
        ours.load_state_dict(official.state_dict())  # same names: a failure here is a layout difference
        x = torch.rand(batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(seed + 1)) * 2 - 1
        t0 = time.perf_counter()
        post = official.encode(x)
        mean, logvar = ours.posterior(x)
        torch.manual_seed(seed + 2)
        z_official = post.sample()
        z_ours = ours.encode(x, True, torch.Generator().manual_seed(seed + 2))
        img_official, img_ours = official.decode(z_official), ours.decode(z_official)
        seconds = time.perf_counter() - t0
    diff = {"posterior_mean": (mean - post.mean).abs().max().item(),
            "posterior_logvar": (logvar - post.logvar).abs().max().item(),
            "sample": (z_ours - z_official).abs().max().item(),
            "decode": (img_ours - img_official).abs().max().item()}
    return {"max_abs_diff": diff, "tolerance": TOLERANCE, "ok": all(v <= TOLERANCE for v in diff.values()),
            "scale": {"posterior_mean": post.mean.abs().max().item(), "decode": img_official.abs().max().item()},
            "width": ch, "batch": batch, "image_size": image_size, "seed": seed,
            "parameters": sum(p.numel() for p in ours.parameters()), "seconds_both": round(seconds, 1)}


def main(argv=None) -> int:
    from decm import cli

    p = cli.parser("python bench/vavae_official.py", __doc__)
    p.add_argument("--lightningdit", default=os.environ.get(SRC_ENV),
                   help=f"checkout or bare git directory of hustvl/LightningDiT (default ${SRC_ENV})")
    p.add_argument("--width", type=int, default=128, help="base width (128: the released f16d32)")
    p.add_argument("--batch", type=int, default=2, help="images")
    p.add_argument("--image-size", type=int, default=256, help="pixels")
    p.add_argument("--out", default=os.path.join("bench", "results", "vavae_official.json"), help="JSON path")
    args = p.parse_args(argv)
    if not args.lightningdit or not os.path.exists(args.lightningdit):
        print(f"vavae_official: error: LightningDiT source not found: {args.lightningdit!r} (set --lightningdit "
              f"or ${SRC_ENV})", file=sys.stderr)
        return 2
    result = compare(args.lightningdit, args.width, args.batch, args.image_size)
    result.update(torch=torch.__version__, machine=platform.machine(), threads=torch.get_num_threads())
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, args.out)
    print(json.dumps(result["max_abs_diff"]), "ok" if result["ok"] else "EXCEEDS the tolerance")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
