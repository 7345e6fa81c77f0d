"""Atomic checkpoints with sentinels; resume from the newest *valid* one; nothing is ever deleted on error.

Layout: `<dir>/ckpt-00001000.pt` (written to a temp file, fsynced, renamed) and then the sentinel
`<dir>/ckpt-00001000.ok` holding the byte size. A checkpoint is valid when its sentinel exists, the
size matches and `torch.load(weights_only=True)` succeeds. Contents are tensors and primitives only.
"""

from __future__ import annotations

import glob
import os
import re
import sys

import torch

_NAME = re.compile(r"ckpt-(\d{8})\.pt$")


class CheckpointWriteError(RuntimeError):
    """Raised when a checkpoint cannot be written (the previous checkpoints are untouched)."""


def path_for(directory: str, step: int) -> str:
    return os.path.join(directory, f"ckpt-{step:08d}.pt")


def save(directory: str, step: int, state: dict, keep_last: int = 0) -> str:
    """Writes `state` atomically as step `step`; keeps the newest `keep_last` valid ones (0: keep all)."""
    path = path_for(directory, step)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        os.makedirs(directory, exist_ok=True)
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        size = os.path.getsize(path)
        sentinel_tmp = path[:-3] + ".ok.tmp"
        with open(sentinel_tmp, "w") as f:
            f.write(f"{size}\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(sentinel_tmp, path[:-3] + ".ok")
    except OSError as e:
        try:
            if os.path.exists(tmp):
                os.remove(tmp)
        except OSError:
            pass
        raise CheckpointWriteError(f"cannot write checkpoint {path}: {e.strerror or e}") from None
    if keep_last > 0:  # never counting newer steps (e.g. an unreadable one a resume skipped) against this one
        valid = [p for p in candidates(directory) if step_of(p) <= step and is_valid(p, load=False)]
        for old in valid[keep_last:]:
            os.remove(old)
            os.remove(old[:-3] + ".ok")
    return path


def candidates(directory: str) -> list[str]:
    """Checkpoint files in `directory`, newest step first."""
    paths = [p for p in glob.glob(os.path.join(directory, "ckpt-*.pt")) if _NAME.search(p)]
    return sorted(paths, key=lambda p: int(_NAME.search(p).group(1)), reverse=True)


def why_invalid(path: str, load: bool = True) -> str | None:
    """Why `path` is not a valid checkpoint (one phrase for the user), or None when it is valid."""
    sentinel = path[:-3] + ".ok"
    try:
        with open(sentinel) as f:
            size = int(f.read().strip())
    except FileNotFoundError:
        return f"no sentinel {os.path.basename(sentinel)} (the write did not finish)"
    except (OSError, ValueError):
        return f"unreadable sentinel {os.path.basename(sentinel)}"
    try:
        actual = os.path.getsize(path)
    except OSError as e:
        return f"cannot read it ({e.strerror or e})"
    if actual != size:
        return f"{actual} bytes where its sentinel records {size} (truncated or overwritten)"
    if load:
        try:  # memory-mapped: reads the archive's structure and pickle, not the tensors' bytes
            torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # noqa: BLE001 — any failure to read means: not usable
            return f"unreadable ({type(e).__name__})"
    return None


def is_valid(path: str, load: bool = True) -> bool:
    return why_invalid(path, load) is None


def step_of(path: str) -> int:
    return int(_NAME.search(path).group(1))


def latest_valid(directory: str, verbose: bool = True, collective: bool = False,
                 step: int | None = None) -> tuple[str | None, dict | None]:
    """(path, state) of the newest valid checkpoint, skipping (and reporting, never deleting) bad ones;
    with `step`, the valid checkpoint of that step (a single file, a sharded folder or its `.prev`).

    `collective=True` (every rank of a process group calls it, e.g. a DDP run loading its teacher): rank 0
    alone chooses and reads the checkpoint and the other ranks receive (path, state) by broadcast
    (decm.one_reader); only rank 0 reports skipped checkpoints.

    Sharded checkpoints (`ckpt-<step>.dcp/` of FSDP runs, decm.sharded_checkpoint) count too and are
    read as one dict of full tensors; at equal steps the single file wins (it is cheaper to read)."""
    from decm import sharded_checkpoint

    if collective:
        from decm.one_reader import read_once

        return read_once(lambda: latest_valid(directory, verbose, step=step))
    found = [(step_of(p), 0, p) for p in candidates(directory)] + [
        (sharded_checkpoint.step_of(p), 1, p) for p in sharded_checkpoint.candidates(directory)]
    if step is not None:
        found = [e for e in found if e[0] == step]
    for _, sharded, path in sorted(found, key=lambda e: (-e[0], e[1])):
        if sharded:
            if not sharded_checkpoint.is_valid(path):
                if verbose:
                    print(f"[decm] skipping invalid sharded checkpoint {path} (missing sentinel, or files differ)",
                          file=sys.stderr)
                continue
            try:
                return path, sharded_checkpoint.load_full(path)
            except Exception as e:
                if verbose:
                    print(f"[decm] skipping unreadable sharded checkpoint {path}: {type(e).__name__}", file=sys.stderr)
                continue
        reason = why_invalid(path, load=False)
        if reason:
            if verbose:
                print(f"[decm] skipping checkpoint {path}: {reason}", file=sys.stderr)
            continue
        try:
            return path, torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated / corrupt file with a valid-looking sentinel
            if verbose:
                print(f"[decm] skipping checkpoint {path}: unreadable ({type(e).__name__})", file=sys.stderr)
    return None, None
