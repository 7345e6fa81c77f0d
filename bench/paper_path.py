"""The paper's whole path at real size on CPU, with random weights written in the official checkpoint formats.

    OMP_NUM_THREADS=1 python bench/paper_path.py [--depth 28] [--images 16] [--work /tmp/decm-paper-path]

Every stage is the command a user runs (README, Slurm section), in its own process, timed, with its peak
resident memory (the child's ru_maxrss):
  inputs     16 synthetic 256×256 images in an ImageFolder of 1,000 class folders; random weights written as
             released: the VA-VAE (`{'state_dict': ...}` with the loss / foundation-model keys beside the
             autoencoder's), its `latents_stats.pt` ({'mean', 'std'}: 1×32×1×1), the LightningDiT-XL/1
             teacher (`{'model', 'ema', 'opt', 'config'}`; parameters perturbed so that no output is
             trivially zero) and torch-fidelity's Inception-v3 weights file
  reference  python -m decm.eval.ref_stats  (the small reference: the same 16 images)
  encode     python -m decm.data.encode_latents --vae vavae-f16d32 ... --latent-stats ...
  distill    python -m decm.launch --gin gin/decm_xl.gin (2 steps, batch 2, CPU, fp32, post-hoc EMA on)
  phema      python -m decm.phema --sigma-rel 0.2
  evaluate   python -m decm.evaluate --checkpoint <σ_rel 0.2> --nfe 1 2 --n 16 (decoded by the VA-VAE; FID)
Weights are random, so the FIDs only show that the path runs; the times and memory are the point.
`--depth` keeps the real width (1152, 16 heads) and reduces the teacher's and student's depth when the
full 28 blocks do not fit beside other work; `--tiny` runs the same stages at toy size (`vavae-small`,
a 2-block width-64 LightningDiT, 32-pixel images) in-process: the default test suite runs that.
Writes bench/results/paper_path-cpu.json (or --out). `--extrapolate SHALLOW.json DEEP.json` estimates the
full depth's peak memory per stage, linear in the parameter count through two such runs, into
bench/results/paper_path-full-depth-estimate.json.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CLASSES = 1000          # ImageNet's label space: every class folder exists, a few hold an image
WIDTH = 1152            # LightningDiT-XL/1
REAL = dict(image_size=256, vae="vavae-f16d32", latent=(32, 16, 16), backbone={})
TINY = dict(image_size=32, vae="vavae-small", latent=(32, 2, 2),
            backbone={"depth": 2, "hidden_size": 64, "num_heads": 4})


def layout(tiny: bool, depth: int) -> dict:
    cfg = dict(TINY if tiny else REAL)
    if not tiny and depth != 28:
        cfg["backbone"] = {"depth": depth}
    return cfg


# --- inputs in the released formats -------------------------------------------------------------------

def write_images(folder: str, n: int, size: int, seed: int = 0) -> None:
    """n smooth random RGB images (size × size + a margin to crop), spread over the 1,000 class folders."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in range(CLASSES):
        os.makedirs(os.path.join(folder, f"n{c:08d}"), exist_ok=True)
    for i in range(n):
        c = (i * CLASSES) // n
        coarse = rng.random((8, 8, 3))
        img = Image.fromarray((coarse * 255).astype(np.uint8)).resize((size + 16, size), Image.BICUBIC)
        img.save(os.path.join(folder, f"n{c:08d}", f"img{i:03d}.png"))


def write_vavae(path: str, tiny: bool, seed: int = 0) -> None:
    """A random VA-VAE in the release's layout: {'state_dict': autoencoder + loss + foundation-model keys}."""
    import torch

    from decm.data.encode_latents import VAVAE_LAYOUTS
    from decm.models.vavae import F16D32, VAVAE

    torch.manual_seed(seed)
    state = VAVAE(**{**F16D32, **VAVAE_LAYOUTS[TINY["vae"] if tiny else REAL["vae"]]}).state_dict()
    state.update({"loss.logvar": torch.zeros(()), "loss.discriminator.main.0.weight": torch.randn(64, 3, 4, 4),
                  "foundation_model.model.cls_token": torch.randn(1, 1, 1024)})
    torch.save({"state_dict": state}, path)


