"""decm launcher: `python -m decm.launch --gin gin/quickstart.gin [--bind 'X.y = z'] [--dry-run]`.

Bad input (missing gin file, unknown binding, wrong value, impossible shapes) prints one line and exits
with code 2 before any run directory is created. Rerunning the same command resumes the same run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys


def default_run_dir(gin_files, bindings, root: str = "runs") -> str:
    """runs/<last gin file stem>[-<hash of the bindings>]: the same command maps to the same run."""
    stem = os.path.splitext(os.path.basename(gin_files[-1]))[0] if gin_files else "run"
    if bindings:
        stem += "-" + hashlib.sha256("\n".join(bindings).encode()).hexdigest()[:8]
    return os.path.join(root, stem)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m decm.launch", description=__doc__.splitlines()[0])
    p.add_argument("--gin", action="append", default=[], metavar="FILE", help="gin file (repeatable, in order)")
    p.add_argument("--bind", action="append", default=[], metavar="BINDING", help="gin binding 'X.y = z' (repeatable)")
    p.add_argument("--run-dir", default=None, help="run directory (default: runs/<gin stem>[-<bindings hash>])")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config, build every object, train nothing")
    p.add_argument("--force", action="store_true", help="resume even if the gin config differs from the run's snapshot")
    p.add_argument("--list", action="store_true", help="list registered components by kind and exit")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from decm import registry
    from decm.job import ConfigError, RunSpec, build, one_line, parse, prepare, run

    if args.list:
        print(registry.listing())
        return 0
    if not args.gin:
        print("decm.launch: error: give at least one --gin FILE (or --list)", file=sys.stderr)
        return 2
    run_dir = args.run_dir or default_run_dir(args.gin, args.bind)
    spec = RunSpec(tuple(args.gin), tuple(args.bind), run_dir, args.force)
    try:
        if args.dry_run:
            config = parse(spec.gin_files, spec.bindings)
            summary = build(run_dir)
            print(config)
            print(json.dumps({"run_dir": run_dir, "dry_run": summary}, indent=2, default=str))
            return 0
        prepare(spec)
        summary = run(spec)
    except ConfigError as e:
        print(f"decm.launch: error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"decm.launch: error: {one_line(e)}", file=sys.stderr)
        return 2
    print_summary(run_dir, summary)
    return 0


def print_summary(run_dir: str, summary: dict) -> None:
    print(f"\nrun directory: {run_dir}")
    for stage in ("teacher", "distill"):
        if stage in summary:
            s = summary[stage]
            print(f"  {stage}: step {s['step']}/{s['steps']} in {s['seconds']:.1f}s → {s['run_dir']}")
    if "evaluate" in summary:
        print(f"  metrics: {os.path.join(run_dir, 'metrics.json')}")
        for who in ("student", "teacher"):
            for nfe, m in summary["evaluate"][who].items():
                print(f"    {who:<8} NFE {nfe:>3}: " + ", ".join(f"{k}={v:.4f}" for k, v in m.items()))
        print(f"  samples: {os.path.join(run_dir, 'samples.png')}")


if __name__ == "__main__":
    sys.exit(main())
