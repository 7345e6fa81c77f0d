"""decm launcher: `python -m decm.launch --gin gin/quickstart.gin [--bind 'X.y = z'] [--dry-run]`.

Backends (`--backend` or `cluster.backend` in gin): `local` runs in this process (default; also one
rank under torchrun), `local-subprocess` submits to submitit's local executor, `slurm` submits an sbatch
job through submitit with the `cluster.*` resources (gin/cluster/*.gin). The submitted object is plain
data; the job re-parses `<run_dir>/config.gin`.

Bad input (missing gin file, unknown binding, wrong value, impossible shapes, missing latents or
teacher checkpoint) prints one line and exits with code 2 before any run directory is created or any
job is submitted. Rerunning the same command resumes the same run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
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
    p.add_argument("--backend", default=None, choices=("local", "local-subprocess", "slurm"),
                   help="where to run (default: cluster.backend from gin, else local)")
    p.add_argument("--wait", action="store_true", help="with a submitit backend: wait for the job and print its summary")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from decm import registry
    from decm.cluster import cluster, folder_for, sbatch_script, submit, with_backend
    from decm.distributed import env_ranks
    from decm.job import USER_ERRORS, ConfigError, RunSpec, build, cli_error, parse, prepare, run, wait_for_snapshot

    if args.list:
        print(registry.listing())
        return 0
    if not args.gin:
        print("decm.launch: error: give at least one --gin FILE (or --list)", file=sys.stderr)
        return 2
    run_dir = args.run_dir or default_run_dir(args.gin, args.bind)
    spec = RunSpec(tuple(args.gin), tuple(args.bind), run_dir, args.force)
    try:
        config = parse(spec.gin_files, spec.bindings)
        resources = with_backend(cluster(), args.backend)
        if args.dry_run:
            summary = build(run_dir)
            print(config)
            print(json.dumps({"run_dir": run_dir, "backend": resources.backend, "dry_run": summary},
                             indent=2, default=str))
            if resources.backend == "slurm":
                print("\n# sbatch script submitit would submit:\n" + sbatch_script(resources, run_dir))
            elif resources.backend == "local-subprocess":
                print(f"\n# submitit LocalExecutor: {resources.tasks} task(s), timeout {resources.timeout_min} min")
            return 0
        if resources.backend == "slurm" and shutil.which("sbatch") is None:
            build(run_dir, require_inputs=True)  # missing inputs first: they are the user's to fix either way
            raise ConfigError("backend 'slurm' needs Slurm (sbatch not found on PATH on this machine); run here with "
                              "--backend local, or see the sbatch script with --dry-run")
        rank = (env_ranks() or (0, 1, 0))[0]
        if rank == 0:
            prepare(spec)
        else:
            wait_for_snapshot(spec, config)
        if resources.backend == "local":
            summary = run(spec)
        else:
            job = submit(spec, resources)
            print(f"submitted {resources.backend} job {job.job_id}; run directory {run_dir}; "
                  f"logs {folder_for(resources, run_dir)}/{job.job_id}/")
            if not args.wait:
                return 0
            summary = job.result()
    except USER_ERRORS as e:
        return cli_error("decm.launch", e)
    if rank == 0:
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
