"""W&B without a network: one `wandb sync` command covers every offline folder of a run (and of all the
runs of a script), and a W&B report is staged offline and published later with one command."""

import glob
import json
import os
import shlex

from decm import report
from decm.wandb_log import Tracker, one_sync_line

OFFLINE = {"enabled": True, "project": "decm-test", "mode": "offline"}


def fake_run(root, name, lr):
    """A run directory as the launcher leaves it (config, stats, metrics, W&B id), without training."""
    d = os.path.join(str(root), name)
    os.makedirs(d)
    with open(os.path.join(d, "config.gin"), "w") as f:
        f.write(f"distill/train.lr = {lr}\ndistill/train.steps = 4\n")
    with open(os.path.join(d, "stats.jsonl"), "w") as f:
        for step in (2, 4):
            f.write(json.dumps({"step": step, "loss/total": 1.0 / step, "loss/cm": 0.5 / step}) + "\n")
    with open(os.path.join(d, "metrics.json"), "w") as f:
        json.dump({"step": 4, "rows": [{"model": "student", "sampler": "chain", "nfe": 1, "sw2": lr}]}, f)
    with open(os.path.join(d, "wandb_id"), "w") as f:
        f.write(f"id{name}")
    return d


def sync_globs(line):
    """The folders a printed `wandb sync PATTERN …` command uploads (the shell expands the patterns)."""
    words = shlex.split(line[line.index("wandb sync"):])[2:]
    return sorted(p for w in words for p in glob.glob(w))


def test_one_sync_command_covers_every_attempt_of_every_run(tmp_path, capsys):
    a, b = str(tmp_path / "runs" / "a"), str(tmp_path / "runs" / "b")
    for run_dir in (a, a, b):  # `a` resumed once: two offline folders of one run
        t = Tracker(run_dir, OFFLINE)
        t.log_stats("distill", {"step": 1, "loss/total": 1.0})
        t.finish()
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "wandb sync" in ln]
    assert len(lines) == 3  # outside one_sync_line: one line per finished run …
    assert sync_globs(lines[0]) == sync_globs(lines[1]) == sorted(glob.glob(os.path.join(a, "wandb", "offline-run-*")))
    assert len(sync_globs(lines[0])) == 2  # … whose command covers every attempt of that run
    with one_sync_line("study"):
        for run_dir in (a, b):
            Tracker(run_dir, OFFLINE).finish()
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "wandb" in ln.lower()]
    assert len(lines) == 1 and lines[0].startswith("[study] W&B: 2 offline runs; upload with: wandb sync"), lines
    everything = sorted(glob.glob(os.path.join(str(tmp_path), "runs", "*", "wandb", "offline-run-*")))
    assert len(everything) == 5 and sync_globs(lines[0]) == everything


def test_wandb_report_is_staged_offline_and_published_by_one_command(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    a, b = fake_run(tmp_path, "base", 0.001), fake_run(tmp_path, "lr", 0.003)
    out = str(tmp_path / "report")
    assert report.main([a, b, "--out", out, "--wandb-report", "--project", "decm-test"]) == 0
    printed = capsys.readouterr().out
    spec_path = os.path.join(out, "wandb_report.json")
    assert f"W&B report staged → {spec_path}" in printed
    assert f"python -m decm.report --publish {spec_path}" in printed.splitlines()[-1]
    spec = json.load(open(spec_path))
    assert spec["run_ids"] == ["idbase", "idlr"] and spec["project"] == "decm-test"
    assert [bl["type"] for bl in spec["blocks"]] == ["h1", "h2", "markdown", "h2", "panels", "h2", "code"]
    assert [p["title"] for p in spec["blocks"][4]["plots"]] == ["loss/total", "loss/cm"]
    assert "| lr | student | chain | 1 | 0.003 |" in spec["blocks"][2]["text"]
    assert "+ distill/train.lr = 0.003" in spec["blocks"][6]["code"]
    # the staged spec builds the same W&B Report object offline (saving it is the only online step)
    rep = report.report_from_spec(spec)
    grid = next(x for x in rep.blocks if type(x).__name__ == "PanelGrid")
    assert "'idbase'" in str(grid.runsets[0].filters) and "'idlr'" in str(grid.runsets[0].filters)
    assert [type(x).__name__ for x in rep.blocks] == ["H1", "H2", "MarkdownBlock", "H2", "PanelGrid", "H2", "CodeBlock"]
    # publishing while offline: one line, exit 2, the staged spec kept as it was
    before = open(spec_path).read()
    assert report.main(["--publish", spec_path]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"decm.report: error: --publish needs W&B online (set WANDB_API_KEY or run `wandb login`); "
                   f"{spec_path} is kept"]
    assert open(spec_path).read() == before
