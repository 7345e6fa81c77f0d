"""Peak memory of a process during marked windows (training steps): tensor bytes and resident set size.

A helper module of bench/memory.py and bench/xl_cpu.py, not a command.

Two measurements, because they answer two questions:

- **Tensor peak** — the largest number of bytes held by live tensors at any instant of a window, the
  quantity decm/memory.py predicts and the one CUDA's `max_memory_allocated` reports. On CUDA it is
  exactly that counter (reset at each mark). On CPU it comes from `torch.profiler` memory events:
  with `profile_memory=True` PyTorch's CPU allocator reports every allocation and free together with
  its running total of bytes allocated while profiling is on (c10's ProfiledCPUMemoryReporter), so
  the profiler is started before the process allocates its model and that total is the live tensor
  bytes at each event; the window's peak is the largest total among its events. This sees every
  tensor, including the ones autograd, FSDP's all-gather / reduce-scatter buffers, DDP's buckets and
  gloo's collectives allocate, and nothing else (not the interpreter, libraries or allocator slack).
  The profiler costs time per op, so steps measured this way are not timed.
- **RSS peak** — the process's resident high-water mark (`VmHWM` in /proc/self/status), reset at each
  mark by writing '5' to /proc/self/clear_refs (Linux ≥ 4.0). It counts everything the operating
  system gives the process (interpreter, libraries, allocator caches, gloo's own buffers) and is what
  decides whether a job fits in a machine's memory; it is an upper bound of the tensor peak plus the
  process's fixed cost, and freed memory that glibc keeps in its heap still counts.
"""

from __future__ import annotations

import os
import time

import torch


def _proc_status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # kB
    raise RuntimeError(f"/proc/self/status has no {field}")


def live_bytes(events, all_freed_at_end: bool = False) -> tuple[list[int], list[int], int, list[int]]:
    """(times, live tensor bytes after each event, number of frees inferred, bytes never freed per event)
    from allocation events [(time, pointer, ±bytes)] in event order.

    The profiler records an allocation or free only in the thread that runs it, and gloo's worker
    threads drop the last reference to some collective buffers (FSDP's all-gather outputs) — those
    frees are never recorded. Such a block shows up as an allocation whose address is allocated again
    without a free in between; it is counted as freed at the earliest of the next allocation of the
    same size (FSDP frees a block's all-gather output, after copying it out, before it gathers the
    next, equal-sized block) and the reuse of its address. A block whose free is not recorded and whose
    address is never reused stays counted (an overestimate) — unless `all_freed_at_end` says that
    nothing allocated is alive when the profile ends (bench/memory.py: the training loop has returned
    and garbage is collected): then it too is counted as freed at the next allocation of its size.
    """
    n = len(events)
    next_same_size, next_at_ptr = [n] * n, [n] * n
    last_by_size, last_by_ptr = {}, {}
    for i in range(n - 1, -1, -1):
        _, ptr, size = events[i]
        if size > 0:
            next_same_size[i] = last_by_size.get(size, n)
            last_by_size[size] = i
        next_at_ptr[i] = last_by_ptr.get(ptr, n)
        last_by_ptr[ptr] = i
    unrecorded, never_freed = 0, [0] * n
    release = {}  # event index → bytes released there for blocks whose free was not recorded
    for i, (_, ptr, size) in enumerate(events):
        if size <= 0:
            continue
        j = next_at_ptr[i]
        if j == n:
            never_freed[i] = size  # still alive when the profile ends (or freed unrecorded)
            if all_freed_at_end and next_same_size[i] < n:
                release[next_same_size[i]] = release.get(next_same_size[i], 0) + size
                unrecorded += 1
            continue
        if events[j][2] < 0:
            continue  # its free was recorded
        at = min(next_same_size[i], j)  # its address was allocated again: freed, unrecorded
        release[at] = release.get(at, 0) + size
        unrecorded += 1
    times, live, cur = [], [], 0
    for i, (t, _, size) in enumerate(events):
        cur -= release.get(i, 0)
        cur += size
        times.append(t)
        live.append(cur)
    return times, live, unrecorded, never_freed


def rss_bytes() -> int:
    """Current resident set size (VmRSS) of this process."""
    return _proc_status_bytes("VmRSS")


def rss_peak_bytes() -> int:
    """Resident high-water mark (VmHWM) since the process started or the last `reset_rss_peak`."""
    return _proc_status_bytes("VmHWM")


