"""Saving and resuming the training state (model, EMA, objective, optimizer, step, totals) in every
parallel mode, so that the loop has one `save` and one `load` call.

'none' / 'ddp': rank 0 writes one file (decm.checkpoint). 'fsdp': every rank writes its shards
(decm.sharded_checkpoint). Either mode resumes from either kind: the newest valid checkpoint wins
(at equal steps a run prefers its own kind). Optimizer state travels in torch's own layout
(parameter indices) in single files and under parameter names in sharded ones; the order of the
names is fixed by `param_groups` (the model's parameters, then the objective's learnable ones), so
the two convert into each other exactly.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from decm import checkpoint, sharded_checkpoint
from decm.distributed import DistInfo, barrier
from decm.one_reader import read_once


def param_groups(model: nn.Module, objective: nn.Module) -> list[dict]:
    """The optimizer's groups in every mode: the model's parameters, then (when any) the objective's
    learnable ones — separate so that sharded and plain tensors never meet in one foreach kernel."""
    groups = [{"params": list(model.parameters())}]
    extra = [p for p in objective.parameters() if p.requires_grad]
    if extra:
        groups.append({"params": extra})
    return groups


def param_names(model: nn.Module, objective: nn.Module) -> list[str]:
    """Names of the optimizer's parameters in `param_groups` order (as DCP names them)."""
    return [f"model.{n}" for n, _ in model.named_parameters()] + [
        f"objective.{n}" for n, p in objective.named_parameters() if p.requires_grad]


def _holder(model, objective) -> nn.Module:
    return nn.ModuleDict({"model": model, "objective": objective})


def named_to_indexed(state: dict, names: list[str]) -> dict:
    """Optimizer state keyed by parameter name (DCP) → torch's layout keyed by index."""
    index = {n: i for i, n in enumerate(names)}
    unknown = sorted(set(state["state"]) - set(index))
    if unknown:
        raise sharded_checkpoint.CheckpointMismatchError(
            f"optimizer state for parameters this run does not have: {unknown[:3]}")
    groups = [dict(g, params=[index[n] for n in g["params"]]) for g in state["param_groups"]]
    return {"state": {index[k]: v for k, v in state["state"].items()}, "param_groups": groups}


def indexed_to_named(state: dict, names: list[str]) -> dict:
    """torch's optimizer layout → keyed by parameter name."""
    groups = [dict(g, params=[names[i] for i in g["params"]]) for g in state["param_groups"]]
    return {"state": {names[int(k)]: v for k, v in state["state"].items()}, "param_groups": groups}


def _is_named(opt_state: dict) -> bool:
    return any(isinstance(k, str) for k in opt_state.get("state", {})) or any(
        isinstance(p, str) for g in opt_state.get("param_groups", []) for p in g["params"])


def full_state(step, model, ema, objective, opt, totals, phema=None) -> dict:
    """The single-file checkpoint dict (plain modules); `phema`: post-hoc EMA profiles (decm.phema)."""
    out = {"step": step, "model": model.state_dict(), "ema": ema.state_dict(), "objective": objective.state_dict(),
           "optimizer": opt.state_dict(), "totals": dict(totals)}
    if phema is not None:
        out["phema"] = phema.state(sharded=False)
    return out