def write_latent_stats(path: str, channels: int, seed: int = 0) -> None:
    """latents_stats.pt as released: {'mean', 'std'}, each 1×C×1×1."""
    import torch

    g = torch.Generator().manual_seed(seed)
    torch.save({"mean": 0.1 * torch.randn(1, channels, 1, 1, generator=g),
                "std": 0.5 + torch.rand(1, channels, 1, 1, generator=g)}, path)


def write_teacher(path: str, cfg: dict, seed: int = 0) -> int:
    """A random LightningDiT velocity checkpoint as its train.py saves it; returns the parameter count."""
    import torch

    from decm.models.sit import sit

    torch.manual_seed(seed)
    c, h, _ = cfg["latent"]
    net = sit("LightningDiT-XL/1", input_size=h, in_channels=c, num_classes=CLASSES, flow_map=False, **cfg["backbone"])
    with torch.no_grad():
        for p in net.parameters():  # the adaLN-zero and final layers start at zero: perturb every weight
            p.add_(0.02 * torch.randn_like(p))
    state = net.state_dict()
    torch.save({"model": state, "ema": state, "opt": {}, "config": {"model": {"model_type": "LightningDiT-XL/1"}}},
               path)
    return sum(p.numel() for p in net.parameters())


def write_inception(path: str, seed: int = 0) -> None:
    """torch-fidelity's Inception-v3 weights file (its state-dict layout) with random weights. The batch-norm
    statistics are set from a forward pass over random images (train mode, cumulative averages): with the
    default (mean 0, variance 1) the random network's activations shrink to ~1e-8 by the pool layer and every
    FID would read 0."""
    import torch
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    torch.manual_seed(seed)
    empty = path + ".empty"
    torch.save({}, empty)
    original = FeatureExtractorInceptionV3.load_state_dict
    FeatureExtractorInceptionV3.load_state_dict = lambda self, sd, strict=True: None  # build the layers only
    try:
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=empty)
    finally:
        FeatureExtractorInceptionV3.load_state_dict = original
        os.remove(empty)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration pass
            m.train()
    with torch.no_grad():
        net(torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)))
    torch.save(net.state_dict(), path)


def make_inputs(work: str, tiny: bool, depth: int, images: int) -> dict:
    cfg = layout(tiny, depth)
    write_images(os.path.join(work, "imagenet", "train"), images, cfg["image_size"])
    write_vavae(os.path.join(work, "vavae.pt"), tiny)
    write_latent_stats(os.path.join(work, "latents_stats.pt"), cfg["latent"][0])
    params = write_teacher(os.path.join(work, "lightningdit.pt"), cfg)
    write_inception(os.path.join(work, "inception.pth"))
    return {"teacher_parameters": params}


# --- the stages --------------------------------------------------------------------------------------