def reset_rss_peak() -> bool:
    """Resets VmHWM to the current RSS; False where /proc/self/clear_refs cannot be written."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class Windows:
    """Peak memory per window: `mark(label)` closes the current window and opens the next.

    Args:
      device: the device whose tensors are counted (CPU: profiler memory events; CUDA: the allocator's
        peak counter).
      tensors: count tensor bytes (CPU: runs the profiler from construction on — build the model
        after creating this object).
      rss: record the RSS peak of each window.

    Set `all_freed_at_close` before `close()` when every tensor allocated since construction has been
    freed by then (see `live_bytes`). `result()` (after `close()`) returns {label: {"tensor_peak", "tensor_start", "rss_peak",
    "rss_start", "seconds"}}; tensor fields are absent when `tensors` is False.
    """

    def __init__(self, device: torch.device, tensors: bool = True, rss: bool = True):
        self.device, self.tensors, self.rss = torch.device(device), tensors, rss
        self.all_freed_at_close = False  # set True when nothing the windows allocated is alive at close()
        self._records: dict[str, dict] = {}
        self._open: tuple | None = None
        self._prof = None
        self.unrecorded_frees = 0
        if tensors and self.device.type == "cpu":
            from torch.profiler import ProfilerActivity, profile

            self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self._prof.__enter__()
        elif tensors and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)

    def _close_window(self) -> None:
        if self._open is None:
            return
        label, annotation, t0 = self._open
        rec = self._records[label]
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        rec["seconds"] = time.perf_counter() - t0
        if annotation is not None:
            annotation.__exit__(None, None, None)
        if self.tensors and self.device.type == "cuda":
            rec["tensor_peak"] = int(torch.cuda.max_memory_allocated(self.device))
        if self.rss:
            rec["rss_peak"] = rss_peak_bytes()
        self._open = None

    def mark(self, label: str) -> None:
        """Ends the open window (if any) and starts the window `label`."""
        self._close_window()
        if label in self._records:
            raise ValueError(f"window {label!r} marked twice")
        rec = self._records[label] = {}
        if self.rss:
            rec["rss_reset"] = reset_rss_peak()
            rec["rss_start"] = rss_bytes()
        annotation = None
        if self._prof is not None:
            annotation = torch.autograd.profiler.record_function(f"window::{label}")
            annotation.__enter__()
        elif self.tensors and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            rec["tensor_start"] = int(torch.cuda.memory_allocated(self.device))
            torch.cuda.reset_peak_memory_stats(self.device)
        self._open = (label, annotation, time.perf_counter())

    def close(self) -> None:
        """Ends the open window and, on CPU, stops the profiler and reads the peaks."""
        self._close_window()
        if self._prof is None:
            return
        self._prof.__exit__(None, None, None)
        events, spans = self._events()
        self._prof = None
        times, live, self.unrecorded_frees, never_freed = live_bytes(events, self.all_freed_at_close)
        import bisect

        for label, rec in self._records.items():
            span = spans.get(f"window::{label}")
            if span is None:
                continue
            lo, hi = bisect.bisect_left(times, span[0]), bisect.bisect_right(times, span[1])
            start = live[lo - 1] if lo > 0 else 0
            rec["tensor_start"] = int(start)
            rec["tensor_peak"] = int(max([start, *live[lo:hi]]))
            rec["tensor_never_freed"] = int(sum(never_freed[lo:hi]))  # allocated here, alive at the end

    def _events(self):
        """([(time ns, pointer, signed bytes)] in event order, {annotation name: (start ns, end ns)})."""
        from torch._C._profiler import _EventType

        events, spans = [], {}
        stack = list(self._prof.profiler.kineto_results.experimental_event_tree())
        while stack:
            e = stack.pop()
            kind = e.typed[0]
            if kind == _EventType.Allocation:
                info = e.typed[1]
                if info.device.type == "cpu":
                    events.append((e.start_time_ns, info.id, info.ptr, info.alloc_size))
            elif e.name.startswith("window::"):
                spans[e.name] = (e.start_time_ns, e.end_time_ns)
            stack.extend(e.children)
        events.sort(key=lambda a: (a[0], a[1]))
        return [(t, ptr, size) for t, _, ptr, size in events], spans

    def result(self) -> dict:
        return {k: {f: v for f, v in r.items() if f != "rss_reset"} for k, r in self._records.items()}

    def rss_reset_works(self) -> bool:
        return all(r.get("rss_reset", True) for r in self._records.values())


if __name__ == "__main__":
    import sys

    sys.exit("bench/_peak.py is a helper module of the benchmarks, not a command: run bench/memory.py or "
             "bench/xl_cpu.py (--help)")