def sharded_state(step, model, ema, objective, opt, totals, phema=None) -> dict:
    """The DCP state dict (sharded modules): DTensors of this rank, optimizer state by parameter name."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    out = {"step": step, "totals": dict(totals), "model": get_model_state_dict(model),
           "ema": get_model_state_dict(ema), "objective": objective.state_dict(),
           "optimizer": get_optimizer_state_dict(_holder(model, objective), opt)}
    if phema is not None:
        out["phema"] = phema.state(sharded=True)
    return out


def save(ckpt_dir: str, step: int, mode: str, model, ema, objective, opt, totals, info: DistInfo, keep_last: int,
         phema=None):
    """Writes a checkpoint of `step` (collective: every rank calls it)."""
    if mode == "fsdp":
        sharded_checkpoint.save(ckpt_dir, step, sharded_state(step, model, ema, objective, opt, totals, phema),
                                info.main, keep_last)
        return
    if info.main:
        checkpoint.save(ckpt_dir, step, full_state(step, model, ema, objective, opt, totals, phema),
                        keep_last=keep_last)
    barrier(info)


def newest_file(ckpt_dir: str, verbose: bool = True) -> str | None:
    """The newest valid single-file checkpoint; each newer one that is skipped is reported with the reason."""
    for path in checkpoint.candidates(ckpt_dir):
        reason = checkpoint.why_invalid(path)
        if reason is None:
            return path
        if verbose:
            print(f"[decm] skipping checkpoint {path}: {reason}", file=sys.stderr, flush=True)
    return None


def newest(ckpt_dir: str, mode: str, verbose: bool = True) -> tuple[str | None, str | None]:
    """(path, 'dcp' or 'pt') of the newest valid checkpoint of either kind; at equal steps this mode's kind.
    With `verbose`, every newer checkpoint that is skipped is reported on stderr with the reason."""
    dcp = sharded_checkpoint.latest_valid(ckpt_dir, verbose=verbose)
    pt = newest_file(ckpt_dir, verbose)
    if dcp is None or pt is None:
        return (dcp, "dcp") if dcp else ((pt, "pt") if pt else (None, None))
    ds, ps = sharded_checkpoint.step_of(dcp), checkpoint.step_of(pt)
    if ds > ps or (ds == ps and mode == "fsdp"):
        return dcp, "dcp"
    return pt, "pt"


def _has_phema(path: str) -> bool:
    """Whether a sharded checkpoint holds post-hoc EMA profiles (DCP cannot load a section it lacks)."""
    return any(k.startswith("phema.") for k in sharded_checkpoint.metadata(path).state_dict_metadata)


def load(ckpt_dir: str, mode: str, model, ema, objective, opt, info: DistInfo, stage: str = "",
         phema=None) -> tuple[int, dict | None]:
    """Restores the newest valid checkpoint into the modules (and the post-hoc EMA profiles `phema`, which
    must be in it when given); returns (step, totals) or (0, None)."""
    path, kind = newest(ckpt_dir, mode, verbose=info.main)
    if path is None:
        return 0, None
    names = param_names(model, objective)
    if mode == "fsdp" and kind == "dcp":
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        if phema is not None and not _has_phema(path):
            phema.check_state(None, f"checkpoint {path}")
        state = sharded_state(0, model, ema, objective, opt, {"nan_masked_samples": 0, "skipped_steps": 0}, phema)
        sharded_checkpoint.load_into(path, state)
        if phema is not None:
            phema.check_state(state["phema"], f"checkpoint {path}")
            phema.load(state["phema"], sharded=True)
        set_model_state_dict(model, state["model"])
        set_model_state_dict(ema, state["ema"])
        objective.load_state_dict(state.get("objective", {}))  # DCP drops empty sections
        set_optimizer_state_dict(_holder(model, objective), opt, state["optimizer"])
    else:
        # one reader: rank 0 reads, the other ranks receive the state by broadcast (decm.one_reader)
        state = read_once(lambda: sharded_checkpoint.load_full(path) if kind == "dcp"
                          else torch.load(path, map_location="cpu", weights_only=True))
        opt_state = state["optimizer"]
        if phema is not None:
            phema.check_state(state.get("phema"), f"checkpoint {path}")
            phema.load(state["phema"], full=mode == "fsdp")
        if mode == "fsdp":  # a single-file checkpoint (DDP run or export) into sharded modules
            from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                                 set_optimizer_state_dict)

            full = StateDictOptions(full_state_dict=True)
            set_model_state_dict(model, state["model"], options=full)
            set_model_state_dict(ema, state["ema"], options=full)
            objective.load_state_dict(state.get("objective", {}))  # DCP drops empty sections
            named = opt_state if _is_named(opt_state) else indexed_to_named(opt_state, names)
            set_optimizer_state_dict(_holder(model, objective), opt, named, options=full)
        else:
            model.load_state_dict(state["model"])
            ema.load_state_dict(state["ema"])
            objective.load_state_dict(state.get("objective", {}))  # DCP drops empty sections
            opt.load_state_dict(named_to_indexed(opt_state, names) if _is_named(opt_state) else opt_state)
    if info.main:
        print(f"[decm] resuming {stage + ' ' if stage else ''}from {path} at step {int(state['step'])}", file=sys.stderr)
    return int(state["step"]), dict(state["totals"])


def export(ckpt_dir: str, path: str | None = None) -> str:
    """Writes the newest valid (or the given) sharded checkpoint as a consolidated single file
    `ckpt-<step>.pt` beside it, in the layout every reader of decm.checkpoint expects (the optimizer
    state converted to torch's index layout). Needs no process group."""
    path = path or sharded_checkpoint.latest_valid(ckpt_dir)
    if path is None:
        raise FileNotFoundError(f"no valid sharded checkpoint in {ckpt_dir!r}")
    state = sharded_checkpoint.load_full(path)
    names = [n for g in state["optimizer"]["param_groups"] for n in g["params"]]  # the optimizer's own order
    state["optimizer"] = named_to_indexed(state["optimizer"], names)
    state.setdefault("objective", {})  # DCP drops empty sections; single files always have one
    step = int(state["step"])
    return checkpoint.save(ckpt_dir, step, state)
