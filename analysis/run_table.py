"""One run's evaluation as a committed result: its metrics and wall times, and the table docs/results/ shows.

    python analysis/run_table.py RUN_DIR [RUN_DIR ...] --out analysis/results/<name> [--metric fid]

Copies each run's `metrics.json` and `summary.json` (which hold the stage wall times in seconds) into
`<out>/<run name>/` and writes `<out>/table.md`: one row per run × model (student: its first sampler,
teacher: Euler), one column per NFE, the metric printed with `--digits` decimals, plus the elapsed
seconds of every stage. With several runs (seeds) it adds a mean ± sample-sd row (ddof = 1).
The result pages under docs/results/ show these files' tables verbatim (docs/build_results.py fills them,
tests/test_readme.py holds them equal).
"""

from __future__ import annotations

import json
import os
import shutil
import sys

import numpy as np


def load_run(run_dir: str) -> dict:
    with open(os.path.join(run_dir, "metrics.json")) as f:
        metrics = json.load(f)
    summary = {}
    if os.path.exists(os.path.join(run_dir, "summary.json")):
        with open(os.path.join(run_dir, "summary.json")) as f:
            summary = json.load(f)
    return {"name": os.path.basename(os.path.abspath(run_dir)), "metrics": metrics, "summary": summary}


def table(runs: list[dict], metric: str, digits: int, labels: dict | None = None) -> str:
    """The markdown table (see module docstring)."""
    labels = labels or {"student": "student (chain)", "teacher": "teacher (Euler)"}
    nfes = sorted({int(k) for r in runs for who in ("student", "teacher") for k in r["metrics"].get(who, {})})
    head = ["run", "model"] + [f"NFE {k}" for k in nfes]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    values = {}
    for r in runs:
        for who in ("student", "teacher"):
            cells = []
            for k in nfes:
                v = r["metrics"].get(who, {}).get(str(k), {}).get(metric)
                cells.append("–" if v is None else f"{v:.{digits}f}")
                if v is not None:
                    values.setdefault((who, k), []).append(float(v))
            if any(c != "–" for c in cells):
                lines.append(f"| {r['name']} | {labels[who]} | " + " | ".join(cells) + " |")
    if len(runs) > 1:
        for who in ("student", "teacher"):
            cells = []
            for k in nfes:
                v = values.get((who, k), [])
                cells.append("–" if len(v) < 2 else f"{np.mean(v):.{digits}f} ± {np.std(v, ddof=1):.{digits}f}")
            if any(c != "–" for c in cells):
                lines.append(f"| mean ± sd ({len(runs)} runs) | {labels[who]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def times(runs: list[dict]) -> str:
    """'| run | teacher s | distill s |' table of the stage wall times in summary.json."""
    lines = ["| run | teacher stage (s) | distillation (s) |", "|---|---|---|"]
    for r in runs:
        s = r["summary"]
        cells = [f"{s[k]['seconds']:.0f}" if isinstance(s.get(k), dict) and "seconds" in s[k] else "–"
                 for k in ("teacher", "distill")]
        lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    from decm import cli

    p = cli.parser("python analysis/run_table.py", __doc__)
    p.add_argument("run_dirs", nargs="+", help="evaluated run directories (metrics.json)")
    p.add_argument("--out", required=True, help="result directory to write (e.g. analysis/results/quickstart)")
    p.add_argument("--metric", default="fid", help="metrics.json entry shown in the table")
    p.add_argument("--digits", type=int, default=1, help="decimals printed")
    args = p.parse_args(argv)
    try:
        runs = [load_run(d) for d in args.run_dirs]
    except FileNotFoundError as e:
        print(f"run_table: error: {e.filename} not found (evaluate the run first)", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    for d, r in zip(args.run_dirs, runs):
        os.makedirs(os.path.join(args.out, r["name"]), exist_ok=True)
        for f in ("metrics.json", "summary.json"):
            if os.path.exists(os.path.join(d, f)):
                shutil.copyfile(os.path.join(d, f), os.path.join(args.out, r["name"], f))
    md = [f"# {args.metric} (lower is better) by NFE", "", table(runs, args.metric, args.digits), "",
          "## Wall time", "", times(runs), ""]
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
