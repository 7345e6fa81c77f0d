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


class UnrecoverableResumeError(ValueError):
    """The newest valid checkpoint could not be read after it had partly overwritten the modules, and no
    older valid checkpoint exists to restore them from."""


def newest_file(ckpt_dir: str, verbose: bool = True, skip=()) -> str | None:
    """The newest valid single-file checkpoint not in `skip`; each newer one that is skipped for being
    invalid is reported with the reason."""
    for path in checkpoint.candidates(ckpt_dir):
        if path in skip:
            continue
        reason = checkpoint.why_invalid(path)
        if reason is None:
            return path
        if verbose:
            print(f"[decm] skipping checkpoint {path}: {reason}", file=sys.stderr, flush=True)
    return None


def newest(ckpt_dir: str, mode: str, verbose: bool = True, skip=()) -> tuple[str | None, str | None]:
    """(path, 'dcp' or 'pt') of the newest valid checkpoint of either kind, leaving out the paths in
    `skip`; at equal steps this mode's kind. With `verbose`, every newer checkpoint that is skipped for
    being invalid is reported on stderr with the reason."""
    dcp = sharded_checkpoint.latest_valid(ckpt_dir, verbose=verbose, skip=skip)
    pt = newest_file(ckpt_dir, verbose, skip)
    if dcp is None or pt is None:
        return (dcp, "dcp") if dcp else ((pt, "pt") if pt else (None, None))
    ds, ps = sharded_checkpoint.step_of(dcp), checkpoint.step_of(pt)
    if ds > ps or (ds == ps and mode == "fsdp"):
        return dcp, "dcp"
    return pt, "pt"


