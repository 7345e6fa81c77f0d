"""Optuna sweep over gin bindings (DE-CM weights and hyper-parameters), locally or on Slurm.

    python sweeps/weight_sweep.py --gin sweeps/toy2d_sweep.gin --space sweeps/spaces/decm_weights.py \
        --trials 12 --workers 2 [--backend local|slurm] [--storage URL] [--study NAME]
    python sweeps/weight_sweep.py --study NAME --reap          # mark trials of dead workers FAIL

The space is validated with gin before anything runs; TPE (constant_liar, per-worker seeds) with a
median pruner fed by the training loop's snapshot evaluations (`--report-every` steps); storage is
a journal file in the sweep directory unless `--storage` names an RDB URL (never SQLite for parallel
workers). Workers are local processes or a Slurm job array (submitit; resources from
`--cluster-gin`). Each trial is its own run directory; failed or killed trials become FAIL and the
sweep goes on; rerunning the command resumes the study. Outputs in the sweep directory: best.gin,
trials.csv, history.png, slices.png, importances.png, summary.json. Dashboard:
`optuna-dashboard <sweep_dir>/journal.log` (journal) or the RDB URL.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


DEFAULT_GIN = "sweeps/toy2d_sweep.gin"  # the documented default study (2-D benchmark, DE-CM weight space)


def default_workers(backend: str) -> int:
    """Local: one worker per 2 CPU cores (each trains with the other core's threads too), 1 to 4; Slurm: 2."""
    return max(1, min(4, (os.cpu_count() or 1) // 2)) if backend == "local" else 2


def build_parser() -> argparse.ArgumentParser:
    from decm import cli

    p = cli.parser("python sweeps/weight_sweep.py", __doc__)
    p.add_argument("--gin", action="append", default=[],
                   help=f"experiment gin file (repeatable; none given: the default study, {DEFAULT_GIN})")
    p.add_argument("--bind", action="append", default=[], help="fixed extra binding (repeatable)")
    p.add_argument("--space", default="sweeps/spaces/decm_weights.py", help="space file (.py SPACE, .yaml, .json)")
    p.add_argument("--trials", type=int, default=12, help="finished (complete + pruned) trials to reach")
    p.add_argument("--workers", type=int, default=None,
                   help=f"parallel workers (default: local, one per 2 CPU cores, at most 4 — "
                        f"{default_workers('local')} here; slurm, 2)")
    p.add_argument("--backend", default="local", choices=("local", "slurm"),
                   help="workers as local processes or a Slurm job array")
    p.add_argument("--cluster-gin", default=None, help="cluster.* resources per Slurm worker")
    p.add_argument("--storage", default="", help="Optuna storage URL (default: journal file in the sweep dir)")
    p.add_argument("--study", default=None, help="study name (default: the last gin file's stem)")
    p.add_argument("--sweep-dir", default=None, help="default sweeps/runs/<study>")
    p.add_argument("--metric", default="student.1.sw2", help="metrics.json path to minimise")
    p.add_argument("--report-every", type=int, default=0, help="snapshot/prune period in steps (0: no pruning)")
    p.add_argument("--report-key", default="nfe1/sw2", help="snapshot record value reported to the pruner")
    p.add_argument("--seed", type=int, default=0, help="sampler seed (worker w: seed + w)")
    p.add_argument("--reap", action="store_true", help="only mark RUNNING trials of dead workers FAIL")
    p.add_argument("--worker-index", type=int, default=None, help=argparse.SUPPRESS)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    t0 = time.time()
    from decm import cli, sweep

    if args.workers is None:
        args.workers = default_workers(args.backend)

    if not args.gin and not args.reap and args.worker_index is None and args.study is None:
        args.gin = [DEFAULT_GIN]
        print(f"[sweep] no --gin given: the default study — {DEFAULT_GIN}, space {args.space}, {args.trials} trials, "
              f"{args.workers} {args.backend} worker{'s' if args.workers != 1 else ''}; outputs in sweeps/runs/toy2d_sweep/ (see --help)", flush=True)
    study_name = args.study or (os.path.splitext(os.path.basename(args.gin[-1]))[0] if args.gin else None)
    if not study_name:
        print("weight_sweep: error: give --gin FILE (or --study NAME for --reap)", file=sys.stderr)
        return 2
    sweep_dir = args.sweep_dir or os.path.join("sweeps", "runs", study_name)
    spec_path = os.path.join(sweep_dir, "sweep.json")
    if args.worker_index is not None:  # a local worker process
        with open(spec_path) as f:
            spec = sweep.SweepSpec.from_json(f.read())
        try:
            sweep.worker(spec, args.worker_index, args.workers)
        except KeyboardInterrupt as e:  # its trial is WAITING again: a rerun resumes it
            return cli.interrupted(f"weight_sweep worker {args.worker_index}", e)
        return 0
    try:
        if args.reap or not args.gin:
            if not os.path.exists(spec_path):
                raise sweep.SweepError(f"no sweep at {sweep_dir} (sweep.json missing)")
            with open(spec_path) as f:
                spec = sweep.SweepSpec.from_json(f.read())
        else:
            if args.trials < 1 or args.workers < 1:
                raise sweep.SweepError("--trials and --workers must be ≥ 1")
            spec = sweep.SweepSpec(tuple(args.gin), tuple(args.bind), sweep.load_space(args.space), sweep_dir,
                                   study_name, args.storage, args.trials, args.metric, args.report_every,
                                   args.report_key, args.seed)
            sweep.validate(spec)
            os.makedirs(sweep_dir, exist_ok=True)
            with open(spec_path + ".tmp", "w") as f:
                f.write(spec.to_json())
            os.replace(spec_path + ".tmp", spec_path)
        study = sweep.load_study(spec, 0, args.workers)
        dead = sweep.reap(study)
        if dead:
            print(f"[sweep] reaped trials {dead} (their workers are gone) → FAIL")
        if args.reap:
            return 0
        todo = spec.trials - sweep.finished(study)
        if todo > 0:
            workers = min(args.workers, todo)
            print(f"[sweep] {study_name}: {sweep.finished(study)}/{spec.trials} finished; {workers} {args.backend} "
                  f"worker(s) → {sweep_dir}", flush=True)
            if args.backend == "local":
                run_local(spec, workers, sweep_dir)
            else:
                run_slurm(spec, workers, args.cluster_gin)
            study = sweep.load_study(spec)
            dead = sweep.reap(study)
            if dead:
                print(f"[sweep] reaped trials {dead} → FAIL")
        summary = sweep.finalize(spec)
        summary["seconds_this_command"] = time.time() - t0  # wall time of this invocation (a rerun adds its own)
        with open(os.path.join(sweep_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2, default=str)
    except (sweep.SweepError, FileNotFoundError) as e:
        print(f"weight_sweep: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # the workers checkpointed their trials (WAITING: a rerun resumes them)
        return cli.interrupted("weight_sweep", e)
    print(json.dumps({k: v for k, v in summary.items() if k not in ("files", "failures")}, indent=2, default=str))
    if summary["best"] is None:
        print(f"weight_sweep: error: no trial completed ({summary['states']}); causes:", file=sys.stderr)
        for f in summary["failures"]:
            print(f"  trial {f['number']}: {f['error']} (run dir {f['run_dir']})", file=sys.stderr)
        print(f"  worker logs: {os.path.join(sweep_dir, 'workers')}/", file=sys.stderr)
        return 1
    print(f"→ {sweep_dir}/: " + ", ".join(summary["files"]))
    return 0


def run_local(spec, workers: int, sweep_dir: str) -> None:
    from decm import sweep

    os.makedirs(os.path.join(sweep_dir, "workers"), exist_ok=True)
    procs = []
    for i in range(workers):
        log = open(os.path.join(sweep_dir, "workers", f"worker-{i}.log"), "a")
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))  # no oversubscription
        procs.append(subprocess.Popen([sys.executable, os.path.abspath(__file__), "--sweep-dir", sweep_dir,
                                       "--study", spec.study, "--workers", str(workers), "--worker-index", str(i)],
                                      stdout=log, stderr=subprocess.STDOUT, env=env,
                                      start_new_session=True))  # Ctrl-C reaches them once, from here
    print(f"[sweep] worker logs: {os.path.join(sweep_dir, 'workers')}/worker-<i>.log", flush=True)
    try:
        sweep.wait_local(procs, progress=sweep.ProgressPrinter(spec, os.path.join(sweep_dir, "workers")))
    except KeyboardInterrupt:
        print("[sweep] Ctrl-C: the workers write checkpoints at their next step boundary (Ctrl-C again to stop "
              "waiting for them)", flush=True)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p in procs:
            p.wait()
        raise


def run_slurm(spec, workers: int, cluster_gin: str | None) -> None:
    from decm import sweep
    from decm.cluster import ClusterSpec, cluster, executor, with_backend
    from decm.job import parse

    resources = ClusterSpec(backend="slurm", cpus_per_task=1, job_name=f"sweep-{spec.study}")
    if cluster_gin:
        parse([cluster_gin], [])
        resources = with_backend(cluster(), "slurm")
    ex = executor(resources, spec.sweep_dir)
    jobs = ex.map_array(sweep.slurm_worker, [spec.to_json()] * workers, list(range(workers)), [workers] * workers)
    print(f"[sweep] Slurm array {jobs[0].job_id.split('_')[0]} with {workers} task(s)", flush=True)
    try:
        for job in jobs:
            try:
                job.result()
            except Exception as e:  # noqa: BLE001 — a dead worker leaves its trial to the reaper
                print(f"[sweep] worker job {job.job_id} failed: {type(e).__name__}", flush=True)
    except KeyboardInterrupt:  # only the waiting stops: the array goes on
        print(f"\n[sweep] stopped waiting; Slurm array {jobs[0].job_id.split('_')[0]} keeps running "
              f"(scancel it to stop; rerun this command to collect the outputs)", flush=True)
        raise


if __name__ == "__main__":
    sys.exit(main())