def stages(work: str, tiny: bool, depth: int, images: int) -> list[tuple[str, str, list[str]]]:
    """(name, module, argv) of every stage after the inputs, as a user types them."""
    cfg = layout(tiny, depth)
    c, h, w = cfg["latent"]
    p = lambda *parts: os.path.join(work, *parts)  # noqa: E731
    backbone = [f"backbones.sit.{k} = {v}" for k, v in cfg["backbone"].items()]
    binds = [f"datasets.latents.path = '{p('latents')}'", f"experiment.teacher_dir = '{p('lightningdit.pt')}'",
             f"datasets.latents.shape = ({c}, {h}, {w})",
             "distill/train.steps = 2", "distill/train.batch_size = 2", "distill/train.device = 'cpu'",
             "distill/train.precision = 'fp32'", "distill/train.phema_every_steps = 1",
             "distill/train.snapshot_every_steps = 0", "distill/train.ckpt_every_minutes = 0",
             "distill/train.log_every_steps = 1", f"evaluate.vae = '{cfg['vae']}'", *backbone]
    return [
        ("reference", "decm.eval.ref_stats",
         ["--source", f"folder:{p('imagenet', 'train')}", "--out", p("reference.npz"), "--weights", p("inception.pth"),
          "--n", str(images), "--image-size", str(cfg["image_size"])]),
        ("encode", "decm.data.encode_latents",
         ["--image-folder", p("imagenet", "train"), "--out", p("latents"), "--vae", cfg["vae"],
          "--vae-path", p("vavae.pt"), "--latent-stats", p("latents_stats.pt"), "--image-size", str(cfg["image_size"]),
          "--batch-size", "4", "--device", "cpu"]),
        ("distill", "decm.launch",
         ["--gin", "gin/decm_xl.gin", "--backend", "local", "--run-dir", p("run"),
          *[a for b in binds for a in ("--bind", b)]]),
        ("phema", "decm.phema", ["--run-dir", p("run"), "--sigma-rel", "0.2"]),
        ("evaluate", "decm.evaluate",
         [p("run"), "--checkpoint", p("run", "posthoc", "sigma_rel-0.200"), "--nfe", "1", "2", "--n", str(images),
          "--vae-path", p("vavae.pt"), "--ref-stats", p("reference.npz"), "--weights", p("inception.pth"),
          "--device", "cpu", "--no-wandb", "--out", p("eval"),
          "--bind", "evaluate.batch_size = 8", "--bind", "evaluate.grid_samples = 2"]),
    ]


def shown_arg(arg: str) -> str:
    """An argument as typed in a shell: bindings in double quotes, plain words bare."""
    return f'"{arg}"' if any(ch in arg for ch in " '()=") else arg


