"""Preemption and time-out: stop at a step boundary, save, then let submitit requeue.

Slurm (with `--signal=USR2@<signal_delay_s>`, set by submitit) sends SIGUSR2 before a time-out and on
preemption. submitit's own handler checkpoints and requeues *inside* the signal handler, i.e. in the
middle of whatever Python was executing. `install()` replaces it with a handler that only records the
request; the training loop polls `requested()` at every step boundary (all ranks agree through one
all-reduce), writes a checkpoint, and raises `Preempted`; `decm.job.Job` then calls submitit's
original handler (`hand_off()`), which pickles the (plain-data) job, runs `scontrol requeue` and exits.
The requeued job resumes from the newest valid checkpoint on disk, never from the pickle.
"""

from __future__ import annotations

import signal
import sys

_state = {"requested": False, "signum": None, "previous": None, "installed": False}


class Preempted(RuntimeError):
    """Raised at a step boundary after the checkpoint of that step is on disk."""


def _record(signum, frame):  # noqa: ARG001 (signal handler signature)
    _state["requested"], _state["signum"] = True, signum
    print(f"[decm] caught signal {signal.Signals(signum).name}: stopping at the next step boundary",
          file=sys.stderr, flush=True)


def install(signum: int = signal.SIGUSR2) -> None:
    """Records SIGUSR2 instead of acting on it; keeps the previous handler for `hand_off`."""
    if _state["installed"]:
        return
    _state["previous"] = signal.getsignal(signum)
    signal.signal(signum, _record)
    _state["installed"], _state["signum_installed"] = True, signum


def uninstall() -> None:
    if _state["installed"]:
        signal.signal(_state["signum_installed"], _state["previous"])
    _state.update(requested=False, signum=None, previous=None, installed=False)


def request() -> None:
    """Asks the running loop to stop at the next step boundary (what the signal does; used by tests)."""
    _state["requested"] = True


def requested() -> bool:
    return _state["requested"]


def hand_off() -> None:
    """Calls the handler that was installed before ours (submitit: checkpoint, requeue, exit).

    Without one (a plain local run) this is a no-op: the caller reports the stop and returns.
    """
    previous = _state["previous"]
    if callable(previous):
        previous(_state["signum"] or _state.get("signum_installed", signal.SIGUSR2), None)
