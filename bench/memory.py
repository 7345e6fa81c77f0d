"""Per-rank peak memory during the training step, DDP vs FSDP, measured on CPU ranks and predicted.

    python bench/memory.py [--presets tiny small-cpu] [--worlds 1 2 4] [--out DIR]

Measured (CPU, gloo, one process per rank, one thread each): for each SiT preset and world size the
platform's own training loop, `decm.train.train`, distils a flow-map student from a perturbed random
teacher (decm checkpoint) with the full DE-CM objective — all three terms (N2N on steps 0 and 3), CFG
w = 1.5 with velocity clipping η = 1, backward per term, gradient clipping 1.0, AdamW, EMA — for 5
steps, batch 4 per rank on 4 × 16 × 16 inputs. Configurations, all on the same data, seed and batch:
world 1 one process ('none'); at each world > 1 'ddp' (teacher replicated), 'fsdp' (teacher
replicated, as under DDP) and 'fsdp' with `train.shard_teacher` ('fsdp+st').

Each step is a window opened when the loop calls the objective (after `zero_grad`, so no gradient is
held at its start) and closed when it calls it again; the peak of steps 1–3 is reported (step 0 runs
before AdamW has its moments; step 4's window would include the final checkpoint). Every
configuration runs twice in fresh processes:
  1. tensor peak per rank — `torch.profiler` memory events (bench/_peak.py): the largest number of
     bytes held by live tensors at any instant of the step, the counterpart of CUDA's
     `max_memory_allocated`; also the bytes held when the step starts (the resident state);
  2. RSS peak per rank and step time, without the profiler — VmHWM reset at each step through
     /proc/self/clear_refs; step time: the mean of steps 1–3 (one of them runs N2N: amortised), the
     slowest rank.

Predicted (decm/memory.py): resident state + gradients + the FSDP transient unit + the activations
saved by one with-grad forward (traced with fake tensors) + the backward's temporaries, or the JVP's
or the optimizer's phase when larger. Each measured row carries its prediction (`--fsdp-grads`: what
FSDP holds between the terms' backwards) and the ratio measured / predicted. Computed rows (no
measurement): XL/2, LightningDiT-XL/1 and 2B/2 at world 1, 8 and 16, batch 32 per GPU, fp32 and
bf16-autocast activations, AdamW's multi-tensor update (CUDA's default), the two post-hoc EMA
profiles of gin/decm_xl.gin, FSDP's gradients sharded during the whole step — and, beside it, the peak
if they are held unsharded between the terms. Rows read with `--rows-from` keep their measurements
and get the current model's prediction; computed rows are always recomputed.

Step times come from a shared 2-core machine unless stated otherwise: read the FSDP/DDP ratio, not the
seconds. Writes `<out>/memory.json` and `<out>/memory.md` (default out: bench/results).
"""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

IMAGE = dict(input_size=16, in_channels=4, num_classes=10)  # latent-like CPU input: 4 × 16 × 16, 10 classes
COMPUTED = [("XL/2", dict(input_size=32, in_channels=4, num_classes=1000)),
            ("LightningDiT-XL/1", dict(input_size=16, in_channels=32, num_classes=1000)),
            ("2B/2", dict(input_size=32, in_channels=4, num_classes=1000))]
COMPUTED_BATCH = 32  # per GPU, as gin/decm_xl.gin
COMPUTED_PHEMA_PROFILES = 2  # post-hoc EMA profiles of the computed rows: gin/decm_xl.gin's σ_rel (0.05, 0.2)
BATCH_PER_RANK = 4
STEPS = 5            # windows 1–3 are measured (see the module docstring)
MEASURED_STEPS = (1, 2, 3)
CFG_SCALE, CFG_CLIP = 1.5, 1.0
# (label, train.parallel, train.shard_teacher)
MODES = {"none": ("none", False), "ddp": ("ddp", False), "fsdp": ("fsdp", False), "fsdp+st": ("fsdp", True)}


class RandomLatents:
    """Gaussian 'latents' with uniform labels, drawn from the step's generator (shape and classes of IMAGE)."""

    shape = (IMAGE["in_channels"], IMAGE["input_size"], IMAGE["input_size"])
    num_classes = IMAGE["num_classes"]

    def batch(self, n, generator=None):
        x = torch.randn((n, *self.shape), generator=generator)
        return x, torch.randint(0, self.num_classes, (n,), generator=generator)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def backbone(preset: str):
    from decm.models.sit import sit

    def build(**kwargs):
        return sit(preset, time_scale=1.0, **kwargs)
    return build


