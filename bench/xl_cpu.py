"""Real-size DE-CM training steps on CPU: LightningDiT-XL/1 and SiT-XL/2, one process and FSDP over 2.

    python bench/xl_cpu.py [--models lightningdit-xl1 sit-xl2] [--configs single:fp32 fsdp2:fp32 ...]
                           [--batch 2] [--max-gib 20] [--deadline-minutes M] [--reduced | --depth N] [--out FILE]

Each configuration runs in fresh processes (world 1 or 2, gloo, threads = 2 / world) and does:
  1. builds teacher, student and EMA with the real architecture (`--reduced`: the same code at width
     64, depth 2, 4 heads, for the test suite) on the meta device, shards them under FSDP (teacher
     included, `train.shard_teacher`), then materialises only this rank's shards and fills them with
     the same random weights in every configuration (a value per parameter name; the student is the
     teacher plus a small perturbation, the EMA a copy of the student);
  2. one process, fp32: the JVP tangent dF/dt·(v, 1, 0) of the student (torch.func.jvp, as L_cm
     computes it) against a float64 central finite difference at this size, on one sample (before
     AdamW exists, so the float64 copy of the student fits);
  3. gives AdamW its moments with one zero-gradient update (a resumed run's state: the parameters do
     not move), then runs `--steps` training steps from index `--first-step` exactly as decm.train's
     loop does: DE-CM objective (L_cm + L_fm, and L_n2n on indices divisible by 3), CFG w = 1.75 with velocity clipping η = 1, backward per
     term, replicated-gradient sync, gradient clipping 1.0, AdamW, EMA; under bf16 the objective runs
     in autocast (the JVP and time embeddings stay fp32, as in training);
  4. records per rank the tensor peak and RSS peak of each step (bench/_peak.py) next to the
     prediction of decm/memory.py, the step time, every loss and whether it is finite.

Before launching a configuration the driver checks its predicted memory (per-rank peak + the
process's own memory, times the world size) against `--max-gib` and the memory available now less `--reserve-gib` (with
a deadline it waits for other jobs to free memory, up to one minute before the deadline); a
configuration that does not fit is not started and the JSON says by how much. A configuration still
running at the deadline is stopped (its finished phases stay recorded). Step times on a shared machine
are recorded with the load average and are not a benchmark. Writes bench/results/xl_cpu.json
(`--reduced`: xl_cpu-reduced.json; `--depth N`: xl_cpu-depthN.json).

`--depth N` keeps the real width, heads, tokens and batch and builds only N blocks (the prediction is
made for the same N blocks): bf16 autocast on a CPU without native bf16 matrix units (AVX2 only) runs
its matrix products ~100× slower than fp32, so a full-depth bf16 step does not finish in a session there
— the driver measures both rates at the model's MLP shape and records them (`matmul_gflops`).
"""

from __future__ import annotations

import copy
import json
import math
import os
import platform
import re
import socket
import sys
import time
import zlib

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# name: (sit preset, input shape and classes, architecture options)
MODELS = {
    "lightningdit-xl1": ("LightningDiT-XL/1", dict(input_size=16, in_channels=32, num_classes=1000), {}),
    "sit-xl2": ("XL/2", dict(input_size=32, in_channels=4, num_classes=1000), dict(learn_sigma=True)),
}
REDUCED = dict(depth=2, hidden_size=64, num_heads=4)  # --reduced: same code, same inputs, tiny width
CONFIG_FORMAT = re.compile(r"^(single|ddp(\d+)|fsdp(\d+)):(fp32|bf16)$")  # e.g. single:fp32, fsdp2:bf16, ddp8:bf16
SDPA_OPS = {"aten::_scaled_dot_product_flash_attention_for_cpu": "flash (CPU)",
            "aten::_scaled_dot_product_flash_attention": "flash", "aten::_scaled_dot_product_efficient_attention":
            "memory-efficient", "aten::_scaled_dot_product_cudnn_attention": "cuDNN",
            "aten::_scaled_dot_product_attention_math": "math"}


