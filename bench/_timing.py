"""Wall-clock timing shared by the benchmarks: CUDA work is synchronised before and after.

A helper module imported by bench/step_cost.py and bench/sampling.py, not a command.
"""

from __future__ import annotations

import statistics
import time

import torch


def seconds(fn, device: torch.device) -> float:
    """Seconds of one call of fn(), with CUDA synchronised around it."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def median_seconds(fn, device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Median of `repeats` timed calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    return statistics.median(seconds(fn, device) for _ in range(repeats))


if __name__ == "__main__":
    import sys

    sys.exit("bench/_timing.py is a helper module of the benchmarks, not a command: run bench/step_cost.py or "
             "bench/sampling.py (--help)")
