"""The paper's path end to end at toy size (bench/paper_path.py --tiny): random weights in the official
formats → VA-VAE encode with the released statistics file → distil with gin/decm_xl.gin and post-hoc EMA →
reconstruct σ_rel 0.2 → evaluate NFE 1 and 2 decoded by the VA-VAE → FID. The real-size run of the same
stages is bench/paper_path.py (results in bench/results/paper_path-cpu.json)."""

import json
import math
import os

import torch
from conftest import load_bench


def test_the_papers_path_runs_end_to_end_at_toy_size(tmp_path):
    paper_path = load_bench("paper_path")
    work = str(tmp_path / "work")
    record = paper_path.run_path(work, tiny=True, images=4, in_process=True)
    assert {k: v["rc"] for k, v in record["stages"].items()} == {
        "reference": 0, "encode": 0, "distill": 0, "phema": 0, "evaluate": 0}

    # Shards: posterior samples of images and flips, normalised with the given (released-format) statistics.
    index = json.load(open(os.path.join(work, "latents", "index.json")))
    stats = torch.load(os.path.join(work, "latents_stats.pt"), weights_only=True)
    assert index["vae"] == "vavae-small" and index["posterior"] == "sample" and index["has_flip"]
    assert index["num_classes"] == 1000 and index["shape"] == [32, 2, 2]
    assert index["channel_mean"] == stats["mean"].flatten().tolist()
    # Distillation tracked the post-hoc EMA profiles; the reconstruction is what was evaluated.
    config = open(os.path.join(work, "run", "config.gin")).read()
    assert "distill/train.phema_sigma_rels = (0.05, 0.2)" in config and "sit.preset = 'LightningDiT-XL/1'" in config
    assert os.listdir(os.path.join(work, "run", "checkpoints", "phema"))
    metrics = json.load(open(os.path.join(work, "eval", "metrics.json")))
    assert metrics["step"] == 2 and set(metrics["student"]) == {"1", "2"}
    fids = [metrics["student"][k]["fid"] for k in ("1", "2")]
    assert all(math.isfinite(f) and f > 0 for f in fids), fids
    assert record["fid_random_weights"] == {"1": fids[0], "2": fids[1]}


def test_full_depth_memory_is_extrapolated_linearly_in_the_parameter_count():
    paper_path = load_bench("paper_path")

    def record(depth, params, gib):
        return {"depth": depth, "teacher_parameters": params,
                "stages": {s: {"peak_rss_gib": gib + k} for k, s in enumerate(("distill", "phema", "evaluate"))}}

    # 1 GiB more per 2^30 / 32 parameters: 32 bytes per parameter; 4 GiB more at 4 × that count again.
    step = 2 ** 30 // 32
    out = paper_path.extrapolate(record(1, step, 2.0), record(2, 2 * step, 3.0), 6 * step)
    assert out["stages"]["distill"] == {"bytes_per_parameter": 32.0, "peak_rss_gib_full_depth": 7.0}
    assert out["stages"]["evaluate"]["peak_rss_gib_full_depth"] == 9.0
