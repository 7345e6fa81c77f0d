"""Loading official SiT / LightningDiT checkpoints into our backbone (state dict by name, shapes checked).

Formats (as released):
  - SiT (`SiT-XL-2-256x256.pt`, willisma/SiT): the EMA state dict itself, or a training checkpoint
    `{'model', 'ema', 'opt', 'args'}` whose `args` is an `argparse.Namespace` (allow-listed for
    weights-only loading, `SAFE_GLOBALS`). Keys: `x_embedder.proj.*`, `t_embedder.mlp.{0,2}.*`,
    `y_embedder.embedding_table.weight` (1001 rows: 1000 classes + the CFG null class), `pos_embed`,
    `blocks.{i}.{norm1?,attn.qkv,attn.proj,mlp.fc1,mlp.fc2,adaLN_modulation.1}.*`,
    `final_layer.{linear,adaLN_modulation.1}.*`. learn_sigma=True: the final layer predicts 8 channels
    of which the first 4 are the velocity.
  - LightningDiT (`lightningdit-xl-imagenet256-*.pt`, hustvl/LightningDiT): a training checkpoint with
    `'ema'` (preferred) and `'model'`; SwiGLU `mlp.w12` / `mlp.w3`, RMSNorm weights `norm1.weight`,
    `norm2.weight`, `final_layer.norm_final.weight`, RoPE buffers `feat_rope.freqs_cos/sin`; out_channels
    = in_channels (no learned sigma).
Prefixes `module.` (DDP) and `_orig_mod.` (torch.compile) are stripped. Our student adds `s_embedder.*`
(zero-initialised), which is the only key a velocity checkpoint may lack.
"""

from __future__ import annotations

import argparse
import os

import torch

from decm.one_reader import read_once

FORMATS = ("sit", "lightningdit", "decm")
# Non-tensor objects the released training checkpoints legitimately hold, allowed for weights-only
# unpickling (never a fallback to full unpickling): SiT's `train.py` saves `"args": args`, an
# argparse.Namespace of primitives.
SAFE_GLOBALS = (argparse.Namespace,)
_PREFIXES = ("module.", "_orig_mod.")


class CheckpointFormatError(ValueError):
    """The checkpoint's keys or shapes do not match the configured backbone."""


def extract_state_dict(obj, fmt: str) -> dict:
    """The weights inside a loaded checkpoint object: 'ema' first, then 'model' / 'state_dict', else itself."""
    if fmt == "decm":
        if not isinstance(obj, dict) or "ema" not in obj:
            raise CheckpointFormatError("a decm checkpoint holds 'ema' (written by decm.train)")
        return obj["ema"]
    if isinstance(obj, dict):
        for key in ("ema", "model", "state_dict"):
            if key in obj and isinstance(obj[key], dict):
                return obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointFormatError("no state dict found (expected tensors, or 'ema' / 'model' / 'state_dict')")
    return obj


def strip_prefixes(state: dict) -> dict:
    out = {}
    for k, v in state.items():
        changed = True
        while changed:
            changed = False
            for p in _PREFIXES:
                if k.startswith(p):
                    k, changed = k[len(p):], True
        out[k] = v
    return out


def _summ(keys, n=5) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f", … ({len(keys)} in all)" if len(keys) > n else "")


def map_state_dict(state: dict, model: torch.nn.Module, allow_missing=("s_embedder.",)) -> dict:
    """Checks names and shapes of an official state dict against `model` and returns the dict to load.

    Raises CheckpointFormatError naming the missing, unexpected and mis-shaped keys.
    """
    state = strip_prefixes(state)
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.startswith(tuple(allow_missing))]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    problems = []
    if missing:
        problems.append(f"missing keys [{_summ(missing)}]")
    if unexpected:
        problems.append(f"unexpected keys [{_summ(unexpected)}]")
    if shapes:
        problems.append(f"shape mismatches [{'; '.join(shapes[:3])}{' …' if len(shapes) > 3 else ''}]")
    if problems:
        raise CheckpointFormatError("checkpoint does not match the backbone: " + "; ".join(problems) +
                                    " (check backbones.sit.preset / learn_sigma and the dataset's shape)")
    return {k: state[k] for k in own if k in state}


def load_official(path: str, model: torch.nn.Module, fmt: str = "sit", collective: bool = False) -> torch.nn.Module:
    """Loads an official checkpoint file (or a decm run's checkpoint) into `model` in place.

    Args:
      path: the .pt file.
      model: our backbone, built with the matching preset (velocity or flow map).
      fmt: 'sit', 'lightningdit' or 'decm'.
      collective: every rank of a process group calls it: rank 0 alone reads the file and the other ranks
        receive the mapped weights by broadcast (decm.one_reader); errors are raised on every rank.
    """
    if fmt not in FORMATS:
        raise ValueError(f"teacher format must be one of {FORMATS}, got {fmt!r}")

    def read() -> dict:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"teacher checkpoint not found: {path} (set experiment.teacher_dir)")
        try:
            with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
                obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 — any unpickling problem is a bad file
            raise CheckpointFormatError(f"cannot read {path}: {type(e).__name__}: {e}".splitlines()[0]) from None
        return map_state_dict(extract_state_dict(obj, fmt), model)

    state = read_once(read) if collective else read()
    model.load_state_dict(state, strict=False)
    return model