def write_teacher(preset: str, directory: str) -> str:
    """A perturbed random velocity SiT saved as a decm run's checkpoint (its EMA weights)."""
    from decm import checkpoint

    torch.manual_seed(0)
    net = backbone(preset)(**IMAGE, flow_map=False)
    for p in net.parameters():  # DiT init zeroes the output layers: make every path non-trivial
        p.data.add_(0.02 * torch.randn_like(p))
    checkpoint.save(os.path.join(directory, "checkpoints"), 1, {"ema": net.state_dict()})
    return directory


def objective():
    from decm.method.guidance import CFG
    from decm.method.objective import decm_objective

    return decm_objective(guidance=CFG(scale=CFG_SCALE, clip_norm=CFG_CLIP))


def worker(rank, world, port, preset, label, teacher_dir, run_dir, profiled, out):
    """One rank: the training loop with a window per step; writes its windows to `out`-<rank>.json."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    if world == 1:
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            os.environ.pop(k)
    torch.set_num_threads(1)
    from bench._peak import Windows

    windows = Windows(torch.device("cpu"), tensors=profiled, rss=True)  # before anything is allocated
    from decm.distributed import shutdown
    from decm.train import train

    parallel, shard_teacher = MODES[label]
    obj = objective()
    obj.register_forward_pre_hook(lambda module, args: windows.mark(f"step{args[4]}"))
    try:
        summary = train(run_dir, stage="distill", dataset=RandomLatents(), backbone=backbone(preset), objective=obj,
                        teacher_source="checkpoint", teacher_checkpoint=teacher_dir, steps=STEPS,
                        batch_size=BATCH_PER_RANK, lr=1e-4, grad_clip=1.0, ema_decay=0.999,
                        ckpt_every_steps=10 * STEPS, log_every_steps=1, keep_last=1, progress=False, device="cpu",
                        parallel=parallel, shard_teacher=shard_teacher)
        windows.mark("end")
        import gc

        gc.collect()  # FSDP's modules hold reference cycles: free them before the profile ends
        windows.all_freed_at_close = True
        windows.close()
    finally:
        shutdown()
    with open(f"{out}-{rank}.json", "w") as f:
        json.dump({"windows": windows.result(), "rss_reset": windows.rss_reset_works(),
                   "unrecorded_frees": windows.unrecorded_frees,
                   "parallel": summary["parallel"], "world_size": summary["world_size"]}, f)


def run(preset, world, label, teacher_dir, tmp, profiled) -> list[dict]:
    """Runs one configuration in fresh processes; returns each rank's record."""
    import torch.multiprocessing as mp

    tag = f"{preset.replace('/', '_')}-{world}-{label}-{'prof' if profiled else 'time'}"
    out, run_dir = os.path.join(tmp, tag), os.path.join(tmp, tag + "-run")
    mp.start_processes(worker, args=(world, _port(), preset, label, teacher_dir, run_dir, profiled, out),
                       nprocs=world, start_method="spawn")
    records = []
    for r in range(world):
        with open(f"{out}-{r}.json") as f:
            records.append(json.load(f))
    return records


def summarise(prof: list[dict], timed: list[dict]) -> dict:
    """The row's measured numbers: per-rank peaks (max over steps 1–3) and the slowest rank's step time."""
    steps = [f"step{s}" for s in MEASURED_STEPS]
    tensor_peak = [max(r["windows"][s]["tensor_peak"] for s in steps) for r in prof]
    tensor_start = [r["windows"][steps[0]]["tensor_start"] for r in prof]
    rss_peak = [max(r["windows"][s]["rss_peak"] for s in steps) for r in timed]
    per_step = {s: max(r["windows"][s]["tensor_peak"] for r in prof) for s in ["step0", *steps]}
    seconds = [sum(r["windows"][s]["seconds"] for s in steps) / len(steps) for r in timed]
    return {"peak": max(tensor_peak), "peak_per_rank": tensor_peak, "resident_at_step_start": max(tensor_start),
            "peak_per_step": per_step, "rss_peak": max(rss_peak), "rss_peak_per_rank": rss_peak,
            "rss_reset_worked": all(r["rss_reset"] for r in timed), "step_seconds": max(seconds),
            "parallel": prof[0]["parallel"]}


