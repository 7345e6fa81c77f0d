"""Optuna sweeps over gin bindings: space, validation, storage, workers, reaping, outputs.

A sweep lives in one directory (`sweeps/runs/<study>` by default):
    journal.log          Optuna JournalStorage (file backend: safe for many processes on a shared FS)
    sweep.json           the plain-data SweepSpec (what the workers run)
    trials/trial-N/      one run directory per trial (resumable like any run)
    workers/             local worker logs (Slurm: submitit/<job id>/)
    best.gin, trials.csv, history.png, importances.png, slices.png   written by `finalize`

Space file (`.py` defining SPACE, or `.yaml`/`.json` holding the same mapping): gin binding → spec,
    {"type": "float", "low": 0.1, "high": 3.0, "log": True}
    {"type": "int", "low": 1, "high": 5}
    {"type": "categorical", "choices": ["@time_samplers.uniform_segmented()", "@time_samplers.logit_normal()"]}
Choices that reference components (`@kind.name` / `@kind.name()`) must be registry names. Every
binding and choice is parsed with gin before any trial runs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import sys
import time
import warnings

OBJECTIVE_DIRECTION = "minimize"


class SweepError(ValueError):
    """Bad sweep input (space, storage, metric); printed on one line, exit 2."""


@dataclasses.dataclass(frozen=True)
class SweepSpec:
    """Plain data shared by the launcher and every worker.

    Args:
      gin_files: experiment gin files.
      bindings: fixed extra bindings.
      space: {binding: spec} (see module docstring).
      sweep_dir: the sweep directory.
      study: Optuna study name.
      storage: Optuna storage URL ('' : the journal file in sweep_dir).
      trials: number of finished (complete or pruned) trials to reach (concurrent workers may overshoot
        by at most workers − 1 when they ask at the same instant).
      metric: dotted path into a trial's metrics.json (minimised), e.g. 'student.1.sw2'.
      report_every: snapshot/report period in steps for pruning (0: no pruning).
      report_key: snapshot record key reported to the pruner (e.g. 'nfe1/sw2').
      seed: base sampler seed (worker w uses seed + w).
    """

    gin_files: tuple
    bindings: tuple
    space: dict
    sweep_dir: str
    study: str
    storage: str = ""
    trials: int = 12
    metric: str = "student.1.sw2"
    report_every: int = 0
    report_key: str = "nfe1/sw2"
    seed: int = 0

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "SweepSpec":
        d = json.loads(text)
        d["gin_files"], d["bindings"] = tuple(d["gin_files"]), tuple(d["bindings"])
        return cls(**d)


def load_space(path: str) -> dict:
    """SPACE from a .py file, or the mapping in a .yaml / .json file."""
    if not os.path.isfile(path):
        raise SweepError(f"space file not found: {path}")
    if path.endswith(".py"):
        import runpy

        space = runpy.run_path(path).get("SPACE")
    elif path.endswith((".yaml", ".yml")):
        import yaml

        with open(path) as f:
            space = yaml.safe_load(f)
    elif path.endswith(".json"):
        with open(path) as f:
            space = json.load(f)
    else:
        raise SweepError(f"space file must be .py, .yaml or .json: {path}")
    if not isinstance(space, dict) or not space:
        raise SweepError(f"{path}: the space must be a non-empty mapping binding → spec (SPACE = {{...}})")
    return space


def literal(value) -> str:
    """A Python value as gin text (component references pass through)."""
    if isinstance(value, str) and value.startswith(("@", "%")):
        return value
    return repr(value)


def check_space(space: dict) -> None:
    from decm import registry

    registry.import_all()
    for binding, spec in space.items():
        if not isinstance(spec, dict) or spec.get("type") not in ("float", "int", "categorical"):
            raise SweepError(f"space entry {binding!r}: needs type float, int or categorical")
        if spec["type"] in ("float", "int"):
            if "low" not in spec or "high" not in spec or not spec["low"] < spec["high"]:
                raise SweepError(f"space entry {binding!r}: needs low < high")
            if spec.get("log") and spec["low"] <= 0:
                raise SweepError(f"space entry {binding!r}: log scale needs low > 0")
        else:
            choices = spec.get("choices")
            if not choices:
                raise SweepError(f"space entry {binding!r}: needs a non-empty choices list")
            for c in choices:
                if isinstance(c, str) and c.startswith("@"):
                    kind, _, name = c[1:].rstrip("()").partition(".")
                    if kind not in registry.KINDS or name not in registry.names(kind):
                        raise SweepError(f"space entry {binding!r}: {c} is not a registered component "
                                         f"(python -m decm.launch --list)")


def candidate_bindings(space: dict) -> list[list[str]]:
    """Binding sets that together use every bound of every parameter (for validation)."""
    sets = []
    for binding, spec in space.items():
        values = spec["choices"] if spec["type"] == "categorical" else [spec["low"], spec["high"]]
        for v in values:
            v = int(v) if spec["type"] == "int" else v
            sets.append([f"{binding} = {literal(v)}"])
    return sets


def validate(spec: SweepSpec) -> None:
    """Parses and builds the experiment with every bound/choice of the space; raises SweepError."""
    from decm.job import ConfigError, build, parse

    check_space(spec.space)
    try:  # the experiment itself first, so that its own problems are not blamed on a space value
        parse(spec.gin_files, tuple(spec.bindings))
        build("/nonexistent/sweep-validation")
    except ConfigError as e:
        raise SweepError(f"the experiment (--gin / --bind, before any space value): {e}") from None
    for extra in candidate_bindings(spec.space):
        try:
            parse(spec.gin_files, tuple(spec.bindings) + tuple(extra))
            build("/nonexistent/sweep-validation")
        except ConfigError as e:
            raise SweepError(f"with the space's values {'; '.join(extra)}: {e}") from None
    if not spec.metric:
        raise SweepError("--metric must name a metrics.json entry, e.g. student.1.sw2")
    import gin

    from decm.eval.evaluate import metric_paths

    parse(spec.gin_files, spec.bindings)
    dataset = gin.query_parameter("evaluate.dataset").scoped_configurable_fn()
    produced = metric_paths(dataset)
    missing = [p.strip() for p in spec.metric.split(",") if p.strip() not in produced]
    if missing:
        raise SweepError(f"--metric {', '.join(repr(m) for m in missing)} is not produced by this experiment's "
                         f"evaluation; it writes {', '.join(produced)}")


def storage_for(spec: SweepSpec, workers: int = 1):
    import optuna

    if not spec.storage:
        from optuna.storages.journal import JournalFileBackend

        os.makedirs(spec.sweep_dir, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(os.path.join(spec.sweep_dir, "journal.log")))
    if spec.storage.startswith("sqlite") and workers > 1:
        raise SweepError("SQLite storage is unsafe for parallel workers; use the default journal file or a "
                         "server database URL (postgresql://, mysql://)")
    if spec.storage.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(spec.storage[len("journal:"):]))
    return optuna.storages.RDBStorage(spec.storage)


def startup_trials(trials: int) -> int:
    """Random trials before TPE models the space: half the study, at least 3 (TPE's density estimates need a
    few points, and a 4-trial study should not repeat one random draw's categories), at most Optuna's
    default of 10."""
    return min(10, max(3, trials // 2))


def load_study(spec: SweepSpec, worker: int = 0, workers: int = 1):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own one line per trial instead of Optuna's INFO

    sampler = optuna.samplers.TPESampler(seed=spec.seed + worker, constant_liar=True,
                                         n_startup_trials=startup_trials(spec.trials))
    pruner = optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=0) if spec.report_every else \
        optuna.pruners.NopPruner()
    return optuna.create_study(study_name=spec.study, storage=storage_for(spec, workers), sampler=sampler,
                               pruner=pruner, direction=OBJECTIVE_DIRECTION, load_if_exists=True)


def suggest(trial, space: dict) -> list[str]:
    out = []
    for binding, s in space.items():
        if s["type"] == "float":
            v = trial.suggest_float(binding, s["low"], s["high"], log=bool(s.get("log")))
        elif s["type"] == "int":
            v = trial.suggest_int(binding, int(s["low"]), int(s["high"]), log=bool(s.get("log")))
        else:
            v = trial.suggest_categorical(binding, list(s["choices"]))
        out.append(f"{binding} = {literal(v)}")
    return out


def metric_value(metrics: dict, path: str) -> float:
    """The metrics.json value at `path`; 'a,b,c' is the mean of the values at a, b and c (e.g. the mean
    SW2 over NFE 1, 2 and 4)."""
    if "," in path:
        parts = [p.strip() for p in path.split(",")]
        return sum(metric_value(metrics, p) for p in parts) / len(parts)
    node = metrics
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            raise SweepError(f"metric {path!r} not in metrics.json (keys at this level: {list(node)[:8]})")
        node = node[part]
    return float(node)


def worker_identity() -> str:
    """Slurm array job_task, else Slurm job, else host:pid (recorded as the trial's job id)."""
    env = os.environ
    if env.get("SLURM_ARRAY_JOB_ID"):
        return f"slurm:{env['SLURM_ARRAY_JOB_ID']}_{env.get('SLURM_ARRAY_TASK_ID', '0')}"
    if env.get("SLURM_JOB_ID"):
        return f"slurm:{env['SLURM_JOB_ID']}"
    return f"pid:{socket.gethostname()}:{os.getpid()}"


def finished(study) -> int:
    from optuna.trial import TrialState

    return sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.get_trials(deepcopy=False))


def running(study) -> int:
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))


