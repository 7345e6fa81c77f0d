"""Sharded checkpoints (torch.distributed.checkpoint), atomic like decm.checkpoint's single files.

Layout: `<dir>/ckpt-00001000.dcp/` (one `__<rank>_0.distcp` file per rank and `.metadata`) and the
sentinel `<dir>/ckpt-00001000.dcp.ok` holding the file count and total bytes. Every rank writes into
`ckpt-00001000.dcp.tmp/`; after a barrier rank 0 renames the folder and writes the sentinel. A crash
at any point leaves either a `.tmp` folder or a folder without (or with a mismatching) sentinel, and
both are skipped: the newest *valid* checkpoint is the one resumed from, and nothing is deleted.

Writing a step that already has a valid checkpoint (a preemption save right after a periodic save of
the same step) never leaves that step without one: the old folder is first renamed, with a copy of
its sentinel, to `ckpt-00001000.dcp.prev` (a valid checkpoint of the same step, taken only when the
plain one is not valid), the new folder and sentinel go into place, and only then is `.prev` removed.

DCP stores each tensor with its global shape, so a checkpoint written by 4 ranks loads into 2 (or 1:
`load_full`, which needs no process group, reads into memory without writing anything, and is what
evaluation, reports and DDP runs use; `python -m decm.export` writes it as a consolidated single-file
checkpoint).
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import sys

import torch
import torch.distributed as dist

_NAME = re.compile(r"ckpt-(\d{8})\.dcp(\.prev)?$")
PREV = ".prev"  # suffix of the previous checkpoint of a step, kept valid while that step is rewritten


class CheckpointMismatchError(ValueError):
    """A sharded checkpoint does not fit the model/optimizer of the run reading it."""


class UnreadableCheckpointError(RuntimeError):
    """A sharded checkpoint whose files pass the sentinel check but cannot be read (e.g. corrupt shards)."""


def path_for(directory: str, step: int) -> str:
    return os.path.join(directory, f"ckpt-{step:08d}.dcp")


def _sentinel(path: str) -> str:
    return path + ".ok"


def _listing(path: str) -> tuple[int, int]:
    files = [os.path.join(path, f) for f in os.listdir(path)]
    return len(files), sum(os.path.getsize(f) for f in files)


def _barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _write_sentinel(path: str) -> None:
    n, size = _listing(path)
    with open(_sentinel(path) + ".tmp", "w") as f:
        f.write(f"{n} {size}\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(_sentinel(path) + ".tmp", _sentinel(path))


def _remove(path: str) -> None:
    """Removes a checkpoint folder, its sentinel first (so that it is never valid while half deleted)."""
    if os.path.exists(_sentinel(path)):
        os.remove(_sentinel(path))
    shutil.rmtree(path, ignore_errors=True)


def _publish(tmp: str, path: str) -> None:
    """Moves the complete folder `tmp` to `path` so that a valid checkpoint of the step exists at every instant."""
    prev = path + PREV
    if is_valid(path):  # the step is being rewritten: keep the old one valid (as `.prev`) until the new one is
        _remove(prev)  # a leftover of an earlier rewrite; `path` is valid meanwhile
        with open(_sentinel(path)) as src, open(_sentinel(prev) + ".tmp", "w") as dst:
            dst.write(src.read())
            dst.flush()
            os.fsync(dst.fileno())
        os.replace(_sentinel(prev) + ".tmp", _sentinel(prev))
        os.replace(path, prev)  # atomic: from here `.prev` is the valid checkpoint of this step
        os.remove(_sentinel(path))
    elif os.path.exists(path) or os.path.exists(_sentinel(path)):
        _remove(path)  # an invalid folder of this step (a crash before its sentinel): being replaced
    os.replace(tmp, path)
    _write_sentinel(path)
    _remove(prev)


def save(directory: str, step: int, state: dict, main: bool, keep_last: int = 0) -> str:
    """Collective: every rank calls it with its (sharded) state; returns the checkpoint folder."""
    import torch.distributed.checkpoint as dcp

    path = path_for(directory, step)
    tmp = path + ".tmp"
    if main:
        os.makedirs(directory, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # a crashed earlier attempt's partial folder
    _barrier()
    dcp.save(state, checkpoint_id=tmp)
    _barrier()
    if main:
        for name in os.listdir(tmp):  # the data must be on disk before the sentinel says so
            with open(os.path.join(tmp, name), "rb") as f:
                os.fsync(f.fileno())
        _publish(tmp, path)
        if keep_last > 0:  # never counting newer steps (e.g. an unreadable one a resume skipped) against this one
            for old in [p for p in candidates(directory) if step_of(p) <= step and is_valid(p)][keep_last:]:
                _remove(old)
        _clear_leftovers(directory, step)
    _barrier()
    return path


def _clear_leftovers(directory: str, step: int) -> None:
    """Removes what a crashed save of an older step left that is never a checkpoint: its partial
    `ckpt-<s>.dcp.tmp` folder and sentinel files whose folder is gone. Folders without a valid sentinel
    are left in place (reported on resume, never deleted: they may be what someone wants to inspect)."""
    for leftover in glob.glob(os.path.join(directory, "ckpt-*.dcp.tmp")):
        match = _NAME.search(leftover[:-len(".tmp")])
        if match and int(match.group(1)) < step and os.path.isdir(leftover):
            shutil.rmtree(leftover, ignore_errors=True)
    for sentinel in glob.glob(os.path.join(directory, "ckpt-*.dcp*.ok")):
        folder = sentinel[:-len(".ok")]
        match = _NAME.search(folder)
        if match and int(match.group(1)) < step and not os.path.isdir(folder):
            os.remove(sentinel)


def candidates(directory: str) -> list[str]:
    """Sharded checkpoint folders in `directory`, newest step first (at one step the plain folder before
    its `.prev`)."""
    paths = [p for p in glob.glob(os.path.join(directory, "ckpt-*.dcp*")) if _NAME.search(p) and os.path.isdir(p)]
    return sorted(paths, key=lambda p: (step_of(p), not p.endswith(PREV)), reverse=True)


def step_of(path: str) -> int:
    return int(_NAME.search(path).group(1))


def is_valid(path: str) -> bool:
    """Sentinel present, file count and bytes as recorded, and DCP metadata readable."""
    try:
        with open(_sentinel(path)) as f:
            n, size = (int(v) for v in f.read().split())
        if _listing(path) != (n, size):
            return False
        metadata(path)
        return True
    except Exception:
        return False


def metadata(path: str):
    from torch.distributed.checkpoint import FileSystemReader

    return FileSystemReader(path).read_metadata()


def valid_at(directory: str, step: int) -> str | None:
    """The valid sharded checkpoint of `step`: its folder, or the `.prev` kept while the step was being
    rewritten; None when neither is valid."""
    path = path_for(directory, step)
    return next((p for p in (path, path + PREV) if is_valid(p)), None)


def latest_valid(directory: str, verbose: bool = True, skip=()) -> str | None:
    """The newest valid sharded checkpoint folder not in `skip` (invalid ones are reported, never deleted)."""
    for path in candidates(directory):
        if path in skip:
            continue
        if is_valid(path):
            return path
        if verbose:
            print(f"[decm] skipping invalid sharded checkpoint {path} (missing sentinel, or files differ)",
                  file=sys.stderr)
    return None


def _flat_shapes(state: dict, prefix: str = "") -> dict:
    """{'model.blocks.0.w': shape, …} of the tensors in a nested state dict (DCP's flattened names)."""
    out = {}
    for k, v in state.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat_shapes(v, name + "."))
        elif isinstance(v, torch.Tensor):
            out[name] = tuple(v.shape)
    return out


