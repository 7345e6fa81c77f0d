"""Per-rank training-state memory and step time, DDP vs FSDP (train.parallel), measured and computed.

    python bench/memory.py [--presets tiny small-cpu] [--worlds 1 2 4] [--steps 3] [--out DIR]

Measured (CPU, gloo, one process per rank, `OMP_NUM_THREADS=1` each): for each SiT preset and world
size, the student (from a perturbed teacher) is trained with the full DE-CM objective (all three terms,
CFG 1.5 with clipping, backward per term, clipping, AdamW, EMA) exactly as decm.parallel sets it up —
world 1: one process; otherwise DDP, and FSDP with the teacher sharded. After the steps each rank
counts the bytes of its own tensors: parameters, gradients, AdamW moments (exp_avg, exp_avg_sq), the
EMA and the teacher (local shards under FSDP); the table gives the largest rank. Step time: the median
over the timed steps of the slowest rank.

Computed (meta device, decm.memory): XL/2, LightningDiT-XL/1 and the 2B/2 preset at world 1, 8 and 16,
from their parameter shapes. The measured rows also carry the computed value, so the model of the
computation is checked against real tensors.

Target (issue #16): FSDP's params + grads + optimizer bytes ≤ 1.1 × DDP's / world + the unsharded
remainder (the objective's replicated learnable parameters). Writes `<out>/memory.json` and
`<out>/memory.md` (default out: bench/results).
"""

from __future__ import annotations

import copy
import json
import os
import platform
import socket
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

IMAGE = dict(input_size=16, in_channels=4, num_classes=10)  # latent-like CPU input: 4 × 16 × 16, 10 classes
COMPUTED = [("XL/2", dict(input_size=32, in_channels=4, num_classes=1000)),
            ("LightningDiT-XL/1", dict(input_size=16, in_channels=32, num_classes=1000)),
            ("2B/2", dict(input_size=32, in_channels=4, num_classes=1000))]
BATCH_PER_RANK = 4
PARTS = ("params", "grads", "optimizer", "ema", "teacher")


