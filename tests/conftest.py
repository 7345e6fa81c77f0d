import os
import warnings

import pytest
import torch

warnings.filterwarnings("ignore", message=".*torch.jit.script.*")
os.environ["WANDB_MODE"] = "disabled"  # W&B tests bind wandb.mode = 'offline' explicitly
os.environ["WANDB_SILENT"] = "true"
# One thread count for the test process and every process it starts (Slurm jobs, subprocesses inherit
# OMP_NUM_THREADS): runs compared bit for bit across processes must sum in the same order. The machine's
# OMP_NUM_THREADS (2 unless set) is split between the pytest-xdist workers, so that two workers on two
# cores do not oversubscribe them.
THREADS = max(1, int(os.environ.get("OMP_NUM_THREADS", "2")) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
os.environ["OMP_NUM_THREADS"] = str(THREADS)
torch.set_num_threads(THREADS)


@pytest.fixture(autouse=True)
def _gin_clean():
    import gin

    gin.clear_config()
    yield
    gin.clear_config()


@pytest.fixture
def float64_default():
    """float64 as torch's default dtype for a test (exact-reference checks; batched vs unbatched forwards
    agree to ~1e-13), restored afterwards so other tests are unaffected."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def write_latents(root, n: int = 24, shape=(4, 8, 8), num_classes: int = 3, shard_size: int = 10, seed: int = 0):
    """Writes a small decm-latents-v1 directory directly (format of decm/data/latents.py)."""
    import json
    import os

    import numpy as np

    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    shards = []
    for i, start in enumerate(range(0, n, shard_size)):
        count = min(shard_size, n - start)
        name = f"shard-{i:05d}"
        np.save(os.path.join(root, name + ".latents.npy"), rng.normal(size=(count, *shape)).astype(np.float16))
        np.save(os.path.join(root, name + ".labels.npy"), (np.arange(start, start + count) % num_classes).astype(np.int64))
        shards.append({"name": name, "count": count})
    index = {"format": "decm-latents-v1", "shape": list(shape), "num_classes": num_classes, "num_samples": n,
             "shards": shards, "vae": "test", "scale": 0.5, "shift": 0.0, "channel_mean": None,
             "channel_std": None, "has_flip": False}
    with open(os.path.join(root, "index.json"), "w") as f:
        json.dump(index, f)
    return str(root)


def assert_same_state(a, b, path="state"):
    """Recursively asserts two checkpoint states are bit-identical (tensors, dicts, lists, scalars)."""
    import torch

    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            assert_same_state(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def newest_checkpoint_step(run_dir) -> int:
    """Step of the newest valid checkpoint in `run_dir`/checkpoints (0 when there is none)."""
    from decm import checkpoint

    path, _ = checkpoint.latest_valid(os.path.join(str(run_dir), "checkpoints"))
    return int(os.path.basename(path)[5:13]) if path else 0


def load_bench(name: str):
    """The module bench/<name>.py (bench/ is a folder of scripts, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, os.path.join("bench", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
