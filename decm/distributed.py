"""Process-group setup: torchrun, Slurm (with or without submitit) or one process.

`init(device)` reads the launcher's environment, in this order:
  1. torchrun / submitit's `TorchDistributedEnvironment().export()`: RANK, WORLD_SIZE, LOCAL_RANK,
     MASTER_ADDR, MASTER_PORT;
  2. plain `srun`: SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID; the master is the first host of
     SLURM_JOB_NODELIST (`scontrol show hostnames`) and the port is derived from SLURM_JOB_ID;
  3. otherwise a single process (no process group).
NCCL is used when the device is CUDA, gloo otherwise. Rank 0 alone logs and writes checkpoints.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess

import torch
import torch.distributed as dist


@dataclasses.dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job.

    Args:
      rank: global rank.
      world_size: number of processes.
      local_rank: rank on this node (selects the GPU).
      device: the device this process computes on.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def env_ranks(environ=None) -> tuple[int, int, int] | None:
    """(rank, world_size, local_rank) from torchrun or Slurm variables, or None for one process."""
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" in env and "RANK" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    return None


def _slurm_master(env) -> tuple[str, str]:
    nodelist = env.get("SLURM_JOB_NODELIST", "localhost")
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             check=True, timeout=30).stdout.split()
        host = out[0] if out else "localhost"
    except (OSError, subprocess.SubprocessError):
        host = nodelist.split(",")[0]
    port = str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000)
    return host, port


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """'auto' → cuda:<local_rank> when CUDA is available, else cpu; 'cuda' → cuda:<local_rank>."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("train.device = 'cuda' but no CUDA device is visible (use 'cpu' or 'auto')")
        return torch.device("cuda", local_rank)
    return torch.device(device)


def init(device: str = "cpu", timeout_minutes: float = 30.0) -> DistInfo:
    """Joins (or creates) the default process group when the environment describes several processes."""
    ranks = env_ranks()
    if ranks is None:
        return DistInfo(device=resolve_device(device))
    rank, world, local = ranks
    dev = resolve_device(device, local)
    if world > 1 and not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:
            os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = _slurm_master(os.environ)
        os.environ.setdefault("MASTER_PORT", "29500")
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        import datetime

        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world,
                                timeout=datetime.timedelta(minutes=timeout_minutes))
    return DistInfo(rank, world, local, dev)


def any_true(flag: bool, info: DistInfo) -> bool:
    """True on every rank when `flag` is true on any rank (one all-reduce; free in one process)."""
    if not info.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def shutdown() -> None:
    """Destroys the default process group if this process created one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
