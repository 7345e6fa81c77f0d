"""Local report across runs: `python -m decm.report RUN_DIR [RUN_DIR ...] --out report/`.

Writes a self-contained `report.md` with figures under `figures/`: the metric-vs-NFE table (every
run × model × sampler × NFE, from each run's newest evaluation), the metric-vs-NFE plot, the loss
curves (stats.jsonl; one panel per loss term, one line per run), each run's sample grid, and the gin
diff of every run against the first (statement level). With `--wandb-report` the same content is built
as a W&B Report (wandb-workspaces) over exactly these runs: published at once when W&B is online;
offline, its spec is staged as `<out>/wandb_report.json` and published later, after `wandb sync` of the
runs, with `python -m decm.report --publish <out>/wandb_report.json`.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import sys

from decm.plots import line_panels
from decm.tracking import read_stats


def newest_metrics(run_dir: str) -> tuple[str | None, dict | None]:
    """(directory, metrics dict) of the run's newest evaluation: eval-step*/ (highest step) or the run dir."""
    cands = []
    for path in glob.glob(os.path.join(run_dir, "eval-step*", "metrics.json")) + [os.path.join(run_dir, "metrics.json")]:
        if os.path.exists(path):
            with open(path) as f:
                m = json.load(f)
            cands.append((int(m.get("step", 0)), path.endswith(os.path.join(run_dir, "metrics.json")), path, m))
    if not cands:
        return None, None
    cands.sort(key=lambda c: (c[0], not c[1]))
    return os.path.dirname(cands[-1][2]), cands[-1][3]


def rows_of(metrics: dict) -> list[dict]:
    """Sweep rows; older metrics.json files without `rows` are read from their student/teacher maps."""
    if metrics.get("rows"):
        return metrics["rows"]
    out = []
    for who in ("student", "teacher"):
        for nfe, m in metrics.get(who, {}).items():
            out.append({"model": who, "sampler": "chain" if who == "student" else "teacher_euler", "nfe": int(nfe), **m})
    return out


def gin_diff(base: str, other: str) -> list[str]:
    """Statement-level diff: '- stmt' only in `base`, '+ stmt' only in `other` (sorted by selector)."""
    import re

    from decm.experiment import gin_statements

    def statements(config):  # continuation backslashes of gin's line-wrapped values dropped
        return {re.sub(r"\s*\\\s+", " ", st) for st in gin_statements(config)}

    a, b = statements(base), statements(other)
    lines = [("- ", s) for s in a - b] + [("+ ", s) for s in b - a]
    lines.sort(key=lambda p: (p[1].split("=", 1)[0].strip(), p[0] == "+ "))
    return [sign + s for sign, s in lines]


def collect(run_dirs) -> list[dict]:
    runs = []
    for d in run_dirs:
        if not os.path.isfile(os.path.join(d, "config.gin")):
            raise FileNotFoundError(f"{d} is not a run directory (no config.gin)")
        eval_dir, metrics = newest_metrics(d)
        with open(os.path.join(d, "config.gin")) as f:
            config = f.read()
        name = os.path.basename(os.path.abspath(d))
        runs.append({"name": name, "dir": d, "config": config, "stats": read_stats(d), "metrics": metrics,
                     "rows": rows_of(metrics) if metrics else [], "eval_dir": eval_dir})
    names = [r["name"] for r in runs]
    for r in runs:  # unique display names
        if names.count(r["name"]) > 1:
            r["name"] = r["dir"].strip("/").replace("/", "_")
    return runs


def metric_names(runs) -> list[str]:
    keys = []
    for r in runs:
        for row in r["rows"]:
            keys += [k for k in row if k not in ("model", "sampler", "nfe") and not k.endswith("_std")]
    return list(dict.fromkeys(keys))


def loss_keys(runs) -> list[str]:
    keys = [k for r in runs for rec in r["stats"] for k in rec if k.startswith("loss/")]
    keys = list(dict.fromkeys(keys))
    return (["loss/total"] if "loss/total" in keys else []) + sorted(k for k in keys if k != "loss/total")


def plot_losses(runs, path: str) -> bool:
    """Every loss/* key of the runs' stats vs step (log y when the values span decades), one panel per key,
    one legend beside the panels. Each run's values belong to its own objective, so the y label claims
    no comparison across runs."""
    panels = {key: [(r["name"], [(rec["step"], rec[key]) for rec in r["stats"] if key in rec]) for r in runs]
              for key in loss_keys(runs)}
    return line_panels(panels, path, xlabel="training step", ylabel="value in the run's own objective",
                       panel_size=(3.6, 3.0), title_fontsize=9, legend="figure")