def run_trial(spec: SweepSpec, study, trial) -> float:
    import optuna

    from decm import snapshots
    from decm.job import RunSpec, parse, prepare, run

    run_dir = os.path.join(spec.sweep_dir, "trials", f"trial-{trial.number:04d}")
    binds = list(spec.bindings) + suggest(trial, spec.space) + [
        f"wandb.group = 'sweep-{spec.study}'", f"wandb.tags = ['trial-{trial.number}']", "train.progress = False"]
    if spec.report_every:
        binds.append(f"distill/train.snapshot_every_steps = {spec.report_every}")
    trial.set_user_attr("run_dir", run_dir)
    trial.set_user_attr("job_id", worker_identity())
    rspec = RunSpec(tuple(spec.gin_files), tuple(binds), run_dir, force=True)
    prepare(rspec)
    with open(os.path.join(run_dir, "wandb_id")) as f:
        trial.set_user_attr("wandb_id", f.read().strip())

    def report(record):
        if spec.report_key in record:
            trial.report(float(record[spec.report_key]), int(record["step"]))
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at step {record['step']}")

    snapshots.clear_listeners()
    snapshots.add_listener(report)
    try:
        parse(rspec.gin_files, rspec.bindings)
        run(rspec)
    finally:
        snapshots.clear_listeners()
    with open(os.path.join(run_dir, "metrics.json")) as f:
        return metric_value(json.load(f), spec.metric)


