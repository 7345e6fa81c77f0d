"""Cost of one training step per objective, as ratios to a plain flow-matching step on the same backbone.

    python bench/step_cost.py --preset tiny [--batch 32] [--image-size 16] [--device cpu|cuda] [--bf16]

One process, one backbone, one batch: median wall time over `--repeats` steps (after `--warmup`) and
memory of a full optimizer step (forward, backward, AdamW) for
  fm        flow-matching pretraining step on the velocity model (fused attention)
  cm        L_cm alone (JVP: no-grad torch.func.jvp on the unwrapped student + one with-grad forward)
  cm_fd     L_cm with the float64 finite-difference JVP instead
  fm_term   L_fm alone (the student's instantaneous velocity vs the teacher)
  n2n       L_n2n alone
  decm      full DE-CM, amortised over 3 steps (N2N on every 3rd)
  scm       sCM-style L_cm (tangent normalisation, learned weighting)
  meanflow  MeanFlow objective on (t, s) pairs
Memory: on CUDA the peak allocated bytes of the step; on CPU the bytes of tensors saved for backward
(activation memory, counted with saved-tensor hooks) — the term that grows with batch and depth.
Teacher calls are no-grad and CFG-batched (guidance w = 1.5), L_cm and L_fm share the teacher call.
Writes bench/results/step_cost-<preset>-<device>.json with machine info.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

VARIANTS = ["fm", "cm", "cm_fd", "fm_term", "n2n", "decm", "scm", "meanflow"]


def objectives():
    from decm.method.guidance import CFG
    from decm.method.losses import CMLoss, FMLoss, MeanFlowLoss, N2NLoss
    from decm.method.objective import Objective, Term
    from decm.method.pretrain import FlowMatchingPretrain
    from decm.method.selectors import Consistency, GeneralPairs, Instantaneous, NoiseToNoisy

    cfg = CFG(scale=1.5)
    return {
        "fm": FlowMatchingPretrain(),
        "cm": Objective([Term("cm", Consistency(), CMLoss())], guidance=cfg),
        "cm_fd": Objective([Term("cm", Consistency(), CMLoss())], guidance=cfg, jvp_method="fd"),
        "fm_term": Objective([Term("fm", Instantaneous(), FMLoss())], guidance=cfg),
        "n2n": Objective([Term("n2n", NoiseToNoisy(), N2NLoss())], guidance=cfg),
        "decm": Objective([Term("cm", Consistency(), CMLoss()), Term("fm", Instantaneous(), FMLoss()),
                           Term("n2n", NoiseToNoisy(), N2NLoss(), every=3)], guidance=cfg),
        "scm": Objective([Term("cm", Consistency(), CMLoss(target="scm", weighting="none", robust_c=0.0,
                                                           learned_weighting=True))], guidance=cfg),
        "meanflow": Objective([Term("meanflow", GeneralPairs(), MeanFlowLoss())], guidance=cfg),
    }


class SavedBytes:
    """Counts the bytes of tensors autograd saves for backward (CPU activation memory)."""

    def __init__(self):
        self.total = 0

    def __enter__(self):
        self.total = 0
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def pack(self, t):
        self.total += t.numel() * t.element_size()
        return t

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)


def measure(name, objective, model, teacher, batches, device, repeats, warmup, bf16):
    from decm.train import step_generator

    params = [p for p in list(model.parameters()) + list(objective.parameters()) if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    times, mems = [], []
    steps = 3 if name == "decm" else 1  # DE-CM amortised over its N2N period
    for i in range(warmup + repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        saved = 0
        for k in range(steps):
            x1, y = batches[(i * steps + k) % len(batches)]
            with SavedBytes() as sb, torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss, _, _ = objective(model, teacher, x1, y, i * steps + k, step_generator(0, 0, i * steps + k))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            saved = max(saved, sb.total)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = (time.perf_counter() - t0) / steps
        if i >= warmup:
            times.append(dt)
            mems.append(torch.cuda.max_memory_allocated() if device.type == "cuda" else saved)
    return statistics.median(times), max(mems)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny", help="backbones.sit preset (tiny, small-cpu, S/2, B/2, XL/2, ...)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--image-size", type=int, default=16, help="latent/image side (32 for ImageNet-256 latents)")
    p.add_argument("--channels", type=int, default=4)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    p.add_argument("--device", default="cpu")
    p.add_argument("--bf16", action="store_true", help="autocast bf16 (JVP and time embeddings stay fp32)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from decm.method.teachers import NetworkTeacher
    from decm.models.sit import sit
    from decm.train import student_from_teacher

    device = torch.device(args.device)
    torch.manual_seed(0)
    kw = dict(input_size=args.image_size, in_channels=args.channels, num_classes=args.classes)
    velocity = sit(args.preset, flow_map=False, **kw)
    for prm in velocity.parameters():  # non-zero outputs (DiT init zeroes the last layers)
        prm.data.add_(0.02 * torch.randn_like(prm))

    class Shape:
        shape, num_classes = (args.channels, args.image_size, args.image_size), args.classes

    student = student_from_teacher(lambda **k: sit(args.preset, **k), Shape, velocity).to(device)
    teacher = NetworkTeacher(sit(args.preset, flow_map=False, **kw)).to(device)
    teacher.net.load_state_dict(velocity.state_dict())
    velocity = velocity.to(device)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(args.batch, *Shape.shape, generator=g).to(device),
                torch.randint(0, args.classes, (args.batch,), generator=g).to(device)) for _ in range(4)]
    results = {}
    for name, obj in objectives().items():
        if name not in args.variants:
            continue
        model = velocity if name == "fm" else student
        sec, mem = measure(name, obj.to(device), model, teacher, batches, device, args.repeats, args.warmup, args.bf16)
        results[name] = {"seconds": sec, "memory_bytes": int(mem)}
        print(f"  {name:<9} {sec * 1e3:8.1f} ms  {mem / 2**20:8.1f} MiB", file=sys.stderr, flush=True)
    base = results.get("fm")
    lines = [f"step cost, preset {args.preset}, batch {args.batch}, {args.channels}×{args.image_size}², "
             f"{args.device}{' bf16' if args.bf16 else ''}, {torch.get_num_threads()} threads",
             f"{'variant':<10} {'ms/step':>9} {'× FM':>6} {'memory':>10} {'× FM':>6}"]
    for name, r in results.items():
        if base:
            r["time_ratio"] = r["seconds"] / base["seconds"]
            r["memory_ratio"] = r["memory_bytes"] / max(base["memory_bytes"], 1)
        lines.append(f"{name:<10} {r['seconds'] * 1e3:9.1f} {r.get('time_ratio', float('nan')):6.2f} "
                     f"{r['memory_bytes'] / 2**20:8.1f}Mi {r.get('memory_ratio', float('nan')):6.2f}")
    print("\n".join(lines))
    info = {"python": platform.python_version(), "torch": torch.__version__, "machine": platform.machine(),
            "processor": platform.processor(), "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
            "device": str(device), "cuda_device": torch.cuda.get_device_name() if device.type == "cuda" else None,
            "memory_measure": "cuda max_memory_allocated" if device.type == "cuda" else "bytes saved for backward",
            "jvp": "no-grad torch.func.jvp on the unwrapped student + separate with-grad forward (cm_fd: float64 FD)"}
    out = args.out or os.path.join("bench", "results",
                                   f"step_cost-{args.preset.replace('/', '')}-{device.type}{'-bf16' if args.bf16 else ''}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"args": vars(args), "machine": info, "results": results}, f, indent=2)
    print(f"→ {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
