"""Cost of one training step per objective, as ratios to a plain flow-matching step on the same backbone.

    python bench/step_cost.py --preset tiny [--batch 32] [--image-size 16] [--device cpu|cuda] [--bf16]
                              [--guidance 1.5] [--variants ...]

One process, one backbone, one batch: median wall time over `--repeats` rounds (after `--warmup`) and
memory of a full optimizer step (forward, backward, AdamW); the variants run round-robin, one step
each per round, so drifts of a shared machine hit them alike. Variants:
  fm         flow-matching pretraining step on the velocity model (fused attention)
  cm         L_cm alone (JVP: no-grad torch.func.jvp on the unwrapped student + one with-grad forward)
  cm_fwad    L_cm, the same JVP with torch.autograd.forward_ad dual numbers
  cm_dual    L_cm, one with-grad dual forward: its primal is the prediction (no separate forward)
  cm_fd      L_cm with the float64 finite-difference JVP instead
  fm_term    L_fm alone (the student's instantaneous velocity vs the teacher)
  n2n        L_n2n alone
  decm       full DE-CM, amortised over 3 steps (N2N on every 3rd)
  decm_dual  full DE-CM with the with-grad dual forward in L_cm and L_n2n
  scm        sCM-style L_cm (tangent normalisation, learned weighting)
  meanflow   MeanFlow objective on (t, s) pairs
All distillation variants run one backward per term (objective.backward_per_term, as in training).
Memory: on CUDA the peak allocated bytes of the step; on CPU the peak bytes of tensors saved for
backward and alive at once (activation memory, counted with saved-tensor hooks).
Teacher calls are no-grad and CFG-batched (`--guidance` w, 1.5 by default; 1 = unguided, one forward
on the batch); L_cm and L_fm share the teacher call.

The floor: the same script times the parts a step cannot avoid — the guided teacher call T, one
no-grad JVP J, one with-grad student forward + backward W and the AdamW update O — and prints, per
variant, the sum of its parts (cm: T + J + W + O; fm_term: T + W + O; n2n: 2T + J + W + O;
decm: T + J + 2W + O + (2T + J + W)/3) and how far the measured step is above it.
Writes bench/results/step_cost-<preset>-<device>[-bf16][-w<guidance>].json with machine info.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench._timing import seconds  # noqa: E402

VARIANTS = ["fm", "cm", "cm_fwad", "cm_dual", "cm_fd", "fm_term", "n2n", "decm", "decm_dual", "scm", "meanflow"]


def objectives(guidance: float = 1.5):
    from decm.method.guidance import CFG, NoGuidance
    from decm.method.losses import CMLoss, FMLoss, MeanFlowLoss, N2NLoss
    from decm.method.objective import Objective, Term
    from decm.method.pretrain import FlowMatchingPretrain
    from decm.method.selectors import Consistency, GeneralPairs, Instantaneous, NoiseToNoisy

    cfg = CFG(scale=guidance) if guidance != 1.0 else NoGuidance()

    def decm(jvp_method="autograd"):
        return Objective([Term("cm", Consistency(), CMLoss()), Term("fm", Instantaneous(), FMLoss()),
                          Term("n2n", NoiseToNoisy(), N2NLoss(), every=3)], guidance=cfg, jvp_method=jvp_method)

    return {
        "fm": FlowMatchingPretrain(),
        "cm": Objective([Term("cm", Consistency(), CMLoss())], guidance=cfg),
        "cm_fwad": Objective([Term("cm", Consistency(), CMLoss())], guidance=cfg, jvp_method="forward_ad"),
        "cm_dual": Objective([Term("cm", Consistency(), CMLoss())], guidance=cfg, jvp_method="forward_ad_grad"),
        "cm_fd": Objective([Term("cm", Consistency(), CMLoss())], guidance=cfg, jvp_method="fd"),
        "fm_term": Objective([Term("fm", Instantaneous(), FMLoss())], guidance=cfg),
        "n2n": Objective([Term("n2n", NoiseToNoisy(), N2NLoss())], guidance=cfg),
        "decm": decm(),
        "decm_dual": decm("forward_ad_grad"),
        "scm": Objective([Term("cm", Consistency(), CMLoss(target="scm", weighting="none", robust_c=0.0,
                                                           learned_weighting=True))], guidance=cfg),
        "meanflow": Objective([Term("meanflow", GeneralPairs(), MeanFlowLoss())], guidance=cfg),
    }


FLOORS = {  # variant → {part: count}; T teacher call, J no-grad JVP, W with-grad fwd+bwd, O AdamW update
    "cm": {"T": 1, "J": 1, "W": 1, "O": 1}, "cm_fwad": {"T": 1, "J": 1, "W": 1, "O": 1},
    "fm_term": {"T": 1, "W": 1, "O": 1}, "n2n": {"T": 2, "J": 1, "W": 1, "O": 1},
    "decm": {"T": 1 + 2 / 3, "J": 1 + 1 / 3, "W": 2 + 1 / 3, "O": 1},
    "scm": {"T": 1, "J": 1, "W": 1, "O": 1}, "meanflow": {"T": 1, "J": 1, "W": 1, "O": 1},
}


class _Packed:
    """A tensor saved for backward; counts its bytes as live until autograd releases it."""

    __slots__ = ("tensor", "owner", "nbytes")

    def __init__(self, tensor, owner):
        # detach(): the same storage without grad_fn. Holding a saved *output* itself would make a
        # cycle (node → packed → tensor → grad_fn → node) that never frees the graph.
        self.tensor, self.owner = tensor.detach(), owner
        self.nbytes = tensor.numel() * tensor.element_size()
        owner.live += self.nbytes
        owner.peak = max(owner.peak, owner.live)

    def __del__(self):
        self.owner.live -= self.nbytes


class SavedBytes:
    """Peak bytes of tensors saved for backward and alive at once (CPU activation memory).

    Each saved tensor is counted from the forward that saves it until its graph is freed (after its
    backward), so a backward per term shows as a lower peak than one backward of the summed loss.
    """

    def __init__(self):
        self.live = self.peak = 0

    def __enter__(self):
        self.live = self.peak = 0
        self._ctx = torch.autograd.graph.saved_tensors_hooks(lambda t: _Packed(t, self), lambda p: p.tensor)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)


def variant_round(name, objective, model, teacher, batches, device, bf16):
    """A function round(i) → (seconds per step, memory bytes): one timed optimizer step of the variant
    (three for DE-CM, amortised over its N2N period), run as decm.train runs it."""
    from decm.seeding import step_generator

    params = [p for p in list(model.parameters()) + list(objective.parameters()) if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    steps = 3 if name.startswith("decm") else 1
    per_term = getattr(objective, "backward_per_term", False)

    def one_round(i):
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0, saved = time.perf_counter(), 0
        for k in range(steps):
            step = i * steps + k
            x1, y = batches[step % len(batches)]
            opt.zero_grad(set_to_none=True)
            with SavedBytes() as sb:
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    kw = {"backward": True} if per_term else {}
                    loss, _, _ = objective(model, teacher, x1, y, step, step_generator(0, 0, step), **kw)
                if not per_term:
                    loss.backward()
            opt.step()
            saved = max(saved, sb.peak)
        if device.type == "cuda":
            torch.cuda.synchronize()
        mem = torch.cuda.max_memory_allocated() if device.type == "cuda" else saved
        return (time.perf_counter() - t0) / steps, mem

    return one_round


def part_functions(student, teacher, guidance, batches, device, bf16):
    """The unavoidable parts of a step, as functions: T (guided teacher call), J (no-grad JVP), W
    (with-grad student forward + backward), O (AdamW update), at the time points of L_cm."""
    from decm.method.jvp import flow_map_jvp

    x1, y = batches[0]
    n = x1.shape[0]
    t, s = torch.rand(n, device=device), torch.ones(n, device=device)
    x = (1 - t.view(-1, 1, 1, 1)) * torch.randn_like(x1) + t.view(-1, 1, 1, 1) * x1
    v = guidance(teacher, x, t, y)
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-5)

    def teacher_call():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            guidance(teacher, x, t, y)

    def fwd_bwd():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = student(x, t, s, y)
        out.float().square().mean().backward()

    fwd_bwd()  # gradients for the optimizer step

    def jvp(lean):
        return lambda: flow_map_jvp(student, x, t, s, y, v, torch.ones_like(t), torch.zeros_like(s), lean=lean)

    # J_pytorch: the same JVP with PyTorch's own linear/GELU/attention forward-AD rules (what `lean` saves)
    return {"T": teacher_call, "J": jvp(True), "W": fwd_bwd, "O": opt.step, "J_pytorch": jvp(False)}


def main(argv=None) -> int:
    from decm import cli

    p = cli.parser("python bench/step_cost.py", __doc__)
    p.add_argument("--preset", default="tiny", help="backbones.sit preset (tiny, small-cpu, S/2, B/2, XL/2, ...)")
    p.add_argument("--batch", type=int, default=32, help="samples per step")
    p.add_argument("--image-size", type=int, default=16, help="latent/image side (32 for ImageNet-256 latents)")
    p.add_argument("--channels", type=int, default=4, help="latent channels")
    p.add_argument("--classes", type=int, default=10, help="classes (+ the null class)")
    p.add_argument("--guidance", type=float, default=1.5, help="teacher CFG scale w (1 = unguided)")
    p.add_argument("--repeats", type=int, default=10, help="timed rounds (median reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed warm-up rounds")
    p.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS, help="step variants to time")
    p.add_argument("--device", default="cpu", help="'cpu' or 'cuda'")
    p.add_argument("--bf16", action="store_true", help="autocast bf16 (JVP and time embeddings stay fp32)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", default=None, help="JSON path (default: bench/results/<name>.json)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from decm.method.guidance import CFG, NoGuidance
    from decm.method.teachers import NetworkTeacher
    from decm.models.sit import sit
    from decm.models.build import student_from_teacher

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
    # Round-robin: every round runs each variant once (and each part once), so slow drifts of the
    # machine hit all variants alike; medians over the rounds after `--warmup`.
    rounds = {name: variant_round(name, obj.to(device), velocity if name == "fm" else student, teacher, batches,
                                  device, args.bf16)
              for name, obj in objectives(args.guidance).items() if name in args.variants}
    guidance = CFG(scale=args.guidance) if args.guidance != 1.0 else NoGuidance()
    part_fns = part_functions(student, teacher, guidance, batches, device, args.bf16)
    samples = {name: [] for name in rounds}
    part_samples = {k: [] for k in part_fns}
    for i in range(args.warmup + args.repeats):
        for name, one_round in rounds.items():
            sec, mem = one_round(i)
            if i >= args.warmup:
                samples[name].append((sec, mem))
        for k, fn in part_fns.items():
            sec = seconds(fn, device)
            if i >= args.warmup:
                part_samples[k].append(sec)
        print(f"  round {i + 1}/{args.warmup + args.repeats}", file=sys.stderr, flush=True)
    results = {name: {"seconds": statistics.median(sec for sec, _ in v), "memory_bytes": int(max(m for _, m in v))}
               for name, v in samples.items()}
    parts = {k: statistics.median(v) for k, v in part_samples.items()}
    base = results.get("fm")
    lines = [f"step cost, preset {args.preset}, batch {args.batch}, {args.channels}×{args.image_size}², "
             f"{args.device}{' bf16' if args.bf16 else ''}, CFG w = {args.guidance:g}, {torch.get_num_threads()} threads",
             f"{'variant':<10} {'ms/step':>9} {'× FM':>6} {'memory':>10} {'× FM':>6} {'floor ms':>9} {'× floor':>8}"]
    for name, r in results.items():
        if base:
            r["time_ratio"] = r["seconds"] / base["seconds"]
            r["memory_ratio"] = r["memory_bytes"] / max(base["memory_bytes"], 1)
        if name in FLOORS:
            r["floor_seconds"] = sum(parts[k] * c for k, c in FLOORS[name].items())
            r["over_floor"] = r["seconds"] / r["floor_seconds"]
        floor = (f"{r['floor_seconds'] * 1e3:9.1f} {r['over_floor']:8.2f}" if "floor_seconds" in r
                 else f"{'':>9} {'':>8}")
        lines.append(f"{name:<10} {r['seconds'] * 1e3:9.1f} {r.get('time_ratio', float('nan')):6.2f} "
                     f"{r['memory_bytes'] / 2**20:8.1f}Mi {r.get('memory_ratio', float('nan')):6.2f} {floor}")
    lines.append("parts: " + ", ".join(f"{k} = {v * 1e3:.1f} ms" for k, v in parts.items())
                 + " (T teacher call, J no-grad JVP, W with-grad forward+backward, O AdamW;"
                 " J_pytorch: J with PyTorch's own linear/GELU/attention rules)")
    print("\n".join(lines))
    info = {"python": platform.python_version(), "torch": torch.__version__, "machine": platform.machine(),
            "processor": platform.processor(), "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
            "device": str(device), "cuda_device": torch.cuda.get_device_name() if device.type == "cuda" else None,
            "memory_measure": "cuda max_memory_allocated" if device.type == "cuda"
            else "peak bytes saved for backward alive at once",
            "jvp": "cm/decm: no-grad torch.func.jvp on the unwrapped student (lean linear/GELU tangents) + separate "
                   "with-grad forward; *_fwad: forward_ad dual numbers, no grad; *_dual: one with-grad dual forward "
                   "(primal = prediction); cm_fd: float64 central FD",
            "backward": "one backward per term (objective.backward_per_term)"}
    suffix = f"{'-bf16' if args.bf16 else ''}{'' if args.guidance == 1.5 else f'-w{args.guidance:g}'}"
    out = args.out or os.path.join("bench", "results", f"step_cost-{args.preset.replace('/', '')}-{device.type}{suffix}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"args": vars(args), "machine": info, "parts_seconds": parts, "results": results}, f, indent=2)
    print(f"→ {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
