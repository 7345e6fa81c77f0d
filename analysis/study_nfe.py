"""Every trial of a tuning study at each NFE: which settings make the chain's metric rise or fall with steps.

    python analysis/study_nfe.py SWEEP_DIR [SWEEP_DIR ...] --out analysis/results/<name> [--metric fid]

A study (`python sweeps/weight_sweep.py` or `analysis/ablation_table.py --tune`) scores each trial by one
number, the mean over NFE; this script reads each finished trial's own `metrics.json` instead and lists
the student's metric at every NFE it was evaluated at, next to the trial's parameters. The last column
says whether the metric rises from the smallest to the largest NFE (worse with more steps) — on digits it
answers whether any of the explored settings (for DE-CM: λ, γ, δ, the N2N period and weight, the r-decay
length, w′) turns the rise around. Writes `<out>/table.md`, `table.csv` and `results.json` (each trial's
parameters and metrics, the count of rising trials, the elapsed seconds of the command).
"""

from __future__ import annotations

import csv
import json
import os
import sys
import time


def load_study(sweep_dir: str, metric: str) -> list[dict]:
    """The study's finished trials: number, parameters (as trials.csv holds them) and metric per NFE."""
    path = os.path.join(sweep_dir, "trials.csv")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{sweep_dir} has no trials.csv (not a sweep directory, or not finalized yet)")
    trials = []
    with open(path) as f:
        for row in csv.DictReader(f):
            metrics_path = os.path.join(row["run_dir"], "metrics.json")
            if row["state"] != "COMPLETE" or not os.path.exists(metrics_path):
                continue
            with open(metrics_path) as m:
                student = json.load(m)["student"]
            params = {k[len("param:"):]: v for k, v in row.items() if k.startswith("param:") and v != ""}
            by_nfe = {int(k): float(v[metric]) for k, v in student.items() if metric in v}
            trials.append({"number": int(row["number"]), "params": params, "value": float(row["value"]),
                           "metric": by_nfe, "run_dir": row["run_dir"]})
    return sorted(trials, key=lambda t: t["number"])


def short(name: str) -> str:
    """A binding's last two dotted parts, scope kept: `n2n/objectives.term.weight` → `n2n/term.weight`."""
    scope, _, selector = name.rpartition("/")
    tail = ".".join(selector.split(".")[-2:])
    return f"{scope}/{tail}" if scope else tail


def number(text: str) -> str:
    try:
        v = float(text)
    except ValueError:
        return text
    return str(int(v)) if v.is_integer() and "." not in text else f"{v:.3g}"


def table(studies: dict, metric: str, digits: int) -> tuple[str, int, int]:
    """One markdown table per study; returns the text and (rising, total) trial counts over all studies."""
    out, rising, total = [], 0, 0
    for name, trials in studies.items():
        nfes = sorted({k for t in trials for k in t["metric"]})
        params = sorted({p for t in trials for p in t["params"]})
        head = ["trial"] + [short(p) for p in params] + [f"{metric} NFE {k}" for k in nfes] + ["rises with NFE"]
        out += [f"## {name}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for t in trials:
            vals = [t["metric"].get(k) for k in nfes]
            rises = None not in (vals[0], vals[-1]) and vals[-1] > vals[0]
            rising, total = rising + rises, total + 1
            cells = [str(t["number"])] + [number(t["params"].get(p, "")) for p in params]
            cells += ["–" if v is None else f"{v:.{digits}f}" for v in vals] + ["yes" if rises else "no"]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out), rising, total


def main(argv=None) -> int:
    from decm import cli

    p = cli.parser("python analysis/study_nfe.py", __doc__)
    p.add_argument("sweeps", nargs="+", help="sweep directories (each with trials.csv)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--metric", default="fid", help="metric key in each trial's metrics.json (fid, sw2, …)")
    p.add_argument("--digits", type=int, default=1, help="decimals printed")
    args = p.parse_args(argv)
    t0 = time.time()
    try:
        studies = {os.path.basename(os.path.normpath(d)): load_study(d, args.metric) for d in args.sweeps}
    except (FileNotFoundError, KeyError, ValueError) as e:
        print(f"study_nfe: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    if not any(studies.values()):
        print("study_nfe: error: no finished trial in the given studies", file=sys.stderr)
        return 2
    text, rising, total = table(studies, args.metric, args.digits)
    md = (f"# {args.metric} of every finished tuning trial at each NFE (student, flow-map chain)\n\n{text}\n"
          f"{rising} of {total} trials get worse from the smallest to the largest NFE.\n")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(md)
    with open(os.path.join(args.out, "table.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["study", "trial", "param", "value"])
        for name, trials in studies.items():
            for t in trials:
                w.writerows([name, t["number"], k, v] for k, v in t["params"].items())
                w.writerows([name, t["number"], f"{args.metric}@{n}", v] for n, v in t["metric"].items())
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"studies": studies, "metric": args.metric, "rising": rising, "trials": total,
                   "sweeps": args.sweeps, "seconds": time.time() - t0}, f, indent=2)
    print(md + f"\n→ {args.out}/table.md, table.csv, results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