def _read_full(path: str, kind: str) -> dict:
    """The whole checkpoint in memory; a read failure is an UnreadableCheckpointError."""
    if kind == "dcp":
        return sharded_checkpoint.load_full(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise sharded_checkpoint.UnreadableCheckpointError(f"cannot read {path}: {type(e).__name__}: {e}") from None


def load(ckpt_dir: str, mode: str, model, ema, objective, opt, info: DistInfo, stage: str = "",
         phema=None) -> tuple[int, dict | None]:
    """Restores the newest readable valid checkpoint into the modules (and the post-hoc EMA profiles
    `phema`, which must be in it when given); returns (step, totals) or (0, None). Collective.

    Rank 0 alone chooses the checkpoint and every rank receives its choice (decm.one_reader), so ranks
    whose view of the folder differs (a failed read, a file system's cache) still resume from the same
    step. A chosen checkpoint that passes validation but cannot be read (e.g. damaged shard bytes) is
    reported and skipped on every rank alike, and the next older one is tried; nothing is deleted. When
    a sharded checkpoint failed after it had partly overwritten the modules and no older one exists,
    UnrecoverableResumeError is raised rather than training on from step 0 with mixed weights."""
    unreadable: list[str] = []
    partly_loaded = None
    while True:
        path, kind = read_once(lambda: newest(ckpt_dir, mode, verbose=True, skip=unreadable))  # rank 0 chooses
        if path is None:
            if partly_loaded is not None:
                raise UnrecoverableResumeError(
                    f"checkpoint {partly_loaded} could not be read after it had partly overwritten the model, "
                    f"and {ckpt_dir} holds no older valid checkpoint: move it aside and rerun to start over")
            return 0, None
        try:
            return _restore(path, kind, mode, model, ema, objective, opt, info, stage, phema)
        except _ReadFailed as e:
            if info.main:
                print(f"[decm] skipping checkpoint {path}: {e} (nothing deleted)", file=sys.stderr, flush=True)
            unreadable.append(path)
            if e.partly_loaded:
                partly_loaded = path


class _ReadFailed(Exception):
    """Every rank learnt that reading the chosen checkpoint failed (`partly_loaded`: after DCP had written
    into the modules in place)."""

    def __init__(self, message: str, partly_loaded: bool):
        super().__init__(message)
        self.partly_loaded = partly_loaded


def _restore(path, kind, mode, model, ema, objective, opt, info: DistInfo, stage: str, phema):
    """Loads the chosen checkpoint into the modules; raises _ReadFailed on every rank alike when reading it
    fails on any rank."""
    from torch.distributed.checkpoint.api import CheckpointException

    names = param_names(model, objective)
    if mode == "fsdp" and kind == "dcp":
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        state = sharded_state(0, model, ema, objective, opt, {"nan_masked_samples": 0, "skipped_steps": 0}, phema)
        # 1. every rank reads the metadata; all agree before DCP's first collective (a rank that cannot
        # read it would otherwise sit in the agreement while the others wait inside DCP)
        meta, error = None, None
        try:
            meta = sharded_checkpoint.metadata(path)
        except Exception as e:  # a missing or damaged .metadata on this rank's view of the folder
            error = e
        _agree_on_read(error, info, partly_loaded=False)
        if phema is not None:  # the same metadata on every rank: these errors are raised everywhere alike
            _check_phema_sections(meta, phema, f"checkpoint {path}")
        sharded_checkpoint.check_compatible(path, state, meta=meta)  # another model's: an error, not skipped
        # 2. the collective read into the modules, in place
        try:
            sharded_checkpoint.load_into(path, state, meta=meta)
        except CheckpointException as e:  # DCP's is a BaseException, gathered from every rank
            if e.args and e.args[0] != "read":  # planning failed: the run's state has other entries
                raise sharded_checkpoint.CheckpointMismatchError(
                    f"sharded checkpoint {path} does not fit this run's training state: "
                    f"{sharded_checkpoint.failure_causes(e)}") from None
            error = e
        except (sharded_checkpoint.UnreadableCheckpointError, OSError) as e:
            error = e
        _agree_on_read(error, info, partly_loaded=True)
        if phema is not None:
            phema.check_state(state["phema"], f"checkpoint {path}")
            phema.load(state["phema"], sharded=True)
        set_model_state_dict(model, state["model"])
        set_model_state_dict(ema, state["ema"])
        objective.load_state_dict(state.get("objective", {}))  # DCP drops empty sections
        set_optimizer_state_dict(_holder(model, objective), opt, state["optimizer"])
    else:
        # one reader: rank 0 reads, the other ranks receive the state by broadcast (decm.one_reader)
        try:  # read_once raises the reader's error on every rank alike
            state = read_once(lambda: _read_full(path, kind))
        except sharded_checkpoint.UnreadableCheckpointError as e:
            raise _ReadFailed(sharded_checkpoint.failure_causes(e), partly_loaded=False) from None
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


def _agree_on_read(error: BaseException | None, info: DistInfo, partly_loaded: bool) -> None:
    """Collective: raises _ReadFailed on every rank when reading failed on any rank (`error` is this
    rank's failure or None), so that no rank goes on to a collective the others never reach."""
    from decm.distributed import any_true

    if any_true(error is not None, info):
        raise _ReadFailed(sharded_checkpoint.failure_causes(error) if error is not None
                          else "unreadable on another rank", partly_loaded=partly_loaded)


def _check_phema_sections(meta, phema, where: str) -> None:
    """A ValueError when the checkpoint holds no post-hoc EMA profiles or another number of them than the
    run tracks (DCP would fail planning the load); equal numbers are checked by value after the load."""
    saved = meta.state_dict_metadata.get("phema.sigma_rels")
    if saved is None:
        phema.check_state(None, where)
    n = int(saved.size[0]) if getattr(saved, "size", None) is not None and len(saved.size) else 0
    if n != len(phema.sigma_rels):
        raise ValueError(f"{where} tracks {n} post-hoc EMA profiles, this run train.phema_sigma_rels = "
                         f"{list(phema.sigma_rels)} ({len(phema.sigma_rels)}): use the same values or a new run directory")


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
