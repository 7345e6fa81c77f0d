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


def newest_step(run_dir: str) -> int | None:
    """Step of the newest valid checkpoint in `<run_dir>/checkpoints` (the one training resumes from;
    read memory-mapped, so cheap for large ones), or None when there is none."""
    from decm import checkpoint, sharded_checkpoint

    ckpt_dir = os.path.join(run_dir, "checkpoints")
    steps = [checkpoint.step_of(p) for p in checkpoint.candidates(ckpt_dir) if checkpoint.is_valid(p)]
    steps += [sharded_checkpoint.step_of(p) for p in sharded_checkpoint.candidates(ckpt_dir)
              if sharded_checkpoint.is_valid(p)]  # sentinel, listing and metadata (small files)
    return max(steps) if steps else None


def same_stem_runs(run_dir: str, gin_files) -> list[str]:
    """Other run directories of the same last gin file under the same root (`<stem>`, `<stem>-<hash>`),
    newest first: what a launch with changed bindings may have meant to continue."""
    import re

    root, stem = os.path.dirname(run_dir) or ".", os.path.splitext(os.path.basename(gin_files[-1]))[0]
    pattern = re.compile(re.escape(stem) + r"(-[0-9a-f]{8})?$")
    try:
        names = os.listdir(root)
    except OSError:
        return []
    found = [os.path.join(root, n) for n in names if pattern.match(n) and os.path.join(root, n) != run_dir
             and os.path.isfile(os.path.join(root, n, "config.gin"))]
    return sorted(found, key=lambda d: os.path.getmtime(os.path.join(d, "config.gin")), reverse=True)


def start_lines(run_dir: str, gin_files, default_dir: bool) -> list[str]:
    """What a launch says before it runs: 'new run in DIR' or 'resuming DIR from step N'; for a new run
    under the default name, how to continue an existing run of the same gin file instead."""
    step = newest_step(run_dir)
    if step is not None:
        return [f"[decm] resuming {run_dir} from step {step}"]
    lines = [f"[decm] new run in {run_dir}"]
    others = same_stem_runs(run_dir, gin_files) if default_dir and gin_files else []
    if others:
        other = others[0]
        at = newest_step(other)
        more = f" (and {len(others) - 1} more)" if len(others) > 1 else ""
        lines.append(f"[decm] {other}{more} holds a run of the same gin file "
                     f"({'at step ' + str(at) if at is not None else 'no checkpoint yet'}) with other bindings; "
                     f"to continue it with these bindings instead, add --run-dir {other} --force")
    return lines


# The loop-level configurables users bind most (besides the registered components).
CONFIGURABLES = ("experiment", "train", "evaluate", "wandb", "cluster")


def _configurable(name: str):
    """The gin Configurable for `name` ('train', 'losses.cm_loss', 'cm_loss'); KeyError if none."""
    import gin.config

    from decm.job import parse

    parse([], [])  # imports and registers everything
    try:
        found = gin.config._REGISTRY.get_match(name)  # noqa: SLF001 — gin has no public lookup
    except (KeyError, ValueError):
        found = None
    if found is not None:
        return found
    from decm.job import configurable_names, suggestion

    raise KeyError(f"no configurable named {name!r}{suggestion(name, configurable_names())}; see --list")


def arg_docs(fn) -> dict[str, str]:
    """{parameter: text} from a Google-style `Args:` section (continuation lines joined)."""
    import inspect
    import re

    doc = inspect.getdoc(fn) or ""
    out, current, in_args = {}, None, False
    for line in doc.splitlines():
        if line.strip() == "Args:":
            in_args = True
            continue
        if in_args:
            if line and not line.startswith(" "):
                break
            m = re.match(r"^  (\w+)(?: \([^)]*\))?: ?(.*)$", line)
            if m:
                current = m.group(1)
                out[current] = m.group(2).strip()
            elif current and line.strip():
                out[current] += " " + line.strip()
    return out


def describe(name: str) -> str:
    """One configurable's parameters, each with its default and its documentation."""
    import inspect

    c = _configurable(name)
    fn = c.wrapped.__init__ if inspect.isclass(c.wrapped) else c.wrapped
    docs = arg_docs(c.wrapped) or arg_docs(fn)
    denied = set(c.denylist or ())
    from decm import registry

    lines = [f"{c.module + '.' if c.module in registry.KINDS else ''}{c.name}"
             f": {(inspect.getdoc(c.wrapped) or '(undocumented)').splitlines()[0]}", ""]
    for pname, par in inspect.signature(fn).parameters.items():
        if pname in ("self",) or pname in denied or par.kind in (par.VAR_POSITIONAL, par.VAR_KEYWORD):
            continue
        import gin

        default = "REQUIRED" if par.default is inspect.Parameter.empty or par.default is gin.REQUIRED else repr(par.default)
        lines.append(f"  {pname} = {default}")
        if docs.get(pname):
            lines.append(f"      {docs[pname]}")
    return "\n".join(lines)