def parse_config(config: str) -> tuple[str, int, str]:
    """'single:fp32' → ('none', 1, 'fp32'); 'fsdp2:bf16' → ('fsdp', 2, 'bf16'); 'ddp8:bf16' → ('ddp', 8, 'bf16')."""
    m = CONFIG_FORMAT.match(config)
    if m is None or (m.group(1) != "single" and int(m.group(2) or m.group(3)) < 2):
        raise ValueError(f"configuration {config!r}: expected single:<p>, ddp<N>:<p> or fsdp<N>:<p> with N ≥ 2 and "
                         "<p> fp32 or bf16")
    if m.group(1) == "single":
        return "none", 1, m.group(4)
    return ("ddp", int(m.group(2)), m.group(4)) if m.group(2) else ("fsdp", int(m.group(3)), m.group(4))
CFG_SCALE, CFG_CLIP = 1.75, 1.0   # the paper's distillation scale; velocity clipping η
PROCESS_BYTES = 0.8e9             # one worker's own memory (interpreter, torch, profiler), measured: ~0.7 GB
SEED = 0


def architecture(model: str, reduced: bool, depth: int | None = None):
    preset, data, options = MODELS[model]
    overrides = {**options, **(REDUCED if reduced else {}), **({"depth": depth} if depth else {})}

    def build(**kwargs):
        from decm.models.sit import sit

        return sit(preset, time_scale=1.0, **kwargs, **overrides)
    return build, data


def predicted(model: str, reduced: bool, mode: str, world: int, precision: str, batch: int,
              fsdp_grads: str = "sharded", device: str = "cpu", depth: int | None = None) -> dict:
    from decm import memory

    build, data = architecture(model, reduced, depth)
    return memory.predict_step_peak(build, data, batch, world, mode, teacher=True, shard_teacher=mode == "fsdp",
                                    autocast_dtype=torch.bfloat16 if precision == "bf16" else None,
                                    unsharded_grads=fsdp_grads == "unsharded", optimizer_foreach=device == "cuda")


def _value(name: str, shape, salt: int) -> torch.Tensor:
    """The random value of parameter `name` (global shape), the same in every configuration and rank."""
    g = torch.Generator().manual_seed(SEED * 1_000_003 + zlib.crc32(name.encode()) + salt)
    if name.endswith("norm1.weight") or name.endswith("norm2.weight") or name.endswith("norm_final.weight"):
        return 1 + 0.02 * torch.randn(shape, generator=g)
    return 0.02 * torch.randn(shape, generator=g)


def _fill(module, rank: int, world: int, student: bool) -> None:
    """Writes this rank's part of every parameter (teacher values; student = teacher + 0.002·noise)."""
    from decm.models.sit import Rope2D, sincos_pos_embed_2d
    from decm.parallel import is_sharded

    with torch.no_grad():
        for name, p in module.named_parameters():
            if name == "pos_embed":
                grid = int(math.isqrt(p.shape[1]))
                full = torch.from_numpy(sincos_pos_embed_2d(p.shape[-1], grid)).float().unsqueeze(0)
            else:
                full = _value(name, p.shape, 0)
                if student:
                    full += 0.002 * _value(name, p.shape, 1)
            if is_sharded(p):
                local = p.to_local()
                chunks = torch.chunk(full, world, dim=0)
                part = chunks[rank] if rank < len(chunks) else full[:0]
                local.copy_(part.reshape(local.shape))
            else:
                p.copy_(full)  # copy_ moves it to the parameter's device
        rope = getattr(module, "feat_rope", None)
        if rope is not None:
            fresh = Rope2D(rope.freqs_cos.shape[-1], int(math.isqrt(rope.freqs_cos.shape[0])))
            rope.freqs_cos.copy_(fresh.freqs_cos)
            rope.freqs_sin.copy_(fresh.freqs_sin)


def _copy_params(src, dst) -> None:
    from decm.parallel import local

    with torch.no_grad():
        for a, b in zip(src.parameters(), dst.parameters()):
            local(b).copy_(local(a))
        for a, b in zip(src.buffers(), dst.buffers()):
            b.copy_(a)


def _inputs(data: dict, batch: int, seed: int, device) -> tuple:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((batch, data["in_channels"], data["input_size"], data["input_size"]), generator=g)
    t = 0.1 + 0.8 * torch.rand(batch, generator=g)
    y = torch.randint(0, data["num_classes"], (batch,), generator=g)
    return x.to(device), t.to(device), y.to(device)


