"""Run tracking: stats.jsonl (one JSON object per logged step), gin config capture.

stats.jsonl is truncated to the resumed step on resume, so an interrupted-and-resumed run has the
same records as an uninterrupted one (no duplicated or missing steps).
"""

from __future__ import annotations

import json
import os


class StatsWriter:
    """Appends one JSON line per logged step to `<run_dir>/stats.jsonl`, flushed each write.

    Args:
      run_dir: run directory.
      resume_step: completed steps of the checkpoint resumed from; records with a larger step are
        dropped on open (they will be recomputed).
    """

    def __init__(self, run_dir: str, resume_step: int = 0):
        self.path = os.path.join(run_dir, "stats.jsonl")
        truncate_stats(self.path, resume_step)
        self.file = open(self.path, "a")

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record, sort_keys=True) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def truncate_stats(path: str, completed_steps: int) -> None:
    """Rewrites `path` atomically keeping complete records with step ≤ completed_steps."""
    if not os.path.exists(path):
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn last line from a killed process
            if rec.get("step", -1) <= completed_steps:
                kept.append(json.dumps(rec, sort_keys=True) + "\n")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(kept)
    os.replace(tmp, path)


def read_stats(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "stats.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
