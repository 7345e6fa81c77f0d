"""Official checkpoint formats: SiT-XL/2 and LightningDiT-XL/1 key names and shapes, mapping, errors.

The official key lists are written out here from the released architectures (willisma/SiT,
hustvl/LightningDiT), independently of our model code.
"""

import argparse

import pytest
import torch

from decm import launch
from decm.models.official import CheckpointFormatError, load_official, map_state_dict
from decm.models.sit import sit

# What SiT's train.py stores under "args": the argparse.Namespace of its command line (train.py:287).
SIT_ARGS = argparse.Namespace(data_path="/data/imagenet/train", results_dir="results", model="SiT-XL/2", image_size=256,
                              num_classes=1000, epochs=1400, global_batch_size=256, global_seed=0, vae="ema",
                              num_workers=4, log_every=100, ckpt_every=50_000, path_type="Linear",
                              prediction="velocity", loss_weight=None, sample_eps=None, train_eps=None,
                              wandb=False, ckpt=None)


def official_keys(depth, h, patch, in_ch, classes, tokens, lightning=False, learn_sigma=True):
    """{name: shape} of an official SiT (or LightningDiT) velocity checkpoint."""
    out_ch = 2 * in_ch if learn_sigma else in_ch
    k = {"x_embedder.proj.weight": (h, in_ch, patch, patch), "x_embedder.proj.bias": (h,),
         "t_embedder.mlp.0.weight": (h, 256), "t_embedder.mlp.0.bias": (h,),
         "t_embedder.mlp.2.weight": (h, h), "t_embedder.mlp.2.bias": (h,),
         "y_embedder.embedding_table.weight": (classes + 1, h), "pos_embed": (1, tokens, h),
         "final_layer.linear.weight": (patch * patch * out_ch, h), "final_layer.linear.bias": (patch * patch * out_ch,),
         "final_layer.adaLN_modulation.1.weight": (2 * h, h), "final_layer.adaLN_modulation.1.bias": (2 * h,)}
    for i in range(depth):
        b = f"blocks.{i}."
        k.update({b + "attn.qkv.weight": (3 * h, h), b + "attn.qkv.bias": (3 * h,), b + "attn.proj.weight": (h, h),
                  b + "attn.proj.bias": (h,), b + "adaLN_modulation.1.weight": (6 * h, h),
                  b + "adaLN_modulation.1.bias": (6 * h,)})
        if lightning:
            hid = int(2 * 4 * h / 3)
            k.update({b + "norm1.weight": (h,), b + "norm2.weight": (h,), b + "mlp.w12.weight": (2 * hid, h),
                      b + "mlp.w12.bias": (2 * hid,), b + "mlp.w3.weight": (h, hid), b + "mlp.w3.bias": (h,)})
        else:
            k.update({b + "mlp.fc1.weight": (4 * h, h), b + "mlp.fc1.bias": (4 * h,), b + "mlp.fc2.weight": (h, 4 * h),
                      b + "mlp.fc2.bias": (h,)})
    if lightning:
        head = h // 16 if h == 1152 else h // 4
        k.update({"feat_rope.freqs_cos": (tokens, head), "feat_rope.freqs_sin": (tokens, head),
                  "final_layer.norm_final.weight": (h,)})
    return k


def random_state(keys, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=g) for name, shape in keys.items()}


@pytest.mark.parametrize("preset,kwargs,lightning", [
    ("XL/2", dict(input_size=32, in_channels=4, learn_sigma=True), False),
    ("LightningDiT-XL/1", dict(input_size=16, in_channels=32), True),
])
def test_xl_velocity_model_has_the_official_names_and_shapes(preset, kwargs, lightning):
    with torch.device("meta"):
        net = sit(preset, num_classes=1000, flow_map=False, **kwargs)
    ours = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    patch = 1 if lightning else 2
    expected = official_keys(28, 1152, patch, kwargs["in_channels"], 1000, 256, lightning, not lightning)
    assert ours == expected
    n = sum(v.numel() for k, v in net.state_dict().items() if not k.startswith("feat_rope"))
    assert 670e6 < n < 680e6, n  # ≈675M