def jvp_check(student, teacher, data: dict, batch: int, device) -> dict:
    """The L_cm tangent dF(x, t, 1)·(v_φ, 1, 0) by torch.func.jvp vs a float64 central difference.

    On CUDA the tangent is computed twice: with the backend's precision flags as training runs them
    (PyTorch's defaults let cuDNN convolutions use TF32, `torch.backends.cudnn.allow_tf32`, while fp32
    matrix products stay full fp32) and with TF32 off everywhere ('without_tf32'), so a difference in
    the error is attributed to TF32 rather than to the JVP.
    """
    from decm.method.jvp import flow_map_jvp, jvp_finite_difference

    x, t, y = _inputs(data, batch, SEED + 7, device)
    s = torch.ones_like(t)
    t0 = time.perf_counter()
    with torch.no_grad():
        v = teacher(x, t, y)
    _, tangent = flow_map_jvp(student, x, t, s, y, v, torch.ones_like(t), torch.zeros_like(s), method="autograd")
    jvp_seconds = time.perf_counter() - t0
    _, fd = jvp_finite_difference(lambda m, a, b, c: m(a, b, c, y), (x, t, s), (v, torch.ones_like(t), torch.zeros_like(s)),
                                  eps=1e-4, module=student)

    def errors(tan):
        diff = tan.double() - fd.double()
        return {"max_abs_error": float(diff.abs().max()), "relative_error": float(diff.norm() / fd.double().norm()),
                "tangent_norm": float(tan.norm()), "finite": bool(torch.isfinite(tan).all())}

    out = {**errors(tangent), "fd_eps": 1e-4, "jvp_plus_teacher_seconds": jvp_seconds,
           "seconds": time.perf_counter() - t0}
    if torch.device(device).type == "cuda":
        flags = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
        out["tf32"] = {"cudnn": flags[0], "matmul": flags[1]}
        try:
            torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
            _, exact = flow_map_jvp(student, x, t, s, y, v, torch.ones_like(t), torch.zeros_like(s), method="autograd")
        finally:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags
        out["without_tf32"] = errors(exact)
    return out


