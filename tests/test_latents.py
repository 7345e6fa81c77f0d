"""Latent shards: the encoder (ImageFolder → shards, resumable), the format checks, the stateless
distributed sampler, and a training run on latents."""

import json
import os

import numpy as np
import pytest
import torch
from conftest import write_latents
from PIL import Image

from decm.data import encode_latents
from decm.data.latents import Latents, epoch_positions
from decm.job import RunSpec, parse, prepare, run


def image_folder(root, classes=3, per_class=5, size=40):
    rng = np.random.default_rng(0)
    for c in range(classes):
        os.makedirs(root / f"class{c}", exist_ok=True)
        for i in range(per_class):
            arr = rng.integers(0, 256, size=(size, size + 8 * i, 3), dtype=np.uint8)  # varied aspect ratios
            Image.fromarray(arr).save(root / f"class{c}" / f"img{i}.png")
    return str(root)


def test_encoder_writes_shards_that_match_a_direct_encoding_and_resumes(tmp_path):
    folder = image_folder(tmp_path / "images")
    out = str(tmp_path / "latents")
    args = ["--image-folder", folder, "--out", out, "--vae", "avgpool-test", "--image-size", "32",
            "--shard-size", "4", "--batch-size", "3", "--dtype", "float32", "--flip", "--device", "cpu"]
    assert encode_latents.main(args) == 0
    index = json.load(open(os.path.join(out, "index.json")))
    assert index["num_samples"] == 15 and [s["count"] for s in index["shards"]] == [4, 4, 4, 3]
    assert index["shape"] == [4, 4, 4] and index["num_classes"] == 3 and index["has_flip"]

    items, _ = encode_latents.list_images(folder)
    vae = encode_latents.AvgPoolTestVAE()
    ds = Latents(out, shape=(4, 4, 4), num_classes=3)
    x, y = ds.read(np.arange(15))
    direct = vae.encode(encode_latents.load_batch([p for p, _ in items], 32))
    torch.testing.assert_close(x, direct)  # scale 1.0 for the test VAE
    assert y.tolist() == [c for _, c in items]
    xf, _ = ds.read(np.arange(15), use_flip=np.ones(15, bool))
    torch.testing.assert_close(xf, vae.encode(encode_latents.load_batch([p for p, _ in items], 32).flip(-1)))

    # Resume: a lost shard is re-encoded, the finished ones are not touched.
    before = {n: os.path.getmtime(os.path.join(out, n)) for n in os.listdir(out) if n.endswith(".npy")}
    for suffix in (".ok", ".latents.npy"):
        os.remove(os.path.join(out, "shard-00002" + suffix))
    assert encode_latents.main(args) == 0
    after = {n: os.path.getmtime(os.path.join(out, n)) for n in os.listdir(out) if n.endswith(".npy")}
    assert set(after) == set(before)
    assert all(after[n] == before[n] for n in before if not n.startswith("shard-00002"))
    x2, _ = Latents(out, shape=(4, 4, 4), num_classes=3).read(np.arange(15))
    assert torch.equal(x, x2)


def test_encoder_bad_input_is_one_line_exit_2(tmp_path, capsys):
    assert encode_latents.main(["--image-folder", str(tmp_path / "none"), "--out", str(tmp_path / "o"),
                                "--vae", "avgpool-test"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "image folder not found" in err[0]


def test_sampler_visits_each_sample_once_per_epoch_across_ranks():
    n, batch, world = 24, 3, 2  # 6 samples per step → 4 steps per epoch
    for epoch in range(2):
        seen = np.concatenate([epoch_positions(step, batch, rank, world, n, seed=7)
                               for step in range(4 * epoch, 4 * epoch + 4) for rank in range(world)])
        assert sorted(seen.tolist()) == list(range(n))
    e0 = np.concatenate([epoch_positions(s, batch, r, world, n, 7) for s in range(4) for r in range(world)])
    e1 = np.concatenate([epoch_positions(s, batch, r, world, n, 7) for s in range(4, 8) for r in range(world)])
    assert not np.array_equal(e0, e1)  # a fresh permutation per epoch
    # Stateless: the batch at a step does not depend on what was read before (exact resume).
    assert np.array_equal(epoch_positions(5, batch, 1, world, n, 7), epoch_positions(5, batch, 1, world, n, 7))


@pytest.mark.parametrize("change,needle", [
    (dict(shape=(4, 16, 16)), "latent shape"),
    (dict(num_classes=7), "classes"),
    (dict(flip=True), "no flipped latents"),
    (dict(path="/nonexistent"), "set datasets.latents.path"),
])
def test_format_mismatches_are_clear(tmp_path, change, needle):
    kwargs = dict(path=write_latents(tmp_path / "lat"), shape=(4, 8, 8), num_classes=3)
    kwargs.update(change)
    with pytest.raises((ValueError, FileNotFoundError), match=needle):
        Latents(**kwargs).check()


def test_teacher_pretraining_on_latents_resumes_exactly(tmp_path):
    lat = write_latents(tmp_path / "lat", n=40, shape=(4, 8, 8), num_classes=3)
    bindings = (f"datasets.latents.path = '{lat}'", "datasets.latents.shape = (4, 8, 8)",
                "datasets.latents.num_classes = 3", "train.dataset = @datasets.latents()",
                "train.backbone = @backbones.sit", "backbones.sit.preset = 'tiny'", "experiment.stages = ('teacher',)",
                "train.steps = 6", "train.batch_size = 8", "train.ckpt_every_steps = 3", "train.progress = False")
    full = RunSpec((), bindings + ("experiment.cache_root = '%s'" % (tmp_path / "a"),), str(tmp_path / "ra"))
    parse(full.gin_files, full.bindings)
    prepare(full)
    a = run(full)["teacher"]
    half = RunSpec((), bindings + ("experiment.cache_root = '%s'" % (tmp_path / "b"), "train.stop_after_steps = 3"),
                   str(tmp_path / "rb"))
    prepare(half)
    run(half)
    parse(half.gin_files, half.bindings)
    b = run(half)["teacher"]
    assert a["step"] == b["step"] == 6 and a["param_checksum"] == b["param_checksum"]