def worker(spec: SweepSpec, index: int = 0, workers: int = 1) -> int:
    """Runs trials until the study has `spec.trials` finished ones; returns how many this worker ran."""
    import optuna
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = load_study(spec, index, workers)
    me, ran, failed = worker_identity(), 0, 0
    max_failures = max(3, spec.trials)
    # others' running trials count (no overshoot); this worker's failures count too, so one worker runs
    # exactly `trials` trials per command (a rerun retries what failed)
    while finished(study) + running(study) + failed < spec.trials:
        if sum(t.state == TrialState.FAIL for t in study.get_trials(deepcopy=False)) >= max_failures:
            print(f"[sweep] worker {index}: {max_failures} failed trials, stopping", file=sys.stderr, flush=True)
            break
        trial = study.ask()
        try:
            value = run_trial(spec, study, trial)
            study.tell(trial, value)
        except optuna.TrialPruned:
            study.tell(trial, state=TrialState.PRUNED)
        except KeyboardInterrupt:  # Ctrl-C: the trial's run stopped at a checkpoint; WAITING hands the same
            # trial (number, parameters, run directory) to the next `ask`, so a rerun resumes it
            study._storage.set_trial_state_values(trial._trial_id, TrialState.WAITING)  # noqa: SLF001
            raise
        except Exception as e:  # noqa: BLE001 — a failing trial must not stop the sweep
            cause = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            print(f"[sweep] worker {index} ({me}): trial {trial.number} failed: {cause}", file=sys.stderr, flush=True)
            trial.set_user_attr("error", cause)
            study.tell(trial, state=TrialState.FAIL)
            failed += 1
        ran += 1
    return ran