def sdpa_backends(fn) -> list[str]:
    """The attention kernels `fn()` ran, from the profiler's operator names (decm's JVP computes attention
    with matmul + softmax, decm.method.jvp._plain_attention, and shows as such)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    names = {e.name for e in prof.events()}
    found = sorted({label for op, label in SDPA_OPS.items() if op in names})
    if not found and {"aten::softmax", "aten::_softmax"} & names:
        found = ["matmul + softmax (decm's JVP rule)"]
    return found


def measure_passes(student, teacher, opt, params, data: dict, batch: int, device, precision: str,
                   repeats: int = 3) -> dict:
    """Median seconds of the passes a DE-CM step is made of, and the attention kernel each one ran.

    F: no-grad student forward; J: the no-grad JVP of L_cm (fp32, outside autocast, as the objective runs
    it); W: with-grad student forward + backward; T: the CFG teacher call (twice the batch); FM step:
    a flow-matching step of the student (with-grad forward at s = t, MSE to x₁ − z, backward, clip,
    AdamW); L_cm step: the objective with the L_cm term alone + clip + AdamW.
    """
    from bench._timing import median_seconds
    from decm import parallel
    from decm.method.guidance import CFG
    from decm.method.jvp import flow_map_jvp
    from decm.method.losses import CMLoss
    from decm.method.objective import Objective, Term
    from decm.method.selectors import Consistency

    x, t, y = _inputs(data, batch, SEED + 11, device)
    z = torch.randn_like(x)
    ones, zeros = torch.ones_like(t), torch.zeros_like(t)
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    guidance = CFG(scale=CFG_SCALE, clip_norm=CFG_CLIP)
    cm_only = Objective([Term("cm", Consistency(), CMLoss())], guidance=guidance)
    with torch.no_grad():
        v = guidance(teacher, x, t, y)

    def forward():
        with torch.no_grad(), autocast:
            student(x, t, ones, y)

    def jvp():
        flow_map_jvp(student, x, t, ones, y, v, ones, zeros, method="autograd")

    def with_grad():
        with autocast:
            out = student(x, t, ones, y)
        out.float().square().mean().backward()
        opt.zero_grad(set_to_none=True)

    def teacher_call():
        with torch.no_grad(), autocast:
            guidance(teacher, x, t, y)

    def fm_step():
        xt = (1 - t.view(-1, 1, 1, 1)) * z + t.view(-1, 1, 1, 1) * x
        with autocast:
            out = student(xt, t, t, y)
        ((out.float() - (x - z)) ** 2).mean().backward()
        parallel.clip_grad_norm(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def cm_step():
        with autocast:
            cm_only(student, teacher, x, y, 1, torch.Generator().manual_seed(SEED), backward=True)
        parallel.clip_grad_norm(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    passes = {"forward": forward, "jvp": jvp, "with_grad": with_grad, "teacher_cfg": teacher_call,
              "fm_step": fm_step, "cm_step": cm_step}
    out = {"seconds": {k: median_seconds(fn, device, repeats) for k, fn in passes.items()},
           "attention": {k: sdpa_backends(passes[k]) for k in ("forward", "jvp", "with_grad", "teacher_cfg")}}
    sec = out["seconds"]
    out["jvp_in_forwards"] = sec["jvp"] / sec["forward"]
    out["cm_step_over_fm_step"] = sec["cm_step"] / sec["fm_step"]
    if device.type == "cuda":  # a lead, not an option of decm: the same JVP with TF32 matrix products
        try:
            out["jvp_tf32"] = jvp_with_tf32(jvp, student, x, t, ones, y, v, device, repeats)
            out["jvp_tf32"]["in_forwards"] = out["jvp_tf32"]["seconds"] / sec["forward"]
        except Exception as e:  # noqa: BLE001 — recorded; the passes measured above stay
            out["jvp_tf32"] = {"error": f"{type(e).__name__}: {e}"}
    return out


def jvp_with_tf32(jvp, student, x, t, ones, y, v, device, repeats: int) -> dict:
    """Seconds of the L_cm JVP with TF32 allowed in matrix products and convolutions (CUDA), and the
    relative difference of its tangent from the tangent under PyTorch's default flags."""
    from bench._timing import median_seconds
    from decm.method.jvp import flow_map_jvp

    zeros = torch.zeros_like(t)
    _, reference = flow_map_jvp(student, x, t, ones, y, v, ones, zeros, method="autograd")
    flags = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    try:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
        seconds = median_seconds(jvp, device, repeats)
        _, tangent = flow_map_jvp(student, x, t, ones, y, v, ones, zeros, method="autograd")
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags
    diff, norm = float((tangent - reference).double().norm()), float(reference.double().norm())
    return {"seconds": seconds, "difference_norm": diff, "reference_norm": norm,
            "relative_difference": diff / norm if norm > 0 else None}


