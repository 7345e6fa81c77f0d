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


# --- VA-VAE (decm.models.vavae): extraction as LightningDiT's extract_features.py, statistics, decoding ---

def vavae_checkpoint(path, seed=0, extra=True):
    """A random `vavae-small` checkpoint in the released layout: {'state_dict': autoencoder + foreign keys}."""
    from decm.models.vavae import VAVAE

    torch.manual_seed(seed)
    state = VAVAE(ch=32).state_dict()
    if extra:  # the released file also holds the training loss's and the foundation model's weights
        state = {**state, "loss.logvar": torch.zeros(()), "foundation_model.model.w": torch.ones(2)}
    torch.save({"state_dict": state}, path)
    return str(path)


def vavae_args(folder, out, ckpt, *extra):
    return ["--image-folder", folder, "--out", out, "--vae", "vavae-small", "--vae-path", ckpt,
            "--image-size", "32", "--shard-size", "3", "--batch-size", "2", "--device", "cpu", "--seed", "3", *extra]


def test_vavae_encoder_stores_posterior_samples_of_images_and_flips_with_invertible_statistics(tmp_path):
    from decm.data.encode_latents import VAVAECodec

    folder = image_folder(tmp_path / "images", classes=2, per_class=2, size=32)
    ckpt = vavae_checkpoint(tmp_path / "vavae.pt")
    out = str(tmp_path / "lat")
    assert encode_latents.main(vavae_args(folder, out, ckpt)) == 0  # defaults: the official extraction
    index = json.load(open(os.path.join(out, "index.json")))
    assert index["shape"] == [32, 2, 2] and index["has_flip"] and index["posterior"] == "sample"
    assert index["scale"] == 1.0 and np.load(os.path.join(out, "shard-00000.latents.npy")).dtype == np.float32

    # Each shard: per batch a posterior sample of the images, then of their mirror images, from the
    # shard's own CPU generator (seed · 100003 + shard).
    codec = VAVAECodec("vavae-small", ckpt, "--vae-path")
    items, _ = encode_latents.list_images(folder)
    x = encode_latents.load_batch([p for p, _ in items], 32)
    ds = Latents(out, shape=(32, 2, 2), num_classes=2)
    raw = ds.denormalize(ds.read(np.arange(4))[0])
    raw_flip = ds.denormalize(ds.read(np.arange(4), use_flip=np.ones(4, bool))[0])
    g = torch.Generator().manual_seed(3 * 100003 + 0)
    want, want_flip = [], []
    for b in (slice(0, 2), slice(2, 3)):  # shard 0: batches of 2 and 1
        want.append(codec.encode(x[b], True, g))
        want_flip.append(codec.encode(x[b].flip(-1), True, g))
    torch.testing.assert_close(raw[:3], torch.cat(want), atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(raw_flip[:3], torch.cat(want_flip), atol=2e-5, rtol=1e-5)
    mean = codec.vae.posterior(x)[0]
    assert (raw - mean).abs().max() > 1e-3  # a sample, not the mean

    # Statistics: per-channel mean and unbiased std of the stored (non-flipped) latents, in index.json and
    # in LightningDiT's latents_stats.pt layout; the model inputs are (z − mean) / std and decode back.
    stored = torch.from_numpy(np.concatenate([np.load(os.path.join(out, f"shard-0000{i}.latents.npy"))
                                              for i in range(2)]))
    torch.testing.assert_close(torch.tensor(index["channel_mean"]), stored.mean(dim=(0, 2, 3)))
    torch.testing.assert_close(torch.tensor(index["channel_std"]), stored.std(dim=(0, 2, 3)))
    released = torch.load(os.path.join(out, "latents_stats.pt"), weights_only=True)
    assert released["mean"].shape == released["std"].shape == (1, 32, 1, 1)
    model_in = ds.read(np.arange(4))[0]
    torch.testing.assert_close(model_in.mean(dim=(0, 2, 3)), torch.zeros(32), atol=1e-5, rtol=0)
    torch.testing.assert_close(model_in, (stored - released["mean"]) / released["std"])
    torch.testing.assert_close(raw, stored, atol=1e-5, rtol=1e-5)

    # --posterior mean stores the mean; --latent-stats normalises with a given (released) file.
    stats = tmp_path / "latents_stats.pt"
    torch.save({"mean": torch.full((1, 32, 1, 1), 0.5), "std": torch.full((1, 32, 1, 1), 2.0)}, stats)
    out2 = str(tmp_path / "lat_mean")
    assert encode_latents.main(vavae_args(folder, out2, ckpt, "--posterior", "mean", "--no-flip",
                                          "--latent-stats", str(stats))) == 0
    index2 = json.load(open(os.path.join(out2, "index.json")))
    assert index2["posterior"] == "mean" and not index2["has_flip"]
    assert index2["channel_mean"] == [0.5] * 32 and index2["channel_std"] == [2.0] * 32
    ds2 = Latents(out2, shape=(32, 2, 2), num_classes=2)
    torch.testing.assert_close(ds2.read(np.arange(4))[0], (mean - 0.5) / 2.0, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("drop,needle", [("ckpt", "set --vae-path"), ("stats", "set --latent-stats")])
def test_vavae_missing_checkpoint_or_statistics_is_one_line_naming_the_option(tmp_path, capsys, drop, needle):
    folder = image_folder(tmp_path / "images", classes=1, per_class=1, size=32)
    ckpt = vavae_checkpoint(tmp_path / "vavae.pt") if drop != "ckpt" else str(tmp_path / "absent.pt")
    extra = ["--latent-stats", str(tmp_path / "absent_stats.pt")] if drop == "stats" else []
    assert encode_latents.main(vavae_args(folder, str(tmp_path / "o"), ckpt, *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert not os.path.exists(tmp_path / "o")


def test_vavae_checkpoint_loading_keeps_the_autoencoder_and_names_wrong_keys(tmp_path):
    from decm.models.vavae import VAVAE, load_vavae

    path = vavae_checkpoint(tmp_path / "vavae.pt", seed=1)
    model = load_vavae(path, ch=32)
    want = torch.load(path, weights_only=True)["state_dict"]
    assert all(torch.equal(v, want[k]) for k, v in model.state_dict().items())
    plain = {k: v for k, v in VAVAE(ch=32).state_dict().items() if k != "decoder.up.4.attn.0.q.weight"}
    torch.save(plain, tmp_path / "broken.pt")
    with pytest.raises(ValueError, match=r"missing \['decoder.up.4.attn.0.q.weight'\]"):
        load_vavae(str(tmp_path / "broken.pt"), ch=32)
    with pytest.raises(ValueError, match="mis-shaped"):
        load_vavae(path, ch=64)  # width 64 expected, the file holds width 32


def test_vavae_trainer_checkpoint_is_refused_weights_only_and_its_weights_kept_by_the_extract_command(tmp_path, capsys):
    import argparse

    from decm.models import vavae

    path = vavae_checkpoint(tmp_path / "trainer.pt", seed=2)
    obj = torch.load(path, weights_only=True)
    obj["hyper_parameters"] = argparse.Namespace(embed_dim=32)  # not a tensor or primitive: refused weights-only
    torch.save(obj, path)
    with pytest.raises(ValueError, match=r"python -m decm.models.vavae .*trainer.pt .*trainer-weights.pt"):
        vavae.load_vavae(path, ch=32)
    assert vavae.main([path, str(tmp_path / "trainer-weights.pt")]) == 0
    model = vavae.load_vavae(str(tmp_path / "trainer-weights.pt"), ch=32)
    assert all(torch.equal(v, obj["state_dict"][k]) for k, v in model.state_dict().items())
    assert vavae.main([str(tmp_path / "absent.pt"), str(tmp_path / "x.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_evaluation_without_the_vavae_checkpoint_names_the_setting(tmp_path):
    from decm.eval.evaluate import make_decoder

    ds = Latents(write_latents(tmp_path / "lat", shape=(32, 2, 2), num_classes=3), shape=(32, 2, 2), num_classes=3)
    with pytest.raises(FileNotFoundError, match=r"set evaluate.vae_path or --vae-path"):
        make_decoder(ds, "vavae-f16d32", None)
    with pytest.raises(FileNotFoundError, match=r"'/nonexistent/vavae.pt' \(set evaluate.vae_path"):
        make_decoder(ds, "vavae-f16d32", "/nonexistent/vavae.pt")