def check_compatible(path: str, state: dict, sections=("model", "ema"), meta=None) -> None:
    """Raises CheckpointMismatchError naming the first differences between the checkpoint's tensors and
    `state`'s (in the given top-level sections: the networks). `meta`: the checkpoint's metadata when
    already read (it is not read again)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    meta = meta if meta is not None else metadata(path)
    saved = {k: tuple(v.size) for k, v in meta.state_dict_metadata.items()
             if isinstance(v, TensorStorageMetadata) and k.split(".", 1)[0] in sections}
    wanted = {k: v for k, v in _flat_shapes({s: state[s] for s in sections if s in state}).items()}
    missing = sorted(set(wanted) - set(saved))
    unexpected = sorted(set(saved) - set(wanted))
    shapes = [f"{k}: {list(saved[k])} in the checkpoint, {list(wanted[k])} here"
              for k in sorted(set(saved) & set(wanted)) if saved[k] != wanted[k]]
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            parts.append(f"shape {shapes[0]}" + (f" (+{len(shapes) - 1} more)" if len(shapes) > 1 else ""))
        if missing:
            parts.append(f"missing {missing[:3]}" + (f" (+{len(missing) - 3} more)" if len(missing) > 3 else ""))
        if unexpected:
            parts.append(f"unexpected {unexpected[:3]}" + (f" (+{len(unexpected) - 3} more)" if len(unexpected) > 3 else ""))
        raise CheckpointMismatchError(f"sharded checkpoint {path} does not fit this run's model: {'; '.join(parts)} — "
                                      "a different backbone, preset or data shape wrote it")


def load_into(path: str, state: dict, meta=None) -> None:
    """Collective: loads the checkpoint into `state` in place (DTensors are resharded to this run's world).
    `meta`: its metadata when already read."""
    import torch.distributed.checkpoint as dcp

    check_compatible(path, state, meta=meta)
    dcp.load(state, checkpoint_id=path)


def failure_causes(error: BaseException) -> str:
    """One line per failing rank of a DCP CheckpointException ('rank 1: UnpicklingError: ...'), or the
    error's own first line."""
    failures = getattr(error, "failures", None)
    if not failures:
        lines = str(error).strip().splitlines()
        return f"{type(error).__name__}: {lines[0] if lines else 'failed'}"
    parts = []
    for rank, wrapped in failures.items():
        exc = wrapped[0] if isinstance(wrapped, tuple) else wrapped
        lines = str(exc).strip().splitlines()
        parts.append(f"rank {rank}: {type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": "))
    return "; ".join(parts)


def load_full(path: str) -> dict:
    """The whole checkpoint as one nested dict of full tensors, read into memory (no process group
    needed, nothing written: a crash while reading leaves nothing behind)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    from torch.distributed.checkpoint.api import CheckpointException

    state: dict = {}
    try:
        _load_state_dict(state, storage_reader=FileSystemReader(path), planner=_EmptyStateDictLoadPlanner(),
                         no_dist=True)  # what torch's dcp_to_torch_save does, without the file it writes
    except CheckpointException as e:  # a BaseException in torch: made an ordinary error that callers can skip
        raise UnreadableCheckpointError(f"cannot read {path}: {failure_causes(e)}") from None
    return state