def worker(rank, world, port, model, mode, precision, batch, steps, first_step, reduced, device_type, passes, out,
           depth=None):
    """One rank of one configuration; writes `out`-<rank>.json after every phase."""
    if device_type == "cpu":
        os.environ.update(OMP_NUM_THREADS=str(max(1, 2 // world)))
        torch.set_num_threads(max(1, 2 // world))
    else:
        torch.cuda.set_device(rank)
    if world > 1:
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
    from bench._peak import Windows, rss_bytes

    record = {"rank": rank, "phases": []}

    def write(phase):
        record["phases"].append({"phase": phase, "rss_peak_of_window": _rss_hwm(), "at": time.time()})
        tmp = f"{out}-{rank}.json.tmp"
        with open(tmp, "w") as f:
            json.dump(record, f)
        os.replace(tmp, f"{out}-{rank}.json")

    record["rss_at_start"] = rss_bytes()
    device = torch.device("cuda", rank) if device_type == "cuda" else torch.device("cpu")
    windows = Windows(device, tensors=True, rss=True)
    from decm import distributed, parallel, train_state
    from decm.method.guidance import CFG
    from decm.method.objective import decm_objective
    from decm.method.teachers import NetworkTeacher
    from decm.seeding import step_generator

    info = distributed.init(device_type)
    build, data = architecture(model, reduced, depth)
    t0 = time.perf_counter()
    windows.mark("build")
    with torch.device("meta"):
        t_net = build(**data, flow_map=False)
        student = build(**data, flow_map=True)
    ema = copy.deepcopy(student).eval().requires_grad_(False)
    teacher = NetworkTeacher(t_net)
    objective = decm_objective(guidance=CFG(scale=CFG_SCALE, clip_norm=CFG_CLIP))
    if mode == "fsdp":  # shard on the meta device: each rank materialises only its shards
        wrapped = parallel.wrap(student, ema, teacher, mode, world, info.device, precision, shard_teacher=True)
    for m in (t_net, student, ema):
        m.to_empty(device=info.device)
    _fill(t_net, rank, world, student=False)
    _fill(student, rank, world, student=True)
    _copy_params(student, ema)
    if mode != "fsdp":
        wrapped = parallel.wrap(student, ema, teacher, mode, world, info.device, precision)
    record["parameters"] = {"student": sum(p.numel() for p in student.parameters()),
                            "teacher": sum(p.numel() for p in t_net.parameters())}
    record["build_seconds"] = time.perf_counter() - t0
    write("built")
    if world == 1 and precision == "fp32":
        windows.mark("jvp_check")
        record["jvp_check"] = jvp_check(student, teacher, data, 1, info.device)
        write("jvp_check")
    groups = train_state.param_groups(student, objective)
    params = [p for g in groups for p in g["params"]]
    extra = groups[1]["params"] if len(groups) > 1 else []
    opt = torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0)
    windows.mark("adamw_state")
    for p in params:  # a resumed run's AdamW state: moments exist, the update is zero
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    autocast = parallel.autocast(device_type, precision, mode)  # the loop's own (FSDP: no weight cache)
    record["steps"] = []
    for step in range(first_step, first_step + steps):
        g = step_generator(SEED, rank, step)
        x1 = torch.randn((batch, data["in_channels"], data["input_size"], data["input_size"]), generator=g)
        y = torch.randint(0, data["num_classes"], (batch,), generator=g)
        x1, y = x1.to(info.device), y.to(info.device)
        opt.zero_grad(set_to_none=True)
        windows.mark(f"step{step}")
        with autocast:
            _, stats, _ = objective(wrapped, teacher, x1, y, step, g, backward=True,
                                    agree=lambda bad: distributed.any_true(bad, info))
        parallel.sync_replicated_grads(extra, world)
        grad_norm = parallel.clip_grad_norm(params, 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(0.9999, (1 + step) / (10 + step))
            for p_ema, p in zip(ema.parameters(), student.parameters()):
                p_ema.lerp_(p.detach(), 1 - decay)
        windows.mark(f"after{step}")
        losses = {k: v for k, v in stats.items() if k.startswith("loss/")}
        record["steps"].append({"step": step, "losses": losses, "grad_norm": float(grad_norm),
                                "finite": all(math.isfinite(v) for v in losses.values()) and math.isfinite(float(grad_norm))})
        write(f"step{step}")
    windows.close()
    record["windows"] = windows.result()  # written before the passes, so a failure there keeps the steps
    record["unrecorded_frees"] = windows.unrecorded_frees
    record["rss_reset_worked"] = windows.rss_reset_works()
    write("steps_done")
    if passes and world == 1:
        record["passes"] = measure_passes(student, teacher, opt, params, data, batch, info.device, precision)
        write("passes")
    distributed.shutdown()
    write("done")


def _rss_hwm() -> int:
    from bench._peak import rss_peak_bytes

    return rss_peak_bytes()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def run_config(model, config, args, tmp) -> dict:
    """Checks the prediction against the limits, runs the configuration, collects its ranks' records."""
    import torch.multiprocessing as mp

    mode, world, precision = parse_config(config)
    pred = predicted(model, args.reduced, mode, world, precision, args.batch, args.fsdp_grads, args.device, args.depth)
    row = {"model": model, "config": config, "depth": args.depth or ("reduced" if args.reduced else "full"), "world": world, "precision": precision, "batch_per_rank": args.batch,
           "device": args.device, "mode": {"none": "one process", "ddp": "DDP", "fsdp": "FSDP (teacher sharded)"}[mode],
           "predicted": pred}
    if args.device == "cuda":  # per GPU: the prediction + ~1 GB of CUDA context against the free memory of GPU 0
        need, free = pred["peak"] + 2 ** 30, torch.cuda.mem_get_info(0)[0]
        if world > torch.cuda.device_count() or need > free:
            row["status"] = "refused"
            row["reason"] = (f"needs {world} GPUs with {need / 2 ** 30:.1f} GiB each; {torch.cuda.device_count()} visible, "
                             f"{free / 2 ** 30:.1f} GiB free on GPU 0")
            return row
    else:
        need = world * (pred["peak"] + PROCESS_BYTES)
        row.update(predicted_machine_bytes=need, limit_bytes=args.max_gib * 2 ** 30,
                   available_bytes_at_launch=available_bytes())
        waited = time.time()
        reserve = args.reserve_gib * 2 ** 30
        row["reserve_bytes"] = reserve
        while need <= row["limit_bytes"] and need > row["available_bytes_at_launch"] - reserve and args.deadline \
                and time.time() + 60 < args.deadline:  # other jobs hold memory now: wait for it, up to the deadline
            time.sleep(15)
            row["available_bytes_at_launch"] = available_bytes()
        row["waited_for_memory_seconds"] = time.time() - waited
        available = row["available_bytes_at_launch"] - reserve
        if need > min(row["limit_bytes"], available):
            row["status"] = "refused"
            over = []  # only the limits the prediction actually exceeds
            if need > row["limit_bytes"]:
                over.append(f"over --max-gib {args.max_gib:g} by {(need - row['limit_bytes']) / 2 ** 30:.2f} GiB")
            if need > available:
                over.append(f"over the memory available now ({row['available_bytes_at_launch'] / 2 ** 30:.2f} GiB "
                            f"− {args.reserve_gib:g} GiB kept free) by {(need - available) / 2 ** 30:.2f} GiB")
            row["reason"] = f"predicted {need / 2 ** 30:.2f} GiB for {world} process(es): " + ", ".join(over)
            return row
    out = os.path.join(tmp, f"{model}-{config.replace(':', '-')}")
    t0 = time.time()
    ctx = mp.start_processes(worker, args=(world, _port(), model, mode, precision, args.batch, args.steps,
                                           args.first_step, args.reduced, args.device, args.passes, out, args.depth),
                             nprocs=world, start_method="spawn", join=False)
    status = "ok"
    try:
        while not ctx.join(timeout=5):
            if args.deadline and time.time() > args.deadline:
                status = "stopped at the deadline"
                for p in ctx.processes:
                    if p.is_alive():
                        p.kill()
                break
    except Exception as e:  # noqa: BLE001 — a rank that died is recorded, not fatal for the other configurations
        status = f"failed: {type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
    row["wall_seconds"] = time.time() - t0
    ranks = []
    for r in range(world):
        try:
            with open(f"{out}-{r}.json") as f:
                ranks.append(json.load(f))
        except (OSError, ValueError):
            ranks.append({"rank": r, "phases": []})
    row["status"], row["ranks"] = status, ranks
    row["load_average_after"] = os.getloadavg()
    done = [r for r in ranks if "windows" in r]
    if len(done) == world:
        steps = [f"step{s}" for s in range(args.first_step, args.first_step + args.steps)]
        row["peak"] = max(r["windows"][s]["tensor_peak"] for r in done for s in steps)
        row["peak_per_rank"] = [max(r["windows"][s]["tensor_peak"] for s in steps) for r in done]
        row["rss_peak_per_rank"] = [max(r["windows"][k]["rss_peak"] for k in r["windows"]) for r in done]
        row["rss_peak_machine"] = sum(row["rss_peak_per_rank"])
        row["peak_over_predicted"] = row["peak"] / pred["peak"]
        row["step_seconds"] = [max(r["windows"][s]["seconds"] for r in done) for s in steps]
        row["losses_finite"] = all(st["finite"] for r in done for st in r["steps"])
        timed = row["step_seconds"][1:] or row["step_seconds"]  # the first step warms up when there are several
        row["images_per_second"] = world * args.batch / (sum(timed) / len(timed))
    for key in ("jvp_check", "passes"):
        if ranks and key in ranks[0]:
            row[key] = ranks[0][key]
    return row


def matmul_rates(arch, batch: int, threads: int = 2) -> dict:
    """Measured GFLOP/s of one (batch · tokens) × hidden by hidden × 4·hidden product in fp32 and in bf16,
    with `threads` threads (what the one-process configurations use): why a bf16 step is slow on this CPU."""
    build, data = arch
    with torch.device("meta"):
        net = build(**data, flow_map=False)
    _, tokens, hidden = net.pos_embed.shape
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    rates = {"shape": [batch * tokens, hidden, 4 * hidden], "threads": threads}
    try:
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            a = torch.randn(batch * tokens, hidden).to(dtype)
            b = torch.randn(hidden, 4 * hidden).to(dtype)
            a @ b  # warm-up
            reps, t0 = 0, time.perf_counter()
            while reps < 3 or time.perf_counter() - t0 < 1.0:
                a @ b
                reps += 1
            rates[name] = 2 * a.shape[0] * hidden * 4 * hidden * reps / (time.perf_counter() - t0) / 1e9
    finally:
        torch.set_num_threads(before)
    return rates


def table(rows: list[dict]) -> str:
    """One Markdown table of the rows (any mix of devices and configurations)."""
    def gib(b):
        return f"{b / 2 ** 30:.2f} GiB" if b >= 2 ** 30 else f"{b / 2 ** 20:.1f} MiB"

    lines = ["| model | config | device | batch/rank | status | img/s | step s | peak per rank (predicted) | "
             "L_cm ÷ FM step | JVP in forwards | attention: forward / JVP / with-grad |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if isinstance(r.get("depth"), int):
            r = {**r, "model": f"{r['model']} ({r['depth']} block{'s' if r['depth'] > 1 else ''})"}
        pa = r.get("passes")
        att = " / ".join(", ".join(pa["attention"][k]) or "—" for k in ("forward", "jvp", "with_grad")) if pa else "—"
        peak = f"{gib(r['peak'])} ({gib(r['predicted']['peak'])})" if "peak" in r else (
            f"— ({gib(r['predicted']['peak'])})" if "predicted" in r else "—")
        lines.append(f"| {r['model']} | {r['config']} | {r.get('device', 'cpu')} | {r.get('batch_per_rank', '—')} | "
                     f"{r['status'].split(':')[0]} | {r['images_per_second']:.2f} |" if "images_per_second" in r else
                     f"| {r['model']} | {r['config']} | {r.get('device', 'cpu')} | {r.get('batch_per_rank', '—')} | "
                     f"{r['status'].split(':')[0]} | — |")
        timed = r.get("step_seconds", [])[1:] or r.get("step_seconds", [])  # as img/s: the first step warms up
        step = f"{sum(timed) / len(timed):.3g}" if timed else "—"
        lines[-1] += (f" {step} | {peak} | " + (f"{pa['cm_step_over_fm_step']:.2f} | {pa['jvp_in_forwards']:.2f} | "
                                                if pa else "— | — | ") + f"{att} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    import tempfile

    from decm import cli

    p = cli.parser("python bench/xl_cpu.py", __doc__)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS), help="architectures, in order")
    p.add_argument("--configs", nargs="+", default=["single:fp32", "fsdp2:fp32", "single:bf16", "fsdp2:bf16"],
                   help="configurations, in order: single:<p>, ddp<N>:<p> or fsdp<N>:<p> (N ranks; FSDP shards the "
                        "teacher), <p> = fp32 or bf16 (autocast)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="cpu (gloo, 2 threads per configuration) or cuda (one GPU per rank, NCCL)")
    p.add_argument("--passes", action="store_true",
                   help="one-process configurations: also time the forward, JVP, with-grad pass, CFG teacher call, "
                        "an FM step and an L_cm step, and record the attention kernel of each pass")
    p.add_argument("--table", nargs="+", metavar="JSON", default=None,
                   help="print one table of these result files and exit (nothing is run)")
    p.add_argument("--batch", type=int, default=2, help="samples per rank")
    p.add_argument("--steps", type=int, default=1, help="training steps per configuration (step 0 runs all three terms)")
    p.add_argument("--first-step", type=int, default=0,
                   help="index of the first step (N2N runs when index %% 3 == 0: 0 has all three terms, 1 has two)")
    p.add_argument("--fsdp-grads", choices=["sharded", "unsharded"], default="sharded",
                   help="what the prediction assumes FSDP holds between the terms' backwards: 'sharded' (a "
                        "reduce-scatter per term, today's loop) or 'unsharded' (the reduction deferred to the last "
                        "term: full-size gradients, as the loop did before)")
    p.add_argument("--max-gib", type=float, default=20.0, help="refuse a configuration predicted above this (GiB)")
    p.add_argument("--reserve-gib", type=float, default=1.0,
                   help="CPU: memory to keep free beyond the prediction; a configuration waits (up to the deadline) "
                        "or is refused when the memory available now minus this is less than predicted")
    p.add_argument("--deadline-minutes", type=float, default=0.0, help="stop whatever runs after this long (0: never)")
    p.add_argument("--reduced", action="store_true", help="width 64, depth 2, 4 heads (the test suite's version)")
    p.add_argument("--depth", type=int, default=None,
                   help="real width, heads and tokens with only this many blocks (bf16 on a CPU without native bf16)")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/xl_cpu[-reduced|-depthN].json)")
    args = p.parse_args(argv)
    if args.table:
        rows = []
        for path in args.table:
            with open(path) as f:
                rows += json.load(f)["rows"]
        print(table(rows))
        return 0
    if args.batch < 1 or args.steps < 1 or args.first_step < 0 or args.max_gib <= 0 or args.reserve_gib < 0:
        print("bench/xl_cpu.py: error: --batch and --steps must be ≥ 1, --first-step ≥ 0, --max-gib > 0 and "
              "--reserve-gib ≥ 0",
              file=sys.stderr)
        return 2
    if args.depth is not None and (args.depth < 1 or args.reduced):
        print("bench/xl_cpu.py: error: --depth must be ≥ 1 and cannot be combined with --reduced", file=sys.stderr)
        return 2
    try:
        for config in args.configs:
            parse_config(config)
    except ValueError as e:
        print(f"bench/xl_cpu.py: error: {e}", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench/xl_cpu.py: error: --device cuda but no CUDA device is visible", file=sys.stderr)
        return 2
    suffix = "-reduced" if args.reduced else (f"-depth{args.depth}" if args.depth else "")
    args.out = args.out or os.path.join("bench", "results", f"xl_cpu{suffix}.json")
    args.matmul_gflops = None
    if args.device == "cpu" and any(parse_config(c)[2] == "bf16" for c in args.configs):
        args.matmul_gflops = matmul_rates(architecture(args.models[0], args.reduced, args.depth), args.batch)
        print(f"[xl_cpu] matrix products at the MLP's shape, 2 threads: fp32 {args.matmul_gflops['fp32']:.1f}, "
              f"bf16 {args.matmul_gflops['bf16']:.2f} GFLOP/s", file=sys.stderr, flush=True)
    args.deadline = time.time() + 60 * args.deadline_minutes if args.deadline_minutes > 0 else 0
    rows, t0 = [], time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for config in args.configs:  # every model's single-process run first, then FSDP (the brief's order)
            for model in args.models:
                if args.deadline and time.time() > args.deadline:
                    rows.append({"model": model, "config": config, "status": "not started: deadline passed"})
                    continue
                row = run_config(model, config, args, tmp)
                rows.append(row)
                print(f"[xl_cpu] {model} {config}: {row['status']}" + (
                    f", peak {row['peak'] / 2 ** 30:.2f} GiB/rank (predicted {row['predicted']['peak'] / 2 ** 30:.2f}),"
                    f" step {row['step_seconds'][0]:.0f} s" if "peak" in row else f" {row.get('reason', '')}"),
                    file=sys.stderr, flush=True)
                _write(args, rows, t0)
    _write(args, rows, t0)
    print(table(rows))
    return 0 if all(r["status"] in ("ok", "refused") or r["status"].startswith("not started") for r in rows) else 1


def _write(args, rows, t0) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"rows": rows, "reduced": args.reduced, "depth": args.depth, "device": args.device,
                   "matmul_gflops": args.matmul_gflops,
                   "device_name": torch.cuda.get_device_name(0) if args.device == "cuda" else platform.processor(), "seconds": time.time() - t0, "torch": torch.__version__,
                   "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                               "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
                               "shared": "timings measured under load from other jobs; see load_average_after"},
                   "cfg": {"scale": CFG_SCALE, "clip_norm": CFG_CLIP}, "process_bytes_assumed": PROCESS_BYTES,
                   "fsdp_grads_assumed": args.fsdp_grads, "commit": _commit(), "tracked_changes": _tracked_changes(),
                   "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}},
                  f, indent=1)
    os.replace(tmp, args.out)


def _commit() -> str | None:
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                              cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _tracked_changes() -> list[str] | None:
    """Tracked files that differ from the recorded commit (the run's code is the commit plus these)."""
    import subprocess

    try:
        r = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                           timeout=10, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    except (OSError, subprocess.SubprocessError):
        return None
    return [line[3:] for line in r.stdout.splitlines()] if r.returncode == 0 else None


if __name__ == "__main__":
    sys.exit(main())