def plot_nfe(runs, path: str) -> bool:
    """Metric vs NFE (ticks at the NFEs used), one line per run × model × sampler, one panel per metric."""
    panels = {}
    for metric in metric_names(runs):
        panels[metric] = [
            (f"{r['name']} · {key[0]} · {key[1]}",
             sorted((row["nfe"], row[metric]) for row in r["rows"] if (row["model"], row["sampler"]) == key and metric in row))
            for r in runs for key in dict.fromkeys((row["model"], row["sampler"]) for row in r["rows"])]
    nfes = sorted({row["nfe"] for r in runs for row in r["rows"]})
    return line_panels(panels, path, xlabel="NFE (function evaluations)", xlog="auto", marker="o", xticks=nfes)


def table_markdown(runs) -> str:
    metrics = metric_names(runs)
    head = "| run | model | sampler | NFE | " + " | ".join(metrics) + " |"
    lines = [head, "|" + "---|" * (4 + len(metrics))]
    for r in runs:
        for row in r["rows"]:
            vals = [f"{row[m]:.4g}" if isinstance(row.get(m), (int, float)) else "" for m in metrics]
            lines.append(f"| {r['name']} | {row['model']} | {row['sampler']} | {row['nfe']} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def write_report(run_dirs, out: str) -> str:
    """Writes out/report.md + out/figures/*.png; returns the report path."""
    runs = collect(run_dirs)
    fig_dir = os.path.join(out, "figures")
    os.makedirs(fig_dir, exist_ok=True)
    md = [f"# DE-CM report: {', '.join(r['name'] for r in runs)}", ""]
    md += ["| run | directory | step | evaluation |", "|---|---|---|---|"]
    for r in runs:
        step = r["metrics"]["step"] if r["metrics"] else (r["stats"][-1]["step"] if r["stats"] else 0)
        where = "—" if not r["eval_dir"] else ("in the run directory" if os.path.samefile(r["eval_dir"], r["dir"])
                                               else f"`{os.path.relpath(r['eval_dir'], r['dir'])}/`")
        md.append(f"| {r['name']} | `{r['dir']}` | {step} | {where} |")
    md += ["", "## Metrics vs NFE", ""]
    if any(r["rows"] for r in runs):
        md += [table_markdown(runs), ""]
        if plot_nfe(runs, os.path.join(fig_dir, "nfe.png")):
            md += ["![metric vs NFE](figures/nfe.png)", ""]
    else:
        md += ["No evaluation found (run `python -m decm.evaluate RUN_DIR`).", ""]
    md += ["## Loss curves", ""]
    md += ["Each run's losses are terms of its own objective: compare trends across runs, and levels only "
           "between runs whose objectives agree (same terms, weights and normalisation).", "",
           "![losses](figures/losses.png)", ""] if plot_losses(runs, os.path.join(fig_dir, "losses.png")) else \
          ["No stats.jsonl records.", ""]
    md += ["## Samples", ""]
    for r in runs:
        src = os.path.join(r["eval_dir"] or r["dir"], "samples.png")
        if os.path.exists(src):
            shutil.copyfile(src, os.path.join(fig_dir, f"{r['name']}-samples.png"))
            md += [f"**{r['name']}**", "", f"![{r['name']} samples](figures/{r['name']}-samples.png)", ""]
    md += ["## Gin diff (against the first run)", ""]
    for r in runs[1:]:
        diff = gin_diff(runs[0]["config"], r["config"])
        md += [f"**{runs[0]['name']} → {r['name']}**", "", "```diff", *(diff or ["(identical)"]), "```", ""]
    if len(runs) == 1:
        md += ["(one run)", ""]
    path = os.path.join(out, "report.md")
    with open(path + ".tmp", "w") as f:
        f.write("\n".join(md))
    os.replace(path + ".tmp", path)
    return path


SPEC_NAME = "wandb_report.json"  # the staged W&B report, beside report.md


def report_spec(run_dirs, project: str = "decm", entity: str | None = None) -> dict:
    """The W&B Report's content as plain data (no network): title, the runs' W&B ids, and blocks —
    the metric table, one loss panel per loss key over exactly these runs, the gin diffs."""
    runs = collect(run_dirs)
    ids = []
    for r in runs:
        path = os.path.join(r["dir"], "wandb_id")
        if os.path.exists(path):
            with open(path) as f:
                ids.append(f.read().strip())
    blocks = [{"type": "h1", "text": f"DE-CM report: {', '.join(r['name'] for r in runs)}"},
              {"type": "h2", "text": "Metrics vs NFE"}, {"type": "markdown", "text": table_markdown(runs)},
              {"type": "h2", "text": "Loss curves"},
              {"type": "panels", "plots": [{"title": k, "x": "distill/step", "y": [f"distill/{k}"], "log_y": True}
                                           for k in loss_keys(runs)]},
              {"type": "h2", "text": "Gin diff (against the first run)"}]
    for r in runs[1:]:
        blocks.append({"type": "code", "language": "markdown",
                       "code": "\n".join(gin_diff(runs[0]["config"], r["config"])) or "(identical)"})
    return {"format": "decm-wandb-report-v1", "title": "DE-CM report", "project": project, "entity": entity or "",
            "run_dirs": [r["dir"] for r in runs], "run_ids": ids, "blocks": blocks}


def report_from_spec(spec: dict):
    """The wandb-workspaces Report object of a spec (built offline; `.save()` publishes it)."""
    import wandb_workspaces.reports.v2 as wr

    if spec.get("format") != "decm-wandb-report-v1":
        raise ValueError(f"not a staged decm W&B report (format {spec.get('format')!r})")
    ids = ", ".join(repr(i) for i in spec["run_ids"])
    runset = wr.Runset(entity=spec["entity"], project=spec["project"], name="runs",
                       **({"filters": f"Metric('ID') in [{ids}]"} if ids else {}))  # exactly the report's runs
    make = {"h1": lambda b: wr.H1(text=b["text"]), "h2": lambda b: wr.H2(text=b["text"]),
            "markdown": lambda b: wr.MarkdownBlock(text=b["text"]),
            "code": lambda b: wr.CodeBlock(code=b["code"], language=b["language"]),
            "panels": lambda b: wr.PanelGrid(runsets=[runset], panels=[
                wr.LinePlot(title=p["title"], x=p["x"], y=list(p["y"]), log_y=p["log_y"]) for p in b["plots"]])}
    return wr.Report(project=spec["project"], entity=spec["entity"], title=spec["title"],
                     blocks=[make[b["type"]](b) for b in spec["blocks"]])


def build_wandb_report(run_dirs, project: str = "decm", entity: str | None = None):
    """The W&B Report object (wandb-workspaces) with the local report's content; `.save()` publishes it."""
    return report_from_spec(report_spec(run_dirs, project, entity))


def stage_wandb_report(run_dirs, out: str, project: str = "decm", entity: str | None = None) -> str:
    """Writes the report's spec to `<out>/wandb_report.json` (atomically); returns its path."""
    spec = report_spec(run_dirs, project, entity)
    report_from_spec(spec)  # every block builds: a spec that stages also publishes
    path = os.path.join(out, SPEC_NAME)
    os.makedirs(out, exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(spec, f, indent=2)
    os.replace(path + ".tmp", path)
    return path


def publish(spec_path: str) -> str:
    """Publishes a staged report (needs W&B online, and the runs uploaded); returns its URL, which is
    also recorded in the spec file."""
    from decm.wandb_log import resolve_mode

    if not os.path.isfile(spec_path):
        raise FileNotFoundError(f"no staged W&B report at {spec_path} (make one with --wandb-report)")
    with open(spec_path) as f:
        spec = json.load(f)
    report = report_from_spec(spec)
    if resolve_mode(None) != "online":
        raise ValueError(f"--publish needs W&B online (set WANDB_API_KEY or run `wandb login`); {spec_path} is kept")
    report.save()
    spec["published_url"] = report.url
    with open(spec_path + ".tmp", "w") as f:
        json.dump(spec, f, indent=2)
    os.replace(spec_path + ".tmp", spec_path)
    return report.url


def offline_folders(run_dirs) -> list[str]:
    """The runs' offline W&B folders (what `wandb sync` uploads)."""
    return sorted(p for d in run_dirs for p in glob.glob(os.path.join(d, "wandb", "offline-run-*")))


def main(argv=None) -> int:
    from decm import cli

    p = cli.parser("python -m decm.report", __doc__)
    p.add_argument("run_dirs", nargs="*", help="run directories")
    p.add_argument("--out", default="report", help="output directory")
    p.add_argument("--wandb-report", action="store_true",
                   help=f"also build a W&B Report: published at once when W&B is online, else staged as "
                        f"<out>/{SPEC_NAME} for --publish")
    p.add_argument("--publish", default=None, metavar="SPEC",
                   help=f"publish a staged report (<out>/{SPEC_NAME}) once online, after `wandb sync` of its runs")
    p.add_argument("--project", default="decm", help="W&B project of the report")
    p.add_argument("--entity", default=None, help="W&B entity of the report (default: the key's default)")
    args = p.parse_args(argv)
    try:
        if args.publish:
            if args.run_dirs or args.wandb_report:
                raise ValueError("--publish takes only the staged spec (no run directories, no --wandb-report)")
            print(f"W&B report → {publish(args.publish)}")
            return 0
        if not args.run_dirs:
            raise ValueError("give at least one run directory (or --publish SPEC)")
        path = write_report(args.run_dirs, args.out)
        print(f"report → {path}")
        if args.wandb_report:
            from decm.wandb_log import resolve_mode, sync_command

            spec_path = stage_wandb_report(args.run_dirs, args.out, args.project, args.entity)
            if resolve_mode(None) == "online":
                print(f"W&B report → {publish(spec_path)}")
            else:
                folders = offline_folders(args.run_dirs)
                sync = f"{sync_command(folders)} && " if folders else ""
                print(f"W&B report staged → {spec_path} (W&B is offline); once online, publish it with:\n"
                      f"  {sync}python -m decm.report --publish {spec_path}")
    except (FileNotFoundError, ValueError) as e:
        print(f"decm.report: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
