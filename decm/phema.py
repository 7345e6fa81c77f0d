"""Post-hoc EMA (EDM2): power-function EMA profiles tracked during training, snapshots every K steps,
and a least-squares reconstruction of any other EMA length after training.

    python -m decm.phema --run-dir RUN_DIR --sigma-rel 0.2 [--step S] [--out DIR]

The arithmetic follows NVlabs/edm2 (`training/phema.py`, `reconstruct_phema.py`; Karras et al. 2024,
"Analyzing and Improving the Training Dynamics of Diffusion Models", Eqs. 121–127, 151, Algorithms 2–3):

- A power-function EMA of exponent γ averages the training trajectory θ(τ), τ ∈ [0, t], with weight
  ∝ τ^γ. Its relative standard deviation σ_rel = sqrt((γ+1) / ((γ+2)² (γ+3))) (`gamma_to_sigma_rel`);
  the inverse is the largest real root of γ³ + 7γ² + (16 − σ_rel⁻²)γ + (12 − σ_rel⁻²) (`sigma_rel_to_gamma`).
  σ_rel < 0.2887 (γ > 0).
- Tracked during training with θ̂ ← β θ̂ + (1 − β) θ, β = (1 − Δt/t)^(γ+1), t the training time *after*
  the update (`beta`). Time here is counted in optimizer steps (EDM2 counts images: with a constant
  batch the ratio Δt/t is the same); the first update has β = 0 (a copy of the weights). The profiles
  are updated after every step, skipped (non-finite) steps included, so that a profile's time is the
  step count the reconstruction uses.
- Snapshots of every profile are written every K steps (and at the last step). A profile of another
  (t_r, σ_r) is the combination Σ_i c_i θ̂_i of the snapshots with t_i ≤ t_r that is closest, in L2 over
  the training time axis, to the wanted weight function: A c = b with A_ij = ⟨p_i, p_j⟩ and
  b_i = ⟨p_i, p_r⟩ (`profile_inner`, the closed form of Eq. 151), then c / Σ c (`solve_coefficients`).
  Non-parameter entries (buffers) come from the newest snapshot used, as in EDM2. Unlike EDM2 (which
  stores float16 snapshots and accumulates in float32) snapshots keep the training dtype and the
  combination is accumulated in float64 then cast back; the coefficients can be large with alternating
  signs, where the extra precision matters.

Storage: `<run_dir>/checkpoints/phema/` beside the training checkpoints. Single-process and DDP runs
write `ckpt-<step>.pt` + `.ok` sentinel (decm.checkpoint, atomic: temp file, fsync, rename); FSDP runs
write `ckpt-<step>.dcp/` + `.ok` with every rank's shards of every profile (decm.sharded_checkpoint,
the profiles are sharded like the EMA). Either kind reconstructs without a process group. The profiles'
running state is part of every training checkpoint (section `phema`), so a killed run resumes them
exactly. `python -m decm.phema` writes the reconstruction as a standard checkpoint
(`<out>/ckpt-<step>.pt` with `model` and `ema` both the reconstructed weights, default out
`<run_dir>/posthoc/sigma_rel-<σ>`), evaluated with `python -m decm.evaluate RUN_DIR --checkpoint <out>`.

Why not `ema-pytorch` (lucidrains, `PostHocEMA`; 0.8.3 installs from the local wheels): its snapshots are
plain `torch.save` calls into its own folder (a kill mid-write leaves a truncated file that the
reconstruction then reads), named by profile index only (every rank of a sharded run would write the same
file, and it has no sharded/DTensor save at all), its running profiles are not part of a resumable training
state, and its arithmetic differs from EDM2's: the reconstruction does not renormalise the coefficients to
sum to one, does not drop snapshots newer than the target time, and buffers are averaged rather than taken
from the newest snapshot. The EDM2 arithmetic is a page of float64 numpy; storage reuses the platform's
own atomic single-file and sharded checkpoints.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

import numpy as np
import torch
from torch import nn

SIGMA_REL_MAX = float(np.sqrt(1 / 12))  # σ_rel of γ → 0 (a uniform average); profiles need σ_rel below it
SNAPSHOT_DIR = "phema"                   # under <run_dir>/checkpoints


# ---------------------------------------------------------------------------------------------------
# The arithmetic (EDM2 training/phema.py), float64 numpy.

def gamma_to_sigma_rel(gamma):
    """σ_rel of the power-function profile of exponent γ: sqrt((γ+1) / (γ+2)² / (γ+3))."""
    gamma = np.float64(gamma)
    return np.sqrt((gamma + 1) / (gamma + 2) ** 2 / (gamma + 3))


def sigma_rel_to_gamma(sigma_rel):
    """Exponent γ of the profile with relative standard deviation σ_rel (largest real root of the cubic)."""
    sigma_rel = np.float64(sigma_rel)
    inv = sigma_rel.flatten() ** -2
    gamma = [np.roots([1, 7, 16 - s, 12 - s]).real.max() for s in inv]
    return np.float64(gamma).reshape(sigma_rel.shape)


def beta(sigma_rel: float, t_next: float, t_delta: float = 1.0) -> float:
    """EMA decay of the update that brings the profile to time t_next: (1 − t_delta/t_next)^(γ+1)."""
    return float((1 - t_delta / t_next) ** (sigma_rel_to_gamma(sigma_rel) + 1))


def profile_inner(a_t, a_sigma, b_t, b_sigma):
    """⟨p_a, p_b⟩ of two normalised power-function weight functions ending at a_t and b_t (closed form)."""
    a_gamma = sigma_rel_to_gamma(a_sigma)
    b_gamma = sigma_rel_to_gamma(b_sigma)
    ratio = a_t / b_t
    exponent = np.where(a_t < b_t, b_gamma, -a_gamma)
    t_max = np.maximum(a_t, b_t)
    return (a_gamma + 1) * (b_gamma + 1) * ratio ** exponent / ((a_gamma + b_gamma + 1) * t_max)


def solve_coefficients(in_t, in_sigma, out_t, out_sigma) -> np.ndarray:
    """[inputs, outputs] weights of the snapshots (t_i, σ_i) that best reconstruct each (t_r, σ_r)."""
    in_t, in_sigma = np.broadcast_arrays(in_t, in_sigma)
    out_t, out_sigma = np.broadcast_arrays(out_t, out_sigma)
    row = lambda x: np.float64(x).reshape(-1, 1)  # noqa: E731
    col = lambda x: np.float64(x).reshape(1, -1)  # noqa: E731
    a = profile_inner(row(in_t), row(in_sigma), col(in_t), col(in_sigma))
    b = profile_inner(row(in_t), row(in_sigma), col(out_t), col(out_sigma))
    x = np.linalg.solve(a, b)
    return x / np.sum(x, axis=0)


def check_sigma_rels(sigma_rels) -> tuple[float, ...]:
    """The tracked σ_rel values as floats; a ValueError naming the binding when one is out of range."""
    values = tuple(float(s) for s in sigma_rels)
    bad = [s for s in values if not 0 < s < SIGMA_REL_MAX]
    if bad:
        raise ValueError(f"train.phema_sigma_rels: every σ_rel must be in (0, {SIGMA_REL_MAX:.4f}), got {bad}")
    if len(set(values)) != len(values):
        raise ValueError(f"train.phema_sigma_rels: values must differ, got {list(values)}")
    return values


# ---------------------------------------------------------------------------------------------------
# Tracking during training.

class PowerFunctionEMA:
    """Power-function EMA profiles of a model, one copy per σ_rel, updated after every step.

    Args:
      model: the trained module (plain; call `shard` after the model is sharded under FSDP).
      sigma_rels: relative standard deviations of the tracked profiles (EDM2: 0.05 and 0.10; FACM: 0.05
        and 0.2).
    """

    def __init__(self, model: nn.Module, sigma_rels):
        self.sigma_rels = check_sigma_rels(sigma_rels)
        self.profiles = [copy.deepcopy(model).eval().requires_grad_(False) for _ in self.sigma_rels]
        self.param_names = [n for n, _ in model.named_parameters()]

    def shard(self, world_size: int, device, precision: str) -> None:
        """FSDP: shards every profile like the EMA (decm.parallel.shard), so its update is per shard."""
        from decm import parallel

        for m in self.profiles:
            parallel.shard(m, world_size, device, precision)

    @torch.no_grad()
    def update(self, model: nn.Module, step_done: int) -> None:
        """Brings every profile to time `step_done` (the number of optimizer steps taken, ≥ 1)."""
        for sigma, profile in zip(self.sigma_rels, self.profiles):
            b = beta(sigma, step_done, 1.0)
            for p_ema, p in zip(profile.parameters(), model.parameters()):
                p_ema.lerp_(p.detach(), 1 - b)
            for b_ema, b_model in zip(profile.buffers(), model.buffers()):
                b_ema.copy_(b_model)

    def sigma_tensor(self) -> torch.Tensor:
        return torch.tensor(self.sigma_rels, dtype=torch.float64)

    def state(self, sharded: bool) -> dict:
        """{'sigma_rels': tensor, 'profile_<i>': state dict} (sharded: this rank's DTensors)."""
        if sharded:
            from torch.distributed.checkpoint.state_dict import get_model_state_dict

            out = {f"profile_{i}": get_model_state_dict(m) for i, m in enumerate(self.profiles)}
        else:
            out = {f"profile_{i}": m.state_dict() for i, m in enumerate(self.profiles)}
        out["sigma_rels"] = self.sigma_tensor()
        return out

    def check_state(self, state: dict, where: str) -> None:
        """A ValueError when a saved section tracks other σ_rel values than this run."""
        if state is None or "sigma_rels" not in state:
            raise ValueError(f"{where} has no post-hoc EMA profiles (written with train.phema_sigma_rels = ()); "
                             "they cannot be resumed — use a new run directory or unset train.phema_sigma_rels")
        saved = tuple(float(s) for s in torch.as_tensor(state["sigma_rels"]).tolist())
        if len(saved) != len(self.sigma_rels) or not np.allclose(saved, self.sigma_rels, rtol=0, atol=1e-12):
            raise ValueError(f"{where} tracks post-hoc EMA σ_rel {list(saved)}, this run "
                             f"train.phema_sigma_rels = {list(self.sigma_rels)}")

    def load(self, state: dict, full: bool = False, sharded: bool = False) -> None:
        """Restores the profiles (full: full tensors into sharded modules; sharded: DTensor state)."""
        for i, m in enumerate(self.profiles):
            if full or sharded:
                from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

                set_model_state_dict(m, state[f"profile_{i}"], options=StateDictOptions(full_state_dict=full))
            else:
                m.load_state_dict(state[f"profile_{i}"])

    def snapshot(self, ckpt_dir: str, step: int, sharded: bool, main: bool) -> None:
        """Writes every profile at `step` atomically to `<ckpt_dir>/phema/` (collective under FSDP;
        otherwise call it on rank 0 only)."""
        from decm import checkpoint, sharded_checkpoint

        directory = os.path.join(ckpt_dir, SNAPSHOT_DIR)
        state = {"step": int(step), **self.state(sharded)}
        state["param_names"] = list(self.param_names)
        if sharded:
            sharded_checkpoint.save(directory, step, state, main, keep_last=0)
        else:
            checkpoint.save(directory, step, state, keep_last=0)


# ---------------------------------------------------------------------------------------------------
# Reconstruction after training.

def list_snapshots(ckpt_dir: str) -> list[tuple[int, str, str]]:
    """(step, path, 'pt' or 'dcp') of every valid snapshot under `<ckpt_dir>/phema`, by step (a step
    written in both kinds counts once, the single file)."""
    from decm import checkpoint, sharded_checkpoint

    directory = os.path.join(ckpt_dir, SNAPSHOT_DIR)
    found = {}
    for p in sharded_checkpoint.candidates(directory):
        if sharded_checkpoint.is_valid(p):
            found[sharded_checkpoint.step_of(p)] = (p, "dcp")
    for p in checkpoint.candidates(directory):
        if checkpoint.is_valid(p, load=False):
            found[checkpoint.step_of(p)] = (p, "pt")
    return [(s, *found[s]) for s in sorted(found)]


def read_snapshot(path: str, kind: str) -> dict:
    from decm import sharded_checkpoint

    if kind == "dcp":
        return sharded_checkpoint.load_full(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def reconstruct(ckpt_dir: str, sigma_rel: float, step: int | None = None,
                inputs: tuple | None = None) -> tuple[dict, dict]:
    """(state dict of the profile σ_rel at `step`, info) from the snapshots in `<ckpt_dir>/phema`.

    `step` must be a snapshot step (default: the newest); snapshots after it are not used. `inputs`
    restricts the tracked profiles used (EDM2's `--instd`; default all). Reads one snapshot at a time
    (memory: two copies of the weights plus the float64 sum)."""
    if not 0 < sigma_rel < SIGMA_REL_MAX:
        raise ValueError(f"--sigma-rel must be in (0, {SIGMA_REL_MAX:.4f}), got {sigma_rel}")
    snaps = list_snapshots(ckpt_dir)
    if not snaps:
        raise FileNotFoundError(f"no post-hoc EMA snapshots in {os.path.join(ckpt_dir, SNAPSHOT_DIR)} "
                                "(train with train.phema_sigma_rels and train.phema_every_steps set)")
    steps = [s for s, _, _ in snaps]
    step = steps[-1] if step is None else int(step)
    if step not in steps:
        raise ValueError(f"--step {step} is not a snapshot step; snapshots: {steps[:3]}…{steps[-3:]}")
    snaps = [e for e in snaps if 0 < e[0] <= step]
    first = read_snapshot(snaps[0][1], snaps[0][2])
    sigmas = [float(s) for s in torch.as_tensor(first["sigma_rels"]).tolist()]
    used = list(range(len(sigmas)))
    if inputs is not None:
        used = [j for j, s in enumerate(sigmas) if any(abs(s - float(v)) < 1e-9 for v in inputs)]
        if len(used) != len(set(float(v) for v in inputs)):
            raise ValueError(f"inputs {list(inputs)} are not all tracked profiles; tracked: {sigmas}")
    in_t = np.repeat([float(s) for s, _, _ in snaps], len(used))
    in_sigma = np.tile([sigmas[j] for j in used], len(snaps))
    coefs = solve_coefficients(in_t, in_sigma, float(step), float(sigma_rel))[:, 0]
    total, out, param_names = None, None, None
    for k, (s, path, kind) in enumerate(snaps):
        state = first if k == 0 else read_snapshot(path, kind)
        saved = [float(v) for v in torch.as_tensor(state["sigma_rels"]).tolist()]
        if saved != sigmas:
            raise ValueError(f"snapshot {path} tracks σ_rel {saved}, the first one {sigmas}")
        param_names = set(state["param_names"])
        if total is None:
            total = {n: torch.zeros_like(state["profile_0"][n], dtype=torch.float64) for n in param_names}
        for u, j in enumerate(used):
            c = float(coefs[k * len(used) + u])
            for n in param_names:
                total[n] += state[f"profile_{j}"][n].double() * c
        out = state["profile_0"]  # the newest snapshot's buffers (and dtypes), as EDM2
        del state
    result = {n: (total[n].to(v.dtype) if n in param_names else v.clone()) for n, v in out.items()}
    info = {"sigma_rel": float(sigma_rel), "step": step, "tracked_sigma_rels": [sigmas[j] for j in used],
            "snapshot_steps": [s for s, _, _ in snaps], "coefficients": [float(c) for c in coefs]}
    return result, info


def write_reconstruction(run_dir: str, sigma_rel: float, step: int | None = None, out: str | None = None) -> str:
    """Reconstructs σ_rel and writes it as a standard checkpoint `<out>/ckpt-<step>.pt` (atomic);
    returns its path."""
    from decm import checkpoint

    ckpt_dir = os.path.join(run_dir, "checkpoints")
    weights, info = reconstruct(ckpt_dir, sigma_rel, step)
    out = out or os.path.join(run_dir, "posthoc", f"sigma_rel-{sigma_rel:.3f}")
    state = {"step": info["step"], "model": weights, "ema": weights,
             "phema": {"sigma_rel": info["sigma_rel"], "tracked_sigma_rels": info["tracked_sigma_rels"],
                       "snapshot_steps": info["snapshot_steps"], "coefficients": info["coefficients"]}}
    return checkpoint.save(out, info["step"], state)


def build_parser() -> argparse.ArgumentParser:
    from decm import cli

    p = cli.parser("python -m decm.phema", __doc__)
    p.add_argument("--run-dir", required=True, help="a run trained with train.phema_sigma_rels (holds checkpoints/phema/)")
    p.add_argument("--sigma-rel", type=float, nargs="+", required=True,
                   help="σ_rel to reconstruct (one or more, each in (0, 0.2887))")
    p.add_argument("--step", type=int, default=None, help="training step to reconstruct (a snapshot step; default: newest)")
    p.add_argument("--out", default=None,
                   help="output directory (one σ_rel only; default RUN_DIR/posthoc/sigma_rel-<σ>)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from decm.job import USER_ERRORS, cli_error

    try:
        if args.out and len(args.sigma_rel) > 1:
            raise ValueError("--out takes one --sigma-rel (several write to RUN_DIR/posthoc/sigma_rel-<σ>)")
        if not os.path.isdir(os.path.join(args.run_dir, "checkpoints")):
            raise FileNotFoundError(f"{args.run_dir} is not a run directory (no checkpoints/)")
        for sigma in args.sigma_rel:
            path = write_reconstruction(args.run_dir, sigma, args.step, args.out)
            print(f"σ_rel {sigma:.3f} → {path}")
    except USER_ERRORS as e:
        return cli_error("decm.phema", e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
