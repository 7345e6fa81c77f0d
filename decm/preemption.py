"""Preemption and time-out: stop at a step boundary, save, then let submitit requeue.

Slurm (with `--signal=USR2@<signal_delay_s>`, set by submitit) sends SIGUSR2 before a time-out and on
preemption. submitit's own handler checkpoints and requeues *inside* the signal handler, i.e. in the
middle of whatever Python was executing. `install()` replaces it with a handler that only records the
request; the training loop polls `requested()` at every step boundary (all ranks agree through one
all-reduce), writes a checkpoint, and raises `Preempted`; `decm.job.Job` then calls submitit's
original handler (`hand_off()`), which pickles the (plain-data) job, runs `scontrol requeue` and exits.
The requeued job resumes from the newest valid checkpoint on disk, never from the pickle.

Ctrl-C (SIGINT) takes the same path without the requeue: while the loop runs (`listen()` …
`stop_listening()`), the first Ctrl-C only records the request; the loop writes the checkpoint of the
step boundary and raises `Interrupted` (a KeyboardInterrupt), which entry points report in one line
(`decm.cli.interrupted`) with exit code 130. A second Ctrl-C stops at once, as does a Ctrl-C outside
the loop (evaluation, setup): Python's usual KeyboardInterrupt.
"""

from __future__ import annotations

import signal
import sys
import threading

_state = {"requested": False, "signum": None, "previous": None, "installed": False}
_interrupt = {"requested": False, "listening": False, "installed": False}


class Preempted(RuntimeError):
    """Raised at a step boundary after the checkpoint of that step is on disk."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, raised at a step boundary after the checkpoint of that step is on disk.

    Args:
      step: the step the checkpoint holds (a rerun resumes there).
      ckpt_dir: where the checkpoint is.
    """

    def __init__(self, step: int, ckpt_dir: str):
        super().__init__(f"interrupted at step {step}; checkpoint written to {ckpt_dir}")
        self.step, self.ckpt_dir = step, ckpt_dir


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
    """A stop was asked for: preemption (SIGUSR2) or, while the loop listens, Ctrl-C."""
    return _state["requested"] or _interrupt["requested"]


def _on_sigint(signum, frame):  # noqa: ARG001 (signal handler signature)
    if not _interrupt["listening"] or _interrupt["requested"]:
        raise KeyboardInterrupt  # outside the loop, or a second Ctrl-C: stop at once
    _interrupt["requested"] = True
    print("[decm] Ctrl-C: writing a checkpoint at the next step boundary (Ctrl-C again to stop at once)",
          file=sys.stderr, flush=True)


def listen() -> None:
    """The training loop starts: from now on Ctrl-C asks for a checkpoint and a stop at a step boundary.

    Only in the main thread, and only where Ctrl-C has Python's default handler (a SIGINT that the
    parent ignores, as for background jobs, stays ignored)."""
    _interrupt.update(requested=False, listening=False)
    if threading.current_thread() is not threading.main_thread():
        return
    current = signal.getsignal(signal.SIGINT)
    if current is signal.default_int_handler or (current is _on_sigint and _interrupt["installed"]):
        signal.signal(signal.SIGINT, _on_sigint)
        _interrupt.update(installed=True, listening=True)


def stop_listening() -> None:
    """The loop has ended: Ctrl-C interrupts at once again (the handler stays; it behaves as Python's)."""
    _interrupt["listening"] = False


def interrupt_requested() -> bool:
    """Ctrl-C was pressed while the loop listened (the stop is an `Interrupted`, not a preemption)."""
    return _interrupt["requested"]


def stop_error(stage: str, step: int, ckpt_dir: str) -> BaseException:
    """What the loop raises after it saved the checkpoint of `step`: `Interrupted` after Ctrl-C, else
    `Preempted` (a requested preemption, here or on another rank)."""
    if _interrupt["requested"]:
        _interrupt["requested"] = False  # handled: the exception carries it from here
        return Interrupted(step, ckpt_dir)
    return Preempted(f"{stage}: preempted at step {step}; checkpoint written to {ckpt_dir}")


def hand_off() -> None:
    """Calls the handler that was installed before ours (submitit: checkpoint, requeue, exit).

    Without one (a plain local run) this is a no-op: the caller reports the stop and returns.
    """
    previous = _state["previous"]
    if callable(previous):
        previous(_state["signum"] or _state.get("signum_installed", signal.SIGUSR2), None)
