"""Sampling throughput: DE-CM student at 1 / 2 / 4 NFE vs the teacher at 50 Euler steps (samples/s).

    python bench/sampling.py [--preset tiny] [--batch 256] [--image-size 16] [--device cpu] [--guidance 1.5]

Same backbone for both (the student is the teacher's architecture with the s-embedder). The teacher
runs with CFG (one batched cond + uncond forward per step) when `--guidance` > 1, as it is sampled in
evaluation; the student needs no guidance (CFG is distilled into it). Median over `--repeats`.
Writes bench/results/sampling-<preset>-<device>.json.
"""

from __future__ import annotations

import json
import os
import platform
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench._timing import median_seconds  # noqa: E402


def main(argv=None) -> int:
    from decm import cli

    p = cli.parser("python bench/sampling.py", __doc__)
    p.add_argument("--preset", default="tiny", help="backbones.sit preset")
    p.add_argument("--batch", type=int, default=256, help="samples per call")
    p.add_argument("--image-size", type=int, default=16, help="latent height and width")
    p.add_argument("--channels", type=int, default=4, help="latent channels")
    p.add_argument("--classes", type=int, default=10, help="classes (+ the null class)")
    p.add_argument("--guidance", type=float, default=1.5, help="teacher CFG scale (1: none)")
    p.add_argument("--teacher-nfe", type=int, default=50, help="teacher Euler steps compared with")
    p.add_argument("--repeats", type=int, default=5, help="timed repetitions (median reported)")
    p.add_argument("--device", default="cpu", help="'cpu' or 'cuda'")
    p.add_argument("--out", default=None, help="JSON path (default: bench/results/<name>.json)")
    args = p.parse_args(argv)
    from decm.method.guidance import CFG, NoGuidance
    from decm.method.teachers import NetworkTeacher
    from decm.models.sit import sit
    from decm.sampling import Chain, TeacherEuler

    device = torch.device(args.device)
    torch.manual_seed(0)
    kw = dict(input_size=args.image_size, in_channels=args.channels, num_classes=args.classes)
    student = sit(args.preset, flow_map=True, **kw).to(device).eval()
    teacher = NetworkTeacher(sit(args.preset, flow_map=False, **kw)).to(device)
    z = torch.randn(args.batch, args.channels, args.image_size, args.image_size, device=device)
    y = torch.randint(0, args.classes, (args.batch,), device=device)
    guidance = CFG(scale=args.guidance) if args.guidance > 1 else NoGuidance()
    results = {}
    with torch.no_grad():
        for nfe in (1, 2, 4):
            sec = median_seconds(lambda: Chain()(student, z, y, nfe=nfe), device, args.repeats)
            results[f"student_nfe{nfe}"] = {"seconds": sec, "samples_per_s": args.batch / sec}
        sec = median_seconds(lambda: TeacherEuler(guidance=guidance)(teacher, z, y, nfe=args.teacher_nfe), device,
                    max(1, args.repeats // 2))
        results[f"teacher_nfe{args.teacher_nfe}"] = {"seconds": sec, "samples_per_s": args.batch / sec}
    teacher_rate = results[f"teacher_nfe{args.teacher_nfe}"]["samples_per_s"]
    print(f"sampling, preset {args.preset}, batch {args.batch}, {args.device}, teacher CFG {args.guidance}")
    for name, r in results.items():
        r["speedup_vs_teacher"] = r["samples_per_s"] / teacher_rate
        print(f"  {name:<16} {r['samples_per_s']:10.1f} samples/s  {r['speedup_vs_teacher']:7.1f}× the teacher")
    out = args.out or os.path.join("bench", "results", f"sampling-{args.preset.replace('/', '')}-{device.type}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"args": vars(args), "machine": {"torch": torch.__version__, "python": platform.python_version(),
                                                   "cpu_count": os.cpu_count(), "threads": torch.get_num_threads()},
                   "results": results}, f, indent=2)
    print(f"→ {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