@pytest.mark.parametrize("container", ["plain", "train_ckpt", "ddp_prefixed"])
def test_sit_checkpoint_loads_into_the_student_and_reproduces_the_weights(tmp_path, container):
    keys = official_keys(2, 64, 2, 4, 10, 16)
    state = random_state(keys)
    obj = {"plain": state, "train_ckpt": {"model": random_state(keys, 1), "ema": state, "opt": {},
                                                             "args": SIT_ARGS},
           "ddp_prefixed": {f"module.{k}": v for k, v in state.items()}}[container]
    path = tmp_path / "SiT.pt"
    torch.save(obj, path)
    student = sit("tiny", input_size=8, in_channels=4, num_classes=10, flow_map=True, hidden_size=64, depth=2,
                  learn_sigma=True)
    load_official(str(path), student, "sit")
    mine = student.state_dict()
    for k, v in state.items():
        assert torch.equal(mine[k], v), k
    assert all(k.startswith("s_embedder.") for k in set(mine) - set(state))
    assert torch.count_nonzero(student.s_embedder.mlp[2].weight) == 0  # still the teacher for every s


class _Evil:
    """A class that is not allow-listed: weights-only loading must refuse it (never unpickle it)."""

    def __reduce__(self):
        return (print, ("unpickled!",))


def test_checkpoint_with_a_foreign_object_is_refused_not_unpickled(tmp_path, capsys):
    keys = official_keys(2, 64, 2, 4, 10, 16)
    torch.save({"ema": random_state(keys), "args": _Evil()}, tmp_path / "evil.pt")
    net = sit("tiny", input_size=8, in_channels=4, num_classes=10, flow_map=False, hidden_size=64, depth=2,
              learn_sigma=True)
    with pytest.raises(CheckpointFormatError, match="cannot read"):
        load_official(str(tmp_path / "evil.pt"), net, "sit")
    assert "unpickled!" not in capsys.readouterr().out


def test_lightningdit_checkpoint_prefers_ema(tmp_path):
    keys = official_keys(2, 64, 1, 8, 10, 16, lightning=True, learn_sigma=False)
    ema, model = random_state(keys, 0), random_state(keys, 1)
    torch.save({"model": model, "ema": ema}, tmp_path / "ldit.pt")
    net = sit("LightningDiT-XL/1", input_size=4, in_channels=8, num_classes=10, flow_map=False, hidden_size=64,
              depth=2, num_heads=4)
    load_official(str(tmp_path / "ldit.pt"), net, "lightningdit")
    assert all(torch.equal(net.state_dict()[k], v) for k, v in ema.items())


def test_wrong_checkpoints_give_clear_errors(tmp_path):
    keys = official_keys(2, 64, 2, 4, 10, 16)
    state = random_state(keys)
    net = sit("tiny", input_size=8, in_channels=4, num_classes=10, flow_map=False, hidden_size=64, depth=2,
              learn_sigma=True)
    broken = dict(state)
    del broken["blocks.1.attn.qkv.weight"]
    broken["blocks.1.attn.extra"] = torch.zeros(1)
    with pytest.raises(CheckpointFormatError, match=r"missing keys \[blocks.1.attn.qkv.weight\].*unexpected keys \[blocks.1.attn.extra\]"):
        map_state_dict(broken, net)
    no_sigma = sit("tiny", input_size=8, in_channels=4, num_classes=10, flow_map=False, hidden_size=64, depth=2)
    with pytest.raises(CheckpointFormatError, match=r"final_layer.linear.weight: checkpoint \(32, 64\) vs model \(16, 64\).*learn_sigma"):
        map_state_dict(state, no_sigma)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointFormatError, match="cannot read"):
        load_official(str(tmp_path / "junk.pt"), net, "sit")
    with pytest.raises(FileNotFoundError, match="experiment.teacher_dir"):
        load_official(str(tmp_path / "absent.pt"), net, "sit")


