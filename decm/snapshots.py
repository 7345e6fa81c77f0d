"""Evaluation hook during training: fixed-noise samples of the EMA student every k steps.

Writes `<run_dir>/snapshots/step-XXXXXXXX.pt` ({nfe: samples}, in model space — latents at scale,
decode with the dataset's VAE) and appends summary statistics to `<run_dir>/snapshots.jsonl`, so a
collapse (non-finite or shrinking samples) shows up long before the final FID.
"""

from __future__ import annotations

import json
import os

import torch

from decm.sampling import Chain

_listeners = []


def add_listener(fn) -> None:
    """Calls fn(record) after every snapshot (Optuna pruning reports through this; see decm.sweep)."""
    _listeners.append(fn)


def clear_listeners() -> None:
    _listeners.clear()


@torch.no_grad()
def snapshot(model, dataset, step: int, run_dir: str, device, n: int = 16, nfe=(1, 2), seed: int = 0,
             write: bool = True) -> dict:
    """Samples the flow map from fixed noise (and fixed labels) and records their statistics.

    Args:
      model: the (EMA) flow-map student.
      dataset: provides `shape` and `num_classes`.
      step: training step (file name).
      run_dir: run directory.
      device: where to sample.
      n: samples per NFE.
      nfe: numbers of steps (flow-map chain on a uniform grid).
      seed: noise seed (fixed across the run, so snapshots are comparable).
      write: write the files and call the listeners (False: sample only — the other ranks of a sharded EMA,
        whose forwards are collective).
    """
    g = torch.Generator().manual_seed(seed)
    z = torch.randn((n, *dataset.shape), generator=g).to(device)
    y = (torch.arange(n) % dataset.num_classes).to(device) if dataset.num_classes else None
    out, record = {}, {"step": step}
    reference = None
    if len(dataset.shape) == 1:  # 2-D data: a cheap distribution distance as the intermediate evaluation
        from decm.eval.metrics import sliced_wasserstein

        reference = dataset.reference(2000, torch.Generator().manual_seed(seed + 1))[0]
        z_eval = torch.randn((2000, *dataset.shape), generator=torch.Generator().manual_seed(seed + 2)).to(device)
        y_eval = (torch.arange(2000) % dataset.num_classes).to(device) if dataset.num_classes else None
    for k in nfe:
        x = Chain()(model, z, y, nfe=int(k)).float().cpu()
        out[int(k)] = x
        record[f"nfe{k}/mean"] = float(x.mean())
        record[f"nfe{k}/std"] = float(x.std())
        record[f"nfe{k}/finite"] = bool(torch.isfinite(x).all())
        if reference is not None:
            record[f"nfe{k}/sw2"] = sliced_wasserstein(Chain()(model, z_eval, y_eval, nfe=int(k)).float().cpu(), reference)
    if not write:
        return record
    folder = os.path.join(run_dir, "snapshots")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"step-{step:08d}.pt")
    torch.save({"step": step, "labels": None if y is None else y.cpu(), "samples": out}, path + ".tmp")
    os.replace(path + ".tmp", path)
    with open(os.path.join(run_dir, "snapshots.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")
    for fn in list(_listeners):
        fn(record)
    return record
