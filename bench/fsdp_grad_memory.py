"""Gradient memory and step time of the ways an FSDP step can run the DE-CM terms' backwards.

    python bench/fsdp_grad_memory.py [--preset small-cpu] [--steps 4] [--out bench/results]

One DE-CM step has three loss terms (L_cm, L_fm, L_n2n). Candidates, each on 2 CPU ranks (gloo, one
thread per rank) with the same SiT student, teacher, batch and seed:
  - 'fsdp deferred': a backward per term, the terms before the last with FSDP2's gradient sync off
    (`set_requires_gradient_sync(False)`, the counterpart of DDP's `no_sync`), one reduce-scatter at
    the last term (the platform's design before this benchmark);
  - 'fsdp per-term': a backward per term, each reduce-scattering its gradients into the shards (the
    design now used by `train.parallel = 'fsdp'`);
  - 'fsdp summed': the three terms' forwards with their graphs kept, one backward of the summed loss;
  - 'ddp per-term': DDP's backward per term with `no_sync` (the replicated reference).

Per rank and step (every term active, N2N included), measured:
  - gradient bytes held after each term's backward (`decm.parallel.held_grad_bytes`: the local
    shards of `.grad` plus the unsharded gradients FSDP2 keeps between backwards) — the largest one;
  - peak memory during the step: the process's RSS high-water mark (VmHWM, reset at the step's
    start through /proc/self/clear_refs) minus its RSS at the start, the largest over the timed
    steps. The ranks run with glibc's `MALLOC_MMAP_THRESHOLD_=65536`, so every tensor above 64 KiB
    is its own mapping, returned to the OS when freed: the RSS follows the live tensors (activations,
    gathered blocks, gradients, temporaries) instead of the allocator's cached free lists;
  - the collectives each rank issues in the step (profiler events `c10d::*`, counted);
  - step time: the mean of the steps after the first, without the profiler, slowest rank.
(torch.profiler's memory events were tried for the peak and dropped: FSDP2 frees its gathered
parameters by resizing their storage, which the running sum of those events does not see.)
Step times on a shared 2-core machine: compare candidates, not seconds. Writes
`<out>/fsdp_grad_memory.json`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

IMAGE = dict(input_size=16, in_channels=4, num_classes=10)  # latent-like: 4 × 16 × 16, 10 classes
BATCH_PER_RANK = 4
WORLD = 2
CANDIDATES = ("fsdp deferred", "fsdp per-term", "fsdp summed", "ddp per-term")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build(preset: str):
    """(student, teacher, objective) on every rank alike: a perturbed random SiT teacher and its student."""
    from decm.method.guidance import CFG
    from decm.method.objective import decm_objective
    from decm.method.teachers import NetworkTeacher
    from decm.models.sit import sit

    torch.manual_seed(0)
    teacher = sit(preset, time_scale=1.0, flow_map=False, **IMAGE)
    for p in teacher.parameters():  # DiT init zeroes the output layers: make every path non-trivial
        p.data.add_(0.02 * torch.randn_like(p))
    student = sit(preset, time_scale=1.0, flow_map=True, **IMAGE)
    student.load_state_dict(teacher.state_dict(), strict=False)
    return student, NetworkTeacher(teacher), decm_objective(guidance=CFG(scale=1.5, clip_norm=1.0))


class Deferred:
    """Today's-before design as a wrapper: the terms before the last run with FSDP2's gradient sync off."""

    is_data_parallel_wrapper = True

    def __init__(self, sharded):
        self.sharded, self.module = sharded, sharded.module

    def __call__(self, *args, **kwargs):
        return self.sharded(*args, **kwargs)

    @contextlib.contextmanager
    def no_sync(self):
        self.module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.module.set_requires_gradient_sync(True)


def _rss() -> tuple[int, int]:
    """(current RSS, RSS high-water mark) of this process in bytes, from /proc/self/status."""
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS", "VmHWM")):
                values[line[:5]] = int(line.split()[1]) * 1024
    return values["VmRSS"], values["VmHWM"]


def _reset_hwm() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # '5' resets VmHWM to the current RSS (Linux)
        f.write("5")


def collective_calls(prof) -> dict:
    """{'c10d::<op>': calls} of the profiled step: the collectives each rank issued."""
    calls: dict = {}
    for e in prof.events():
        if e.name.startswith("c10d::"):
            calls[e.name] = calls.get(e.name, 0) + 1
    return dict(sorted(calls.items()))


def worker(rank, port, preset, candidate, steps, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import datetime

    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile

    from decm import parallel
    from decm.distributed import DistInfo, any_true
    from decm.method.objective import Objective
    from decm.seeding import step_generator

    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(minutes=5))
    info = DistInfo(rank, WORLD, rank, torch.device("cpu"))
    student, teacher, objective = build(preset)
    ema = __import__("copy").deepcopy(student).requires_grad_(False)
    mode = "ddp" if candidate.startswith("ddp") else "fsdp"
    wrapped = parallel.wrap(student, ema, teacher, mode, WORLD, info.device)
    if candidate == "fsdp deferred":
        wrapped = Deferred(wrapped)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
    held = []
    backward_term = Objective._backward_term

    def counted(term, ctx, t, s, agree):
        value = backward_term(term, ctx, t, s, agree)
        held.append(parallel.held_grad_bytes(student))
        return value

    Objective._backward_term = staticmethod(counted)
    per_term = candidate != "fsdp summed"
    rng = torch.Generator().manual_seed(100 + rank)
    records = []
    for step in range(steps + 1):  # the last one is profiled (collectives counted)
        x1 = torch.randn((BATCH_PER_RANK, IMAGE["in_channels"], IMAGE["input_size"], IMAGE["input_size"]),
                         generator=rng)
        y = torch.randint(0, IMAGE["num_classes"], (BATCH_PER_RANK,), generator=rng)
        held.clear()
        opt.zero_grad(set_to_none=True)
        profiled = step == steps
        ctx = profile(activities=[ProfilerActivity.CPU]) if profiled else contextlib.nullcontext()
        dist.barrier()
        _reset_hwm()
        rss_start = _rss()[0]
        t0 = time.perf_counter()
        with ctx as prof:
            g = step_generator(0, rank, 0)  # step index 0 for the objective: N2N active, all three terms
            if per_term:
                objective(wrapped, teacher, x1, y, 0, g, backward=True, agree=lambda bad: any_true(bad, info))
            else:
                loss, _, _ = objective(wrapped, teacher, x1, y, 0, g)
                loss.backward()
                held.append(parallel.held_grad_bytes(student))
            parallel.clip_grad_norm(list(student.parameters()), 1.0)
            opt.step()
        seconds = time.perf_counter() - t0
        records.append({"step": step, "seconds": seconds, "rss_peak_increase_bytes": _rss()[1] - rss_start, "held_grad_bytes_after_each_backward": list(held),
                        "collectives": collective_calls(prof) if profiled else None})
    full = sum(p.numel() * p.element_size() for p in student.parameters())
    checksum = parallel.param_checksum(student)
    dist.destroy_process_group()
    with open(f"{out}-{rank}.json", "w") as f:
        json.dump({"records": records, "full_param_bytes": full, "param_checksum": checksum}, f)


def run(preset: str, candidate: str, steps: int, tmp: str) -> dict:
    import torch.multiprocessing as mp

    out = os.path.join(tmp, candidate.replace(" ", "_"))
    mp.start_processes(worker, args=(_port(), preset, candidate, steps, out), nprocs=WORLD, start_method="spawn")
    ranks = []
    for r in range(WORLD):
        with open(f"{out}-{r}.json") as f:
            ranks.append(json.load(f))
    timed = [statistics.mean(rec["seconds"] for rec in d["records"][1:-1]) for d in ranks]
    held = [max(max(rec["held_grad_bytes_after_each_backward"]) for rec in d["records"]) for d in ranks]
    student_bytes = ranks[0]["full_param_bytes"]  # the whole student's parameters (DTensor.numel is global)
    return {"candidate": candidate, "held_grad_bytes_max": max(held),
            "held_grad_bytes_per_backward_rank0": ranks[0]["records"][-1]["held_grad_bytes_after_each_backward"],
            "held_grad_over_full_div_world": max(held) / (student_bytes / WORLD),
            "rss_peak_increase_bytes_during_step": max(max(rec["rss_peak_increase_bytes"] for rec in d["records"][1:-1])
                                                       for d in ranks),
            "collectives_per_step_rank0": ranks[0]["records"][-1]["collectives"],
            "step_seconds": max(timed), "step_seconds_per_step_rank0": [rec["seconds"] for rec in ranks[0]["records"][1:-1]], "param_checksum": ranks[0]["param_checksum"],
            "student_param_bytes": student_bytes}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="small-cpu")
    ap.add_argument("--steps", type=int, default=4, help="timed steps (the first is a warm-up); one more is profiled")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args(argv)
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # read by glibc when each spawned rank starts
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for candidate in CANDIDATES:
            rows.append(run(args.preset, candidate, args.steps, tmp))
            print(json.dumps(rows[-1]), flush=True)
    result = {"preset": args.preset, "world": WORLD, "batch_per_rank": BATCH_PER_RANK, "image": IMAGE,
              "backend": "gloo (CPU), 1 thread per rank", "torch": torch.__version__, "machine": platform.machine(),
              "cpus": os.cpu_count(), "steps_timed": args.steps - 1, "malloc_mmap_threshold": 65536,
              "load_average_1min_at_end": os.getloadavg()[0], "rows": rows}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "fsdp_grad_memory.json")
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=1)
    os.replace(path + ".tmp", path)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