def test_launch_with_a_mismatched_teacher_is_one_line_exit_2(tmp_path, capsys):
    from conftest import write_latents

    lat = write_latents(tmp_path / "lat", shape=(4, 8, 8), num_classes=10)
    keys = official_keys(2, 64, 2, 4, 10, 16)
    torch.save(random_state(keys), tmp_path / "SiT.pt")
    argv = ["--gin", "gin/decm_xl_sit.gin", "--backend", "local", "--run-dir", str(tmp_path / "run"),
            "--bind", f"datasets.latents.path = '{lat}'", "--bind", "datasets.latents.shape = (4, 8, 8)",
            "--bind", "datasets.latents.num_classes = 10", "--bind", f"experiment.teacher_dir = '{tmp_path}/SiT.pt'",
            "--bind", "backbones.sit.preset = 'tiny'",  # hidden 128 ≠ the checkpoint's 64
            "--bind", "distill/train.device = 'cpu'", "--bind", "distill/train.precision = 'fp32'"]
    assert launch.main(argv) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("[decm] ")]
    assert len(err) == 1 and "shape mismatches" in err[0] and "x_embedder.proj.weight" in err[0]


@pytest.mark.parametrize("bind,needle", [
    ("experiment.teacher_dir = '/nonexistent/SiT.pt'", "set datasets.latents.path"),
    ("datasets.latents.path = '/nonexistent/latents'", "set datasets.latents.path"),
])
def test_xl_launch_without_inputs_names_the_binding(tmp_path, capsys, bind, needle):
    argv = ["--gin", "gin/decm_xl.gin", "--backend", "local", "--run-dir", str(tmp_path / "run"), "--bind", bind]
    assert launch.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]
    assert not (tmp_path / "run").exists()


def test_xl_launch_with_latents_but_no_teacher_names_the_teacher_binding(tmp_path, capsys):
    from conftest import write_latents

    lat = write_latents(tmp_path / "lat", shape=(32, 16, 16), num_classes=1000, n=4)
    argv = ["--gin", "gin/decm_xl.gin", "--backend", "local", "--run-dir", str(tmp_path / "run"),
            "--bind", f"datasets.latents.path = '{lat}'"]
    assert launch.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "set experiment.teacher_dir" in err[0]


# --- VA-VAE against the official tokenizer code (hustvl/LightningDiT tokenizer/autoencoder.py) ---
# The official module is imported at test time from a temporary copy of a LightningDiT checkout:
# $DECM_LIGHTNINGDIT_SRC (a work tree or a bare git directory), else the local mirror below. Without
# either the test is skipped with that reason; bench/vavae_official.py runs the same comparison at the
# released width (128) and writes bench/results/vavae_official.json.
LIGHTNINGDIT_MIRROR = "/work/.mirror/hustvl+LightningDiT/repo"


def lightningdit_source():
    import os

    src = os.environ.get("DECM_LIGHTNINGDIT_SRC") or LIGHTNINGDIT_MIRROR
    if not os.path.exists(src):
        pytest.skip(f"no LightningDiT source (set DECM_LIGHTNINGDIT_SRC to a clone of hustvl/LightningDiT): {src}")
    return src


def test_vavae_matches_the_official_tokenizer():
    from conftest import load_bench

    check = load_bench("vavae_official")
    # The released layout at base width 32 on a 64×64 batch (the released width 128 on a 256×256 batch is
    # bench/vavae_official.py): the same random weights; posterior parameters, a sample drawn with the same
    # seed, and its decode.
    result = check.compare(lightningdit_source(), ch=32, batch=2, image_size=64)
    assert result["max_abs_diff"]["posterior_mean"] <= 1e-5, result
    assert result["max_abs_diff"]["posterior_logvar"] <= 1e-5, result
    assert result["max_abs_diff"]["sample"] <= 1e-5, result
    assert result["max_abs_diff"]["decode"] <= 1e-5, result
    assert result["scale"]["decode"] > 0.1  # a non-trivial decode, not two zeros