def _nbytes(tensors) -> int:
    from decm.parallel import local

    return sum(local(t).numel() * local(t).element_size() for t in tensors if t is not None)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank, world, port, preset, mode, steps, out):
    """One rank: build, train `steps` + 1 steps, count bytes, time steps; rank 0 writes the JSON row."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import torch.distributed as dist

    from decm import distributed, parallel, train_state
    from decm.method.guidance import CFG
    from decm.method.objective import decm_objective
    from decm.method.teachers import NetworkTeacher
    from decm.models.build import student_from_teacher
    from decm.models.sit import sit
    from decm.seeding import step_generator

    info = distributed.init("cpu") if world > 1 else distributed.DistInfo()
    torch.manual_seed(0)
    teacher_net = sit(preset, flow_map=False, time_scale=1.0, **IMAGE)
    for p in teacher_net.parameters():
        p.data.add_(0.02 * torch.randn_like(p))

    class Data:
        shape, num_classes = (IMAGE["in_channels"], IMAGE["input_size"], IMAGE["input_size"]), IMAGE["num_classes"]

    student = student_from_teacher(lambda **kw: sit(preset, time_scale=1.0, **kw), Data, teacher_net)
    teacher = NetworkTeacher(teacher_net)
    ema = copy.deepcopy(student).eval().requires_grad_(False)
    objective = decm_objective(guidance=CFG(scale=1.5, clip_norm=1.0))
    wrapped = parallel.wrap(student, ema, teacher, mode, world, info.device, shard_teacher=mode == "fsdp")
    groups = train_state.param_groups(student, objective)
    params = [p for g in groups for p in g["params"]]
    extra = groups[1]["params"] if len(groups) > 1 else []  # the objective's replicated parameters
    opt = torch.optim.AdamW(groups, lr=1e-4)

    def agree(bad):
        return distributed.any_true(bad, info)

    times = []
    for step in range(steps + 1):
        g = step_generator(0, rank, step)
        x1 = torch.randn((BATCH_PER_RANK, *Data.shape), generator=g)
        y = torch.randint(0, Data.num_classes, (BATCH_PER_RANK,), generator=g)
        distributed.barrier(info)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        objective(wrapped, teacher, x1, y, step, g, backward=True, agree=agree)
        parallel.sync_replicated_grads(extra, world)
        parallel.clip_grad_norm(params, 1.0)
        opt.step()
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), student.parameters()):
                p_ema.lerp_(p.detach(), 0.001)
        elapsed = torch.tensor([time.perf_counter() - t0])
        if world > 1:
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        if step > 0:  # the first step builds the optimizer state and warms up
            times.append(float(elapsed))
    moments = [v for s in opt.state.values() for k, v in s.items() if k != "step"]
    counts = torch.tensor([float(_nbytes([*student.parameters(), *extra])),
                           float(_nbytes(p.grad for p in [*student.parameters(), *extra])),
                           float(_nbytes(moments)), float(_nbytes(ema.parameters())),
                           float(_nbytes(teacher_net.parameters()))], dtype=torch.float64)
    if world > 1:
        dist.all_reduce(counts, op=dist.ReduceOp.MAX)
    if rank == 0:
        row = {"preset": preset, "world": world, "mode": mode, **{k: int(v) for k, v in zip(PARTS, counts.tolist())},
               "replicated_numel": sum(p.numel() for p in extra),
               "step_seconds": statistics.median(times), "steps_timed": len(times)}
        with open(out, "w") as f:
            json.dump(row, f)
    distributed.shutdown()


def measure(preset: str, world: int, mode: str, steps: int, tmp: str) -> dict:
    import torch.multiprocessing as mp

    out = os.path.join(tmp, f"{preset.replace('/', '_')}-{world}-{mode}.json")
    if world == 1:
        worker(0, 1, 0, preset, mode, steps, out)
    else:
        mp.start_processes(worker, args=(world, _port(), preset, mode, steps, out), nprocs=world, start_method="spawn")
    with open(out) as f:
        return json.load(f)


def computed(preset: str, kwargs: dict, world: int, mode: str, shard_teacher: bool, replicated_numel: int = 0) -> dict:
    from decm import memory
    from decm.models.sit import sit

    with torch.device("meta"):
        student = memory.shard_profile(sit(preset, flow_map=True, **kwargs))
        teacher = memory.shard_profile(sit(preset, flow_map=False, **kwargs))
    return memory.per_rank(student, world, mode, teacher, shard_teacher, replicated_numel)


def with_target(rows: list[dict]) -> None:
    """Adds 'state' (params + grads + optimizer), and for FSDP rows the DDP reference, the target and the
    verdict (the DDP row of the same preset and world; computed rows: DDP computed)."""
    from decm import memory

    for r in rows:
        r["state"] = r["params"] + r["grads"] + r["optimizer"]
    for r in rows:
        if r["mode"] != "fsdp":
            continue
        ddp = next(d for d in rows if d["mode"] == "ddp" and d["preset"] == r["preset"] and d["world"] == r["world"]
                   and d["kind"] == r["kind"])
        r["ddp_state"] = ddp["state"]
        r["target"] = memory.target(ddp["state"], r["world"], 16 * r.get("replicated_numel", 0))
        r["within_target"] = r["state"] <= r["target"]
        r["state_ratio_to_ddp_over_world"] = r["state"] / (ddp["state"] / r["world"])
        if "step_seconds" in r:
            r["step_time_ratio_to_ddp"] = r["step_seconds"] / ddp["step_seconds"]


def table(rows: list[dict]) -> str:
    def gb(b):
        return f"{b / 1e9:.3f}" if b >= 1e8 else f"{b / 1e6:.2f} MB"

    lines = ["Bytes per rank (the largest rank), GB unless marked MB; state = params + grads + AdamW moments.", "",
             "| preset | how | world | mode | params | grads | AdamW | EMA | teacher | state ÷ (DDP ÷ world) | "
             "within target | step time vs DDP |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['state_ratio_to_ddp_over_world']:.3f}" if "state_ratio_to_ddp_over_world" in r else "—"
        ok = ("yes" if r["within_target"] else "NO") if "within_target" in r else "—"
        speed = f"{r['step_time_ratio_to_ddp']:.2f}×" if "step_time_ratio_to_ddp" in r else "—"
        lines.append(f"| {r['preset']} | {r['kind']} | {r['world']} | {r['mode']} | " + " | ".join(
            gb(r[k]) for k in PARTS) + f" | {ratio} | {ok} | {speed} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    import tempfile

    from decm import cli

    p = cli.parser("python bench/memory.py", __doc__)
    p.add_argument("--presets", nargs="+", default=["tiny", "small-cpu"], help="SiT presets measured on CPU ranks")
    p.add_argument("--worlds", nargs="+", type=int, default=[1, 2, 4], help="world sizes measured (1: one process)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per measurement (after one warm-up step)")
    p.add_argument("--computed-worlds", nargs="+", type=int, default=[1, 8, 16],
                   help="world sizes of the meta-device rows (XL/2, LightningDiT-XL/1, 2B/2)")
    p.add_argument("--out", default="bench/results", help="output directory (memory.json, memory.md)")
    args = p.parse_args(argv)
    if args.steps < 1 or any(w < 1 for w in args.worlds + args.computed_worlds):
        print("bench/memory.py: error: --steps and every world size must be ≥ 1", file=sys.stderr)
        return 2
    t0 = time.time()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets:
            for world in args.worlds:
                for mode in (["none"] if world == 1 else ["ddp", "fsdp"]):
                    row = measure(preset, world, mode, args.steps, tmp)
                    est = computed(preset, IMAGE, world, mode, mode == "fsdp", row["replicated_numel"])
                    row.update(kind="measured", computed={k: est[k] for k in PARTS})
                    rows.append(row)
                    print(f"[memory] {preset} world {world} {mode}: state {row['params'] + row['grads'] + row['optimizer']} B, "
                          f"step {row['step_seconds']:.3f} s", file=sys.stderr, flush=True)
    for preset, kwargs in COMPUTED:
        for world in args.computed_worlds:
            for mode in (["none"] if world == 1 else ["ddp", "fsdp"]):
                est = computed(preset, kwargs, world, mode, mode == "fsdp")
                rows.append({"preset": preset, "world": world, "mode": mode, "kind": "computed",
                             **{k: est[k] for k in PARTS}})
    with_target(rows)
    os.makedirs(args.out, exist_ok=True)
    text = table(rows)
    with open(os.path.join(args.out, "memory.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(args.out, "memory.json"), "w") as f:
        json.dump({"rows": rows, "seconds": time.time() - t0, "torch": torch.__version__,
                   "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
                   "threads_per_rank": 1, "batch_per_rank": BATCH_PER_RANK, "image": IMAGE}, f, indent=1)
    print(text)
    print(f"\n→ {args.out}/memory.json, memory.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