def configurables_listing() -> str:
    """The loop-level configurables with their one-line docs (bind as `train.steps = …`)."""
    import inspect

    lines = ["configurables (python -m decm.launch --list NAME for parameters and defaults):"]
    for name in CONFIGURABLES:
        c = _configurable(name)
        lines.append(f"  {name:<24} {(inspect.getdoc(c.wrapped) or '(undocumented)').splitlines()[0]}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    from decm import cli

    p = cli.parser("python -m decm.launch", __doc__)
    p.add_argument("--gin", action="append", default=[], metavar="FILE", help="gin file (repeatable, in order)")
    p.add_argument("--bind", action="append", default=[], metavar="BINDING", help="gin binding 'X.y = z' (repeatable)")
    p.add_argument("--run-dir", default=None, help="run directory (default: runs/<gin stem>[-<bindings hash>])")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config, build every object, train nothing")
    p.add_argument("--force", action="store_true", help="resume even if the gin config differs from the run's snapshot")
    p.add_argument("--list", nargs="?", const="", default=None, metavar="NAME",
                   help="list registered components and the configurables users bind most, and exit; "
                        "--list NAME prints one configurable's parameters with defaults and docs "
                        "(e.g. --list train, --list losses.cm_loss)")
    p.add_argument("--backend", default=None, choices=("local", "local-subprocess", "slurm"),
                   help="where to run (None: cluster.backend from gin, else local)")
    p.add_argument("--wait", action="store_true", help="with a submitit backend: wait for the job and print its summary")
    return p


def print_memory_estimate(summary: dict, world: int) -> None:
    """The dry run's per-GPU (per-rank) training-state estimate of each training stage (decm.memory)."""
    from decm import memory
    from decm.parallel import resolve

    for name, stage in summary.items():
        if not isinstance(stage, dict) or "shard_profile" not in stage:
            continue
        mode = stage["parallel"] if stage["parallel"] != "auto" else ("ddp" if world > 1 else "none")
        if world < 2 and mode in ("ddp", "fsdp"):
            mode = resolve(mode, world)  # the one-line error a real launch would give
        print(f"# {name}: " + memory.describe(stage["shard_profile"], world, mode, stage["teacher_shard_profile"],
                                               stage["shard_teacher"] and mode == "fsdp", stage.get("phema_profiles", 0)))


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from decm import registry
    from decm.cluster import (SchedulerError, check_scheduler, cluster, folder_for, sbatch_script, submission_error,
                              submit, with_backend)
    from decm.distributed import env_ranks
    from decm.job import (USER_ERRORS, ConfigError, RunSpec, build, check_not_only_diffs, cli_error, parse, prepare, run,
                          wait_for_snapshot)

    if args.list is not None:
        if not args.list:
            print(registry.listing() + "\n" + configurables_listing())
            return 0
        try:
            print(describe(args.list))
        except KeyError as e:
            print(f"decm.launch: error: {e.args[0]}", file=sys.stderr)
            return 2
        return 0
    if not args.gin:
        print("decm.launch: error: give at least one --gin FILE (or --list)", file=sys.stderr)
        return 2
    run_dir = args.run_dir or default_run_dir(args.gin, args.bind)
    spec = RunSpec(tuple(args.gin), tuple(args.bind), run_dir, args.force)
    try:
        check_not_only_diffs(spec.gin_files)
        config = parse(spec.gin_files, spec.bindings)
        resources = with_backend(cluster(), args.backend)
        if args.dry_run:
            summary = build(run_dir)
            print(config)
            shown = {k: ({a: b for a, b in v.items() if not a.endswith("shard_profile")} if isinstance(v, dict) else v)
                     for k, v in summary.items()}  # the shard profiles feed the estimate below
            print(json.dumps({"run_dir": run_dir, "backend": resources.backend, "dry_run": shown},
                             indent=2, default=str))
            world = (env_ranks() or (0, 1, 0))[1]
            if resources.backend == "slurm":
                print("\n# sbatch script submitit would submit:\n" + sbatch_script(resources, run_dir))
                world = resources.nodes * resources.tasks
            elif resources.backend == "local-subprocess":
                print(f"\n# submitit LocalExecutor: {resources.tasks} task(s), timeout {resources.timeout_min} min")
                world = resources.tasks
            print_memory_estimate(summary, world)
            return 0
        if resources.backend == "slurm":
            build(run_dir, require_inputs=True)  # missing inputs first: they are the user's to fix either way
            check_scheduler()  # before anything is written
        rank = (env_ranks() or (0, 1, 0))[0]
        created = [p for p in (run_dir, folder_for(resources, run_dir)) if not os.path.exists(p)]
        starting = []  # 'new run in DIR' / 'resuming DIR from step N' (rank 0)
        if rank == 0:
            starting = start_lines(run_dir, spec.gin_files, default_dir=args.run_dir is None)
            prepare(spec)
        else:
            wait_for_snapshot(spec, config)
        if resources.backend == "local":
            if starting:
                print("\n".join(starting), file=sys.stderr, flush=True)
            summary = run(spec)
        else:
            try:
                job = submit(spec, resources)
            except Exception as e:  # noqa: BLE001 — any submission failure: one line, and remove what this launch created
                for path in created:
                    shutil.rmtree(path, ignore_errors=True)
                raise submission_error(e) from None
            if starting:
                print("\n".join(starting), file=sys.stderr, flush=True)
            print(f"submitted {resources.backend} job {job.job_id}; run directory {run_dir}; "
                  f"logs {folder_for(resources, run_dir)}/{job.job_id}/")
            if not args.wait:
                return 0
            try:
                summary = job.result()
            except KeyboardInterrupt as e:  # Slurm: only the waiting stops, the job goes on
                if resources.backend != "slurm":  # a local subprocess got the Ctrl-C too and saved a checkpoint
                    from decm.cli import interrupted

                    return interrupted("decm.launch", e)
                print(f"\ndecm.launch: stopped waiting; {resources.backend} job {job.job_id} keeps running "
                      f"(its log: {folder_for(resources, run_dir)}/{job.job_id}/)", file=sys.stderr)
                return 130
    except (*USER_ERRORS, SchedulerError) as e:
        return cli_error("decm.launch", e)
    except KeyboardInterrupt as e:  # Ctrl-C: the loop saved a checkpoint at its step boundary
        from decm.cli import interrupted

        return interrupted("decm.launch", e)
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