def run_child(argv: list[str]) -> dict:
    """Runs a command; its wall time (s), exit status and peak resident memory (GiB, ru_maxrss)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"rc": proc.returncode, "wall_s": round(time.perf_counter() - t0, 1),
            "peak_rss_gib": round(usage.ru_maxrss / 2 ** 20, 2)}


def run_in_process(module: str, argv: list[str]) -> int:
    import importlib

    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        return importlib.import_module(module).main(argv)
    finally:
        os.chdir(cwd)


def run_path(work: str, tiny: bool = False, depth: int = 28, images: int = 16, in_process: bool = False) -> dict:
    """Runs every stage (stops at the first failure) and returns the record (see the module docstring)."""
    os.makedirs(work, exist_ok=True)
    record = {"depth": 2 if tiny else depth, "width": 64 if tiny else WIDTH, "images": images, "tiny": tiny,
              "stages": {}}
    if in_process:
        record.update(make_inputs(work, tiny, depth, images))
    else:
        argv = [sys.executable, os.path.abspath(__file__), "--make-inputs", "--work", work, "--depth", str(depth),
                "--images", str(images)] + (["--tiny"] if tiny else [])
        record["stages"]["inputs"] = {**run_child(argv), "command": "bench/paper_path.py --make-inputs (random weights)"}
        with open(os.path.join(work, "inputs.json")) as f:
            record.update(json.load(f))
        if record["stages"]["inputs"]["rc"] != 0:
            return record
    for name, module, argv in stages(work, tiny, depth, images):
        shown = " ".join(["python", "-m", module, *map(shown_arg, argv)]).replace(work, "$WORK")
        if in_process:
            t0 = time.perf_counter()
            rc = run_in_process(module, argv)
            record["stages"][name] = {"rc": rc, "wall_s": round(time.perf_counter() - t0, 1), "command": shown}
        else:
            record["stages"][name] = {**run_child([sys.executable, "-m", module, *argv]), "command": shown}
        print(f"[paper_path] {name}: {record['stages'][name]}", file=sys.stderr, flush=True)
        if record["stages"][name]["rc"] != 0:
            return record
    with open(os.path.join(work, "eval", "metrics.json")) as f:
        metrics = json.load(f)
    record["fid_random_weights"] = {nfe: m["fid"] for nfe, m in metrics["student"].items()}
    return record


def extrapolate(shallow: dict, deep: dict, full_parameters: int) -> dict:
    """Peak memory per stage at `full_parameters` per network, linear in the parameter count through two runs
    of this script at different depths (the same width): GiB and the slope in bytes per parameter."""
    pa, pb = shallow["teacher_parameters"], deep["teacher_parameters"]
    out = {"from": {"depths": [shallow["depth"], deep["depth"]], "parameters": [pa, pb]},
           "full_parameters": full_parameters, "stages": {}}
    for name in ("distill", "phema", "evaluate"):
        ma, mb = shallow["stages"][name]["peak_rss_gib"], deep["stages"][name]["peak_rss_gib"]
        slope = (mb - ma) / (pb - pa)
        out["stages"][name] = {"bytes_per_parameter": round(slope * 2 ** 30, 1),
                               "peak_rss_gib_full_depth": round(mb + slope * (full_parameters - pb), 1)}
    return out


def main(argv=None) -> int:
    from decm import cli

    p = cli.parser("python bench/paper_path.py", __doc__)
    p.add_argument("--work", default="/tmp/decm-paper-path", help="scratch folder (inputs, latents, run)")
    p.add_argument("--depth", type=int, default=28, help="blocks of teacher and student (real: 28; width stays 1152)")
    p.add_argument("--images", type=int, default=16, help="synthetic images (and samples per NFE)")
    p.add_argument("--tiny", action="store_true", help="toy sizes, in-process (what the test suite runs)")
    p.add_argument("--make-inputs", action="store_true", help=argparse_hidden())
    p.add_argument("--out", default=None, help="JSON path (default bench/results/paper_path-cpu.json)")
    p.add_argument("--extrapolate", nargs=2, metavar=("SHALLOW_JSON", "DEEP_JSON"), default=None,
                   help="instead of running: the full-depth peak memory per stage from two results of this script")
    args = p.parse_args(argv)
    if args.extrapolate:
        import torch

        from decm.models.sit import sit

        with torch.device("meta"):
            full = sum(q.numel() for q in sit("LightningDiT-XL/1", input_size=16, in_channels=32,
                                              num_classes=CLASSES, flow_map=False).parameters())
        runs = []
        for path in args.extrapolate:
            with open(path) as f:
                runs.append(json.load(f))
        result = extrapolate(*runs, full)
        out = args.out or os.path.join(ROOT, "bench", "results", "paper_path-full-depth-estimate.json")
        with open(out + ".tmp", "w") as f:
            json.dump(result, f, indent=1)
        os.replace(out + ".tmp", out)
        print(json.dumps(result["stages"]))
        return 0
    if args.make_inputs:
        info = make_inputs(args.work, args.tiny, args.depth, args.images)
        with open(os.path.join(args.work, "inputs.json"), "w") as f:
            json.dump(info, f)
        return 0
    if os.path.exists(args.work) and os.listdir(args.work):
        print(f"paper_path: error: --work {args.work} is not empty (the path starts from nothing)", file=sys.stderr)
        return 2
    import torch

    record = run_path(args.work, args.tiny, args.depth, args.images, in_process=args.tiny)
    record.update(torch=torch.__version__, machine=platform.machine(), cpus=os.cpu_count(),
                  omp_num_threads=os.environ.get("OMP_NUM_THREADS"),
                  note="random weights: the FIDs only show that the path runs end to end")
    out = args.out or os.path.join(ROOT, "bench", "results", "paper_path-cpu.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out + ".tmp", "w") as f:
        json.dump(record, f, indent=1)
    os.replace(out + ".tmp", out)
    print(json.dumps(record["stages"], indent=1))
    return 0 if all(s["rc"] == 0 for s in record["stages"].values()) else 1


def argparse_hidden():
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    sys.exit(main())
