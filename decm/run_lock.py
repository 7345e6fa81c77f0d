"""An advisory lock on a run directory: one training process writes into a run directory at a time.

The lock is `fcntl.flock` on `<run_dir>/.lock`, held by the writing process (rank 0: the only rank that
writes checkpoints, stats and summaries) for the duration of its stages. The file holds the holder's
host and PID, so a refused launch can name it. The kernel releases a flock when its process dies, so a
lock left by a killed process never blocks a resume: only a live holder refuses. (On network
filesystems flock depends on the filesystem's lock support; Lustre and NFSv4 provide it.)
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import sys
import time

LOCK_NAME = ".lock"


class RunLocked(RuntimeError):
    """The run directory is held by another live process (a user error: the launcher prints it, exit 2)."""


def holder(run_dir: str) -> str:
    """'pid P on host H (since …)' as written by the holder, or 'an unknown process'."""
    try:
        with open(os.path.join(run_dir, LOCK_NAME)) as f:
            text = f.read().strip()
    except OSError:
        text = ""
    return text or "an unknown process"


def _try(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


@contextlib.contextmanager
def hold(run_dir: str, wait: bool = False, what: str = "run directory"):
    """Holds the lock of `run_dir` inside the block.

    Args:
      run_dir: the directory (created if missing).
      wait: block until the holder is done (used for the shared teacher cache) instead of raising.
      what: noun for messages.

    Raises:
      RunLocked: another live process holds it and `wait` is False.
    """
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, LOCK_NAME)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if not _try(fd):
            if not wait:
                raise RunLocked(f"{what} {run_dir} is in use by {holder(run_dir)}; wait for it to finish or "
                                "use another --run-dir (a killed holder releases the lock by itself)")
            print(f"[decm] waiting for {what} {run_dir} (held by {holder(run_dir)})", file=sys.stderr, flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()} (since "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S')})\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the flock


def check_free(run_dir: str, what: str = "run directory") -> None:
    """Raises RunLocked if a live process holds `run_dir` (a launch checks before writing anything)."""
    path = os.path.join(run_dir, LOCK_NAME)
    if not os.path.exists(path):
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        if not _try(fd):
            raise RunLocked(f"{what} {run_dir} is in use by {holder(run_dir)}; wait for it to finish or "
                            "use another --run-dir (a killed holder releases the lock by itself)")
    finally:
        os.close(fd)