def predicted(preset: str, kwargs: dict, world: int, label: str, batch: int, autocast_dtype=None,
              fsdp_grads: str = "sharded", foreach: bool = False, phema_profiles: int = 0) -> dict:
    from decm import memory

    mode, shard_teacher = MODES[label]
    return memory.predict_step_peak(backbone(preset), kwargs, batch, world, mode, teacher=True,
                                    shard_teacher=shard_teacher, autocast_dtype=autocast_dtype,
                                    unsharded_grads=fsdp_grads == "unsharded", optimizer_foreach=foreach,
                                    phema_profiles=phema_profiles)


def table(rows: list[dict]) -> str:
    def gb(b):
        return f"{b / 1e9:.2f} GB" if b >= 1e9 else f"{b / 1e6:.1f} MB"

    lines = ["Per-rank peak during the training step (largest rank), and its prediction (decm/memory.py).", "",
             "| preset | world | mode | batch/rank | measured peak | RSS peak | predicted peak | measured ÷ predicted "
             "| of which: resident | grads | FSDP unit | activations | step time vs DDP |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p = r["predicted"]
        meas = gb(r["peak"]) if "peak" in r else "—"
        rss = gb(r["rss_peak"]) if "rss_peak" in r else "—"
        ratio = f"{r['peak'] / p['peak']:.3f}" if "peak" in r else "—"
        speed = f"{r['step_time_ratio_to_ddp']:.2f}×" if "step_time_ratio_to_ddp" in r else "—"
        mode = r["mode"] + (f" ({r['precision']})" if r.get("precision") else "")
        lines.append(f"| {r['preset']} | {r['world']} | {mode} | {r['batch_per_rank']} | {meas} | {rss} | "
                     f"{gb(p['peak'])} | {ratio} | {gb(p['resident'])} | {gb(p['grads'])} | {gb(p['unit'])} | "
                     f"{gb(p['activations'])} | {speed} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    import tempfile

    from decm import cli

    p = cli.parser("python bench/memory.py", __doc__)
    p.add_argument("--presets", nargs="*", default=["tiny", "small-cpu"],
                   help="SiT presets measured on CPU ranks (none: measure nothing, e.g. with --rows-from)")
    p.add_argument("--rows-from", nargs="+", default=[], metavar="JSON",
                   help="memory.json files of earlier runs (e.g. one per preset, run side by side): their rows join "
                        "this run's in the table (a row already present, same preset/world/mode/kind/precision, is "
                        "kept once)")
    p.add_argument("--worlds", nargs="+", type=int, default=[1, 2, 4], help="world sizes measured (1: one process)")
    p.add_argument("--modes", nargs="+", default=["ddp", "fsdp", "fsdp+st"], choices=["ddp", "fsdp", "fsdp+st"],
                   help="parallel modes measured at each world > 1")
    p.add_argument("--computed-worlds", nargs="*", type=int, default=[1, 8, 16],
                   help="world sizes of the predicted-only rows (XL/2, LightningDiT-XL/1, 2B/2; none: no such rows)")
    p.add_argument("--fsdp-grads", choices=["sharded", "unsharded"], default="sharded",
                   help="what the prediction of the measured FSDP rows (those read with --rows-from too) assumes the "
                        "loop holds between the terms' backwards: 'sharded' (a reduce-scatter per term, today's loop) or "
                        "'unsharded' (the reduction deferred to the last term, as the loop did before)")
    p.add_argument("--no-timing", dest="timing", action="store_false",
                   help="skip the unprofiled second run (step time and RSS then come from the profiled run)")
    p.add_argument("--out", default="bench/results", help="output directory (memory.json, memory.md)")
    args = p.parse_args(argv)
    if any(w < 1 for w in args.worlds + args.computed_worlds):
        print("bench/memory.py: error: every world size must be ≥ 1", file=sys.stderr)
        return 2
    t0 = time.time()
    rows, sources = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets:
            teacher_dir = write_teacher(preset, os.path.join(tmp, f"teacher-{preset.replace('/', '_')}"))
            for world in args.worlds:
                for label in (["none"] if world == 1 else args.modes):
                    prof = run(preset, world, label, teacher_dir, tmp, True)
                    measured = summarise(prof, run(preset, world, label, teacher_dir, tmp, False) if args.timing else prof)
                    row = {"preset": preset, "world": world, "mode": label, "kind": "measured",
                           "batch_per_rank": BATCH_PER_RANK, **measured,
                           "predicted": predicted(preset, IMAGE, world, label, BATCH_PER_RANK,
                                                  fsdp_grads=args.fsdp_grads)}
                    rows.append(row)
                    print(f"[memory] {preset} world {world} {label}: peak {row['peak'] / 1e6:.2f} MB, predicted "
                          f"{row['predicted']['peak'] / 1e6:.2f} MB, RSS {row['rss_peak'] / 1e6:.0f} MB, "
                          f"step {row['step_seconds']:.3f} s", file=sys.stderr, flush=True)
    for path in args.rows_from:
        with open(path) as f:
            earlier = json.load(f)
        earlier_measured = [r for r in earlier["rows"] if r["kind"] == "measured"]  # computed rows: recomputed below
        for r in earlier_measured:  # measured rows get the current model's prediction
            r["predicted"] = predicted(r["preset"], IMAGE, r["world"], r["mode"], r["batch_per_rank"],
                                       fsdp_grads=args.fsdp_grads)
        rows += earlier_measured
        sources.append({"file": path, "commit": earlier.get("commit"),
                        "load_average_at_end": earlier.get("machine", {}).get("load_average_at_end"),
                        "rows_from": earlier.get("rows_from", [])})  # where that file's own rows came from
    measured = [r for r in rows if r["kind"] == "measured"]
    for r in measured:
        ddp = next((d for d in measured if d["mode"] == "ddp" and d["preset"] == r["preset"] and d["world"] == r["world"]),
                   None)
        if r["mode"].startswith("fsdp") and ddp is not None:
            r["step_time_ratio_to_ddp"] = r["step_seconds"] / ddp["step_seconds"]
            r["peak_ratio_to_ddp"] = r["peak"] / ddp["peak"]
    for preset, kwargs in COMPUTED:
        for precision, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
            for world in args.computed_worlds:
                for label in (["none"] if world == 1 else ["ddp", "fsdp+st"]):
                    pred = predicted(preset, kwargs, world, label, COMPUTED_BATCH, dtype, "sharded", foreach=True,
                                     phema_profiles=COMPUTED_PHEMA_PROFILES)
                    rows.append({"preset": preset, "world": world, "mode": label, "kind": "computed",
                                 "precision": precision, "batch_per_rank": COMPUTED_BATCH, "predicted": pred,
                                 "phema_profiles": COMPUTED_PHEMA_PROFILES,
                                 "predicted_if_fsdp_grads_unsharded": predicted(
                                     preset, kwargs, world, label, COMPUTED_BATCH, dtype, "unsharded", foreach=True,
                                     phema_profiles=COMPUTED_PHEMA_PROFILES)
                                 if label.startswith("fsdp") else None,
                                 **{k: pred[k] for k in ("params", "optimizer", "ema", "phema", "teacher")},
                                 "grads": pred["grads"]})
    unique = {}
    for r in rows:  # a row measured or computed twice (--rows-from) is kept once, the first time
        unique.setdefault((r["preset"], r["world"], r["mode"], r["kind"], r.get("precision")), r)
    rows = list(unique.values())
    os.makedirs(args.out, exist_ok=True)
    text = table(rows)
    with open(os.path.join(args.out, "memory.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(args.out, "memory.json"), "w") as f:
        json.dump({"rows": rows, "seconds": time.time() - t0, "torch": torch.__version__,
                   "commit": _commit(), "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                                    "load_average_at_end": os.getloadavg()},
                   "threads_per_rank": 1, "batch_per_rank": BATCH_PER_RANK, "image": IMAGE,
                   "measured_steps": list(MEASURED_STEPS), "timing_run": args.timing, "fsdp_grads_assumed": args.fsdp_grads, "rows_from": sources, "cfg": {"scale": CFG_SCALE, "clip_norm": CFG_CLIP}},
                  f, indent=1)
    print(text)
    print(f"\n→ {args.out}/memory.json, memory.md")
    return 0


def _commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


if __name__ == "__main__":
    sys.exit(main())
