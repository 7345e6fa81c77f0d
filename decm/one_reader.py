"""One reader per checkpoint: rank 0 reads, every other rank receives the result by broadcast.

A DDP run resuming from a checkpoint, or loading its teacher, needs the same full state on every rank.
Letting each rank read it multiplies the file-system traffic by the world size (8 ranks reading a
multi-GB sharded checkpoint from shared storage) and, for a sharded checkpoint, makes every rank
assemble its own full copy. `read_once` runs the reader on rank 0 only and sends the other ranks the
result's structure (one `broadcast_object_list` of the nested dicts/lists with each tensor replaced by
its shape and dtype) and then each tensor's bytes (one `broadcast` per tensor, on the GPU under NCCL,
on the CPU under gloo). Every rank returns tensors on the CPU, as `torch.load(map_location='cpu')` and
`sharded_checkpoint.load_full` do.

Failures stay collective: when the reader raises on rank 0, every rank raises the same exception type
with the same message (a `RuntimeError` when the type cannot be rebuilt from its message), so callers
that skip an unreadable checkpoint stay in step instead of hanging in different collectives.
"""

from __future__ import annotations

import pickle
from typing import Any, Callable

import torch
import torch.distributed as dist


class _Slot:
    """Placeholder for a tensor in the broadcast structure: its index, shape and dtype."""

    def __init__(self, index: int, shape: tuple, dtype: torch.dtype):
        self.index, self.shape, self.dtype = index, shape, dtype


def collective() -> bool:
    """True under an initialised process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _strip(obj: Any, tensors: list) -> Any:
    """`obj` with every tensor replaced by a _Slot; the tensors are appended to `tensors` in slot order."""
    if isinstance(obj, torch.Tensor):
        tensors.append(obj)
        return _Slot(len(tensors) - 1, tuple(obj.shape), obj.dtype)
    if isinstance(obj, dict):
        return type(obj)((k, _strip(v, tensors)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return _same_kind(obj, [_strip(v, tensors) for v in obj])
    return obj


def _fill(obj: Any, tensors: list) -> Any:
    if isinstance(obj, _Slot):
        return tensors[obj.index]
    if isinstance(obj, dict):
        return type(obj)((k, _fill(v, tensors)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return _same_kind(obj, [_fill(v, tensors) for v in obj])
    return obj


def _same_kind(obj, items: list):
    if hasattr(obj, "_fields"):  # a namedtuple
        return type(obj)(*items)
    return type(obj)(items)


def _wire_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _error_payload(e: Exception) -> tuple:
    try:
        pickle.dumps(type(e))
        kind = type(e)
    except Exception:  # a class defined where the other ranks cannot import it
        kind = RuntimeError
    return ("error", kind, str(e))


def _raise(kind, message: str):
    try:
        err = kind(message)
    except Exception:
        err = RuntimeError(message)
    raise err


def read_once(read: Callable[[], Any], src: int = 0) -> Any:
    """Collective under a process group of world > 1: only rank `src` calls `read()`; every rank returns
    the same nested structure (dicts, lists, tuples, tensors, plain values), tensors on the CPU.
    Without a process group (or at world 1) it is `read()`.

    Args:
        read: returns the object to share, e.g. a checkpoint's state dict or `(path, state)`.
        src: the rank that reads.
    """
    if not collective():
        return read()
    rank = dist.get_rank()
    payload: list = [None]
    tensors: list = []
    error = None
    if rank == src:
        try:
            payload = [("ok", _strip(read(), tensors))]
        except BaseException as e:  # told to every rank before anything else is sent (or they would hang)
            error = e
            payload = [_error_payload(e)]
    dist.broadcast_object_list(payload, src=src)
    if payload[0][0] == "error":
        if error is not None:
            raise error
        _raise(payload[0][1], payload[0][2])
    skeleton = payload[0][1]
    slots: list = []
    _collect_slots(skeleton, slots)
    device = _wire_device()
    received = []
    for slot in sorted(slots, key=lambda s: s.index):
        nbytes = int(torch.Size(slot.shape).numel()) * torch.empty((), dtype=slot.dtype).element_size()
        if rank == src:  # bytes on the wire: any dtype (bool, bf16) travels over any backend
            wire = tensors[slot.index].detach().contiguous().reshape(-1).view(torch.uint8).to(device)
        else:
            wire = torch.empty(nbytes, dtype=torch.uint8, device=device)
        if nbytes:
            dist.broadcast(wire, src=src)
        if rank == src:
            received.append(tensors[slot.index].detach().cpu())
        else:
            received.append(wire.cpu().view(slot.dtype).reshape(slot.shape))
    return _fill(skeleton, received)


def _collect_slots(obj: Any, out: list) -> None:
    if isinstance(obj, _Slot):
        out.append(obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            _collect_slots(v, out)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _collect_slots(v, out)