def job_alive(job_id: str) -> bool:
    """Whether the process / Slurm job that runs a trial still exists (unknown → alive)."""
    import subprocess

    if job_id.startswith("pid:"):
        _, host, pid = job_id.split(":")
        if host != socket.gethostname():
            return True
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    if job_id.startswith("slurm:"):
        try:
            out = subprocess.run(["squeue", "-h", "-j", job_id[len("slurm:"):]], capture_output=True, text=True,
                                 timeout=30)
        except (OSError, subprocess.SubprocessError):
            return True
        return out.returncode != 0 or bool(out.stdout.strip())
    return True


def reap(study) -> list[int]:
    """Marks RUNNING trials whose worker is gone as FAIL; returns their numbers."""
    from optuna.trial import TrialState

    dead = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        job = t.user_attrs.get("job_id")
        if job and not job_alive(job):
            study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
            dead.append(t.number)
    return dead


def finalize(spec: SweepSpec) -> dict:
    """best.gin, trials.csv and the plots; returns a summary."""
    from optuna.trial import TrialState

    study = load_study(spec)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    states = {s.name: sum(t.state == s for t in study.get_trials(deepcopy=False)) for s in TrialState}
    summary = {"study": spec.study, "states": {k: v for k, v in states.items() if v}, "best": None, "files": []}
    write_trials_csv(study, os.path.join(spec.sweep_dir, "trials.csv"))
    summary["files"].append("trials.csv")
    summary["failures"] = [{"number": t.number, "error": t.user_attrs.get("error", "worker died"),
                            "run_dir": t.user_attrs.get("run_dir")}
                           for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))]
    if complete:
        best = study.best_trial
        summary["best"] = {"number": best.number, "value": best.value, "params": best.params,
                           "run_dir": best.user_attrs.get("run_dir")}
        lines = [f"# Best trial {best.number} of study {spec.study!r}: {spec.metric} = {best.value:.6g}",
                 f"# run directory: {best.user_attrs.get('run_dir')}", "# use: --gin <experiment> --gin this file"]
        lines += [f"{k} = {literal(v)}  # swept" for k, v in best.params.items()]
        with open(os.path.join(spec.sweep_dir, "best.gin"), "w") as f:
            f.write("\n".join(lines) + "\n")
        summary["files"].append("best.gin")
    for name, fn in (("history.png", plot_history), ("slices.png", plot_slices), ("importances.png", plot_importances)):
        try:
            with warnings.catch_warnings():  # Optuna's "experimental" notes
                warnings.simplefilter("ignore")
                written = fn(study, spec, os.path.join(spec.sweep_dir, name))
        except (ValueError, RuntimeError) as e:  # e.g. importances with constant values
            summary.setdefault("plot_errors", {})[name] = str(e).splitlines()[0]
            written = False
        if written:
            summary["files"].append(name)
    summary["files"].append("summary.json")
    with open(os.path.join(spec.sweep_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2, default=str)
    return summary


MIN_TRIALS_FOR_IMPORTANCES = 8  # fewer complete trials: importances are noise, so none are drawn


def _complete(study):
    from optuna.trial import TrialState

    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def plot_history(study, spec: SweepSpec, path: str) -> bool:
    """Each complete trial's value and the best so far, against the trial number (integer ticks)."""
    from matplotlib.ticker import MaxNLocator

    from decm.plots import grid, metric_label, save

    done = sorted(_complete(study), key=lambda t: t.number)
    if not done:
        return False
    fig, (ax,) = grid(1, panel_size=(7.0, 3.6))
    xs, ys = [t.number for t in done], [t.value for t in done]
    best = [min(ys[: i + 1]) for i in range(len(ys))]
    ax.plot(xs, ys, "o", label="trial")
    ax.step(xs, best, where="post", color="C1", label="best so far")
    ax.set_xlabel("trial number")
    ax.set_ylabel(metric_label(spec.metric))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(f"{spec.study}: {len(done)} complete trials")
    ax.legend(fontsize=8)
    save(fig, path)
    return True


def plot_slices(study, spec: SweepSpec, path: str) -> bool:
    """One panel per swept parameter (value of each complete trial vs the parameter), 3 per row."""
    from decm.plots import grid, metric_label

    done = _complete(study)
    params = [p for p in spec.space if any(p in t.params for t in done)]
    if not done or not params:
        return False
    fig, axes = grid(len(params), ncols=3, panel_size=(4.2, 3.2))
    for ax, p in zip(axes, params):
        pts = [(t.params[p], t.value, t.number) for t in done if p in t.params]
        if spec.space[p]["type"] == "categorical":
            cats = [str(c) for c in spec.space[p]["choices"]]
            ax.scatter([cats.index(str(v)) for v, _, _ in pts], [y for _, y, _ in pts], c=[n for _, _, n in pts],
                       cmap="viridis")
            ax.set_xticks(range(len(cats)))
            ax.set_xticklabels([c.replace("@", "").replace("()", "").split(".")[-1] for c in cats], rotation=20,
                               fontsize=7)
        else:
            ax.scatter([v for v, _, _ in pts], [y for _, y, _ in pts], c=[n for _, _, n in pts], cmap="viridis")
            if spec.space[p].get("log"):
                from matplotlib.ticker import NullFormatter

                ax.set_xscale("log")
                ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_title(p, fontsize=8)
        ax.set_xlabel("parameter value", fontsize=8)
        ax.tick_params(labelsize=7)
        if ax.get_subplotspec().is_first_col():
            ax.set_ylabel(metric_label(spec.metric), fontsize=8)
    fig.tight_layout(rect=(0, 0, 0.92, 1))
    cax = fig.add_axes((0.935, 0.2, 0.015, 0.6))
    fig.colorbar(axes[0].collections[0], cax=cax, label="trial number")
    import matplotlib.pyplot as plt

    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return True


def plot_importances(study, spec: SweepSpec, path: str) -> bool:
    """fANOVA importances as bars, only with ≥ MIN_TRIALS_FOR_IMPORTANCES complete trials (else noise)."""
    import optuna

    from decm.plots import grid, save

    done = _complete(study)
    if len(done) < MIN_TRIALS_FOR_IMPORTANCES or len(spec.space) < 2:
        return False
    imp = optuna.importance.get_param_importances(study)
    fig, (ax,) = grid(1, panel_size=(7.0, 0.45 * len(imp) + 1.4))
    names = list(imp)[::-1]
    ax.barh(range(len(names)), [imp[n] for n in names])
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(names, fontsize=8)
    ax.set_xlabel("importance (fANOVA share of the variance)")
    ax.set_title(f"from {len(done)} complete trials — indicative only", fontsize=9)
    save(fig, path)
    return True


def write_trials_csv(study, path: str) -> None:
    """One row per trial: number, state, value, params, run dir, job id, W&B id, duration."""
    import csv

    trials = study.get_trials(deepcopy=False)
    params = sorted({k for t in trials for k in t.params})
    with open(path + ".tmp", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["number", "state", "value"] + [f"param:{p}" for p in params] +
                   ["run_dir", "job_id", "wandb_id", "seconds"])
        for t in trials:
            secs = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete and t.datetime_start else ""
            w.writerow([t.number, t.state.name, "" if t.value is None else t.value] +
                       [t.params.get(p, "") for p in params] +
                       [t.user_attrs.get("run_dir", ""), t.user_attrs.get("job_id", ""),
                        t.user_attrs.get("wandb_id", ""), secs])
    os.replace(path + ".tmp", path)


def wait_local(procs, timeout_s: float | None = None, progress=None) -> None:
    """Waits for the local worker processes; calls `progress()` about every 2 s meanwhile (and at the end)."""
    start, last = time.time(), 0.0
    while any(p.poll() is None for p in procs):
        if timeout_s and time.time() - start > timeout_s:
            raise TimeoutError("local workers did not finish")
        if progress is not None and time.time() - last > 2.0:
            progress()
            last = time.time()
        time.sleep(0.5)
    if progress is not None:
        progress()


class ProgressPrinter:
    """One line per trial as it starts and as it ends (number, state, value, run dir; the cause and the
    worker log on failure), read from the study's storage by the parent process. Each end also says
    how many of the study's trials are finished and, from the pace of this command, the time left."""

    def __init__(self, spec: SweepSpec, log_dir: str | None = None):
        self.spec, self.log_dir, self.seen = spec, log_dir, {}
        self.t0, self.done0 = time.time(), None

    def progress(self, study) -> str:
        """'k/N finished, ETA 3m20s' (the ETA once this command has finished a trial)."""
        done = finished(study)
        if self.done0 is None:
            self.done0 = done
        left, new = max(self.spec.trials - done, 0), done - self.done0
        from decm.progress import duration

        eta = f", ETA {duration((time.time() - self.t0) / new * left)}" if new > 0 and left else ""
        return f"{done}/{self.spec.trials} finished{eta}"

    def __call__(self) -> None:
        from optuna.trial import TrialState

        study = load_study(self.spec)
        if self.done0 is None:
            self.done0 = finished(study)
        for t in study.get_trials(deepcopy=False):
            state = t.state.name
            if self.seen.get(t.number) == state:
                continue
            run_dir = t.user_attrs.get("run_dir", "")
            if t.state == TrialState.RUNNING and not run_dir:
                continue  # its worker has not named the run directory yet: report it next time
            if t.state == TrialState.RUNNING:
                print(f"[sweep] trial {t.number} started → {run_dir}", flush=True)
            elif t.state == TrialState.COMPLETE:
                print(f"[sweep] trial {t.number} COMPLETE {self.spec.metric} = {t.value:.6g} → {run_dir} "
                      f"({self.progress(study)})", flush=True)
            elif t.state == TrialState.FAIL:
                log = f" (log: {self.log_dir})" if self.log_dir else ""
                print(f"[sweep] trial {t.number} FAIL: {t.user_attrs.get('error', 'worker died')}{log}", flush=True)
            elif t.state == TrialState.WAITING:
                if run_dir:  # interrupted (Ctrl-C): its run resumes when the command runs again
                    print(f"[sweep] trial {t.number} interrupted at a checkpoint → {run_dir}", flush=True)
            else:
                print(f"[sweep] trial {t.number} {state} → {run_dir} ({self.progress(study)})", flush=True)
            self.seen[t.number] = state


def slurm_worker(spec_json: str, index: int, workers: int) -> int:
    """Entry point of one Slurm array task (plain data in)."""
    return worker(SweepSpec.from_json(spec_json), index, workers)
