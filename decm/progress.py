"""Training progress on stderr: a tqdm bar on a terminal, plain lines in log files.

tqdm redraws its bar with carriage returns, which a log file (Slurm, submitit, `> log`) keeps as one
long line of frames. When stderr is not a terminal, `Progress` prints one plain line every
`every_steps` steps instead: `[decm] distill step 500/3000 (16.7%) loss 0.1234 12.3 it/s, ETA 3m23s`.
`Countdown` does the same for the runs of an analysis script: `run 3/30 …, ETA 21m40s`.
"""

from __future__ import annotations

import sys
import time


class Progress:
    """The same three calls as a tqdm bar (`update`, `set_postfix`, `close`).

    Args:
      total: last step.
      initial: first step (a resumed run starts there).
      desc: label (the stage).
      enabled: False prints nothing (other ranks, `train.progress = False`).
      every_steps: period of the plain lines when stderr is not a terminal.
      stream: where to write (default stderr).
    """

    def __init__(self, total: int, initial: int, desc: str, enabled: bool, every_steps: int, stream=None):
        self.stream = stream or sys.stderr
        self.total, self.n, self.desc, self.every = total, initial, desc, max(1, every_steps)
        self.enabled, self.postfix, self.t0, self.n0 = enabled, {}, time.time(), initial
        self.bar = None
        if enabled and self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, file=self.stream)

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled and (self.n % self.every == 0 or self.n == self.total):
            rate = (self.n - self.n0) / max(time.time() - self.t0, 1e-9)
            extra = "".join(f" {k} {v}" for k, v in self.postfix.items())
            eta = f", ETA {duration((self.total - self.n) / rate)}" if rate > 0 and self.n < self.total else ""
            print(f"[decm] {self.desc} step {self.n}/{self.total} ({100 * self.n / max(self.total, 1):.1f}%)"
                  f"{extra} {rate:.1f} it/s{eta}", file=self.stream, flush=True)

    def set_postfix(self, **values) -> None:
        self.postfix = values
        if self.bar is not None:
            self.bar.set_postfix(**values)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def duration(seconds: float) -> str:
    """'45s', '12m05s', '3h20m'."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Countdown:
    """'[prog] run k/N: what (elapsed 2m10s, ETA 21m40s)' before each of N units of work (runs, trials).

    The ETA is the mean time of the units this command finished, times the units left.

    Args:
      total: number of units.
      prog: the prefix, e.g. 'loss_divergence'.
      unit: what a unit is called ('run').
      stream: where to write (default stderr).
    """

    def __init__(self, total: int, prog: str, unit: str = "run", stream=None):
        self.total, self.prog, self.unit, self.stream = total, prog, unit, stream or sys.stderr
        self.t0, self.done = time.time(), 0

    def line(self, what: str) -> str:
        elapsed = time.time() - self.t0
        eta = f", ETA {duration(elapsed / self.done * (self.total - self.done))}" if self.done else ""
        return f"[{self.prog}] {self.unit} {self.done + 1}/{self.total}: {what} (elapsed {duration(elapsed)}{eta})"

    def start(self, what: str) -> None:
        """Announces the next unit."""
        print(self.line(what), file=self.stream, flush=True)

    def finish(self) -> None:
        """The unit announced last is done."""
        self.done += 1
