"""The submitted unit: a frozen RunSpec (plain data) and the callable that runs it.

The job never receives gin objects: it re-parses `<run_dir>/config.gin` (written at launch) inside the
process that runs it — locally, in a submitit subprocess, or on a Slurm node.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import sys

import gin

from decm import registry
from decm.run_lock import RunLocked


class ConfigError(ValueError):
    """Bad user input (gin file, binding, value); the launcher prints it on one line and exits 2."""


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """Plain-data description of a launch (picklable; no gin objects).

    Args:
      gin_files: gin files, in order.
      bindings: extra gin bindings, in order.
      run_dir: the run directory (named once, at launch).
      force: resume even if the config differs from the run directory's snapshot.
    """

    gin_files: tuple = ()
    bindings: tuple = ()
    run_dir: str = ""
    force: bool = False


_GIN_NOISE = re.compile(r"\s*In call to configurable '[^']*' \(<[^>]*>\)( in scope '[^']*')?")


def one_line(e: BaseException) -> str:
    """`Type: message` on one line, without gin's trailing 'In call to configurable …' chain."""
    msg = _GIN_NOISE.sub("", " ".join(str(e).split())).strip()
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def configurable_names() -> list[str]:
    """Every registered gin configurable as users bind it: 'losses.cm_loss' for components, 'train' for
    the loop's functions (their shortest unambiguous selector)."""
    import gin.config

    registry_ = gin.config._REGISTRY  # noqa: SLF001 — gin has no public listing
    names = set()
    for sel, c in registry_.items():
        names.add(sel if c.module in registry.KINDS else registry_.minimal_selector(sel))
    return sorted(names)


def suggestion(word: str, candidates, cutoff: float = 0.6) -> str:
    """' — did you mean 'x' or 'y'?' for the closest candidates, or '' when none is close."""
    import difflib

    close = difflib.get_close_matches(word, list(candidates), n=2, cutoff=cutoff)
    return f" — did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def did_you_mean(msg: str) -> str:
    """Adds "did you mean …?" to gin's unknown-parameter, unknown-configurable and unknown-reference errors."""
    import difflib
    import inspect

    import gin.config

    m = re.search(r"Configurable '([^']+)' doesn't have a parameter named '([^']+)'", msg)
    if m:
        try:
            fn = gin.config._REGISTRY.get_match(m.group(1)).wrapped  # noqa: SLF001
            params = list(inspect.signature(fn).parameters)
        except (KeyError, TypeError, ValueError, AttributeError):
            params = []
        return msg + suggestion(m.group(2), params)
    m = re.search(r"No configurable matching reference '@([^'(]+)(\(\))?'", msg)
    if m:  # a component reference: '@time_samplers.logitnormal()' → '@time_samplers.logit_normal()'
        word, call = m.group(1), m.group(2) or ""
        module, _, name = word.rpartition(".")
        names = [n for n in configurable_names() if n.startswith(module + ".")] or configurable_names()
        short = {}  # compare the names' last parts (within the module, when one is given)
        for n in names:
            short.setdefault(n.rsplit(".", 1)[-1], n)
        close = [short[c] for c in difflib.get_close_matches(name, list(short), n=2, cutoff=0.6)]
        return msg + (f" — did you mean {' or '.join(repr('@' + c + call) for c in close)}?" if close else "")
    m = re.search(r"No configurable matching '([^']+)'", msg)
    if m:
        return msg + suggestion(m.group(1), configurable_names())
    return msg


USER_ERRORS = (ConfigError, FileNotFoundError, ValueError, KeyError, RunLocked)  # what a CLI reports in one line


def cli_error(prog: str, e: BaseException) -> int:
    """Prints `<prog>: error: <one line>` to stderr and returns the exit code 2 (ConfigError: its text)."""
    print(f"{prog}: error: {e if isinstance(e, ConfigError) else one_line(e)}", file=sys.stderr)
    return 2


def parse(gin_files, bindings) -> str:
    """Parses gin files + bindings (unknown keys are errors) and returns the resolved config string."""
    registry.import_all()
    import decm.cluster  # noqa: F401  (registers cluster)
    import decm.wandb_log  # noqa: F401  (registers wandb)
    import decm.experiment  # noqa: F401  (registers train / evaluate / experiment)

    for path in gin_files:
        if not os.path.isfile(path):
            raise ConfigError(f"gin file not found: {path}")
    gin.clear_config()
    try:
        gin.parse_config_files_and_bindings(list(gin_files), list(bindings), skip_unknown=False,
                                            finalize_config=False)
    except Exception as e:  # gin raises ValueError / KeyError / ParseError subclasses
        raise ConfigError(f"bad gin config: {did_you_mean(one_line(e))}") from None
    return gin.config_str()


def check_not_only_diffs(gin_files) -> None:
    """An experiment needs a benchmark gin: ablation files (gin/ablations/) alone are diffs."""
    if gin_files and all(os.path.basename(os.path.dirname(os.path.abspath(p))) == "ablations" for p in gin_files):
        raise ConfigError(f"{gin_files[0]} is an ablation diff, not an experiment: put a benchmark gin before it, "
                          f"e.g. --gin gin/toy2d.gin --gin {gin_files[0]}")


def build(run_dir: str, require_inputs: bool = False) -> dict:
    """Builds every object of the parsed experiment without running it (dry run / validation).

    With `require_inputs`, a missing input file (latents, teacher checkpoint) is a ConfigError naming
    the gin binding to set; otherwise the summary lists them under `missing_inputs`.
    """
    from decm.experiment import experiment

    try:
        summary = experiment(run_dir, build_only=True)
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(one_line(e)) from None
    missing = [m for stage in summary.values() if isinstance(stage, dict) for m in stage.get("missing_inputs", [])]
    if require_inputs and missing:
        raise ConfigError(missing_inputs_message(missing))
    return summary


# The gin binding that sets each kind of input, as a --bind example.
_INPUT_BINDINGS = (("datasets.latents.path", "--bind \"datasets.latents.path = '/path/to/latents'\""),
                   ("experiment.teacher_dir", "--bind \"experiment.teacher_dir = '/path/to/teacher.pt'\""))


def missing_inputs_message(missing: list[str]) -> str:
    """All missing inputs on one line, each with the --bind line that sets it, and a pointer to --dry-run."""
    parts = []
    for i, m in enumerate(dict.fromkeys(missing), 1):
        bind = next((b for key, b in _INPUT_BINDINGS if key in m), None)
        parts.append(f"({i}) {m}" + (f" → {bind}" if bind else ""))
    return (f"{len(parts)} missing input(s): " + "; ".join(parts) +
            ". Check a configuration without its inputs with --dry-run")


def without_cluster(config: str) -> str:
    """The config minus `cluster.*` and `wandb.*` statements (they may change between submissions of a run)."""
    from decm.experiment import gin_statements

    return "\n".join(st for st in gin_statements(config) if not st.startswith(("cluster.", "wandb.")))


def config_diff(old: str, new: str, limit: int = 6) -> str:
    """The bindings that differ between two configs: 'x.y: old → new; …' (added/removed ones too)."""
    from decm.experiment import gin_statements

    def table(config):
        out = {}
        for st in gin_statements(without_cluster(config)):
            key, _, value = st.partition("=")
            out[key.strip()] = value.strip()
        return out

    a, b = table(old), table(new)
    diffs = [f"{k}: {a.get(k, '(unset)')} → {b.get(k, '(unset)')}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    more = f"; … {len(diffs) - limit} more" if len(diffs) > limit else ""
    return "; ".join(diffs[:limit]) + more


def wait_for_snapshot(spec: RunSpec, config: str, timeout_s: float = 600.0) -> None:
    """Ranks > 0 under torchrun: wait until rank 0 has written this config's snapshot."""
    import time

    snap = os.path.join(spec.run_dir, "config.gin")
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if os.path.exists(snap):
            with open(snap) as f:
                if without_cluster(f.read()) == without_cluster(config):
                    return
        time.sleep(0.5)
    raise ConfigError(f"rank 0 did not write {snap} within {timeout_s:.0f} s")


def prepare(spec: RunSpec) -> str:
    """Validates the spec, then creates the run directory and writes its gin snapshot.

    Nothing is created if validation fails. A run directory whose `config.gin` differs from this
    config is refused unless `spec.force`.
    """
    config = parse(spec.gin_files, spec.bindings)
    build(spec.run_dir, require_inputs=True)
    from decm import run_lock

    run_lock.check_free(spec.run_dir)  # a live launch holds it: refuse before writing anything
    snap = os.path.join(spec.run_dir, "config.gin")
    if os.path.exists(snap):
        with open(snap) as f:
            old = f.read()
        if without_cluster(old) != without_cluster(config) and not spec.force:
            raise ConfigError(f"{spec.run_dir} was launched with a different gin config ({config_diff(old, config)}); "
                              "use another --run-dir or --force to resume anyway")
    os.makedirs(os.path.join(spec.run_dir, "gin"), exist_ok=True)
    for i, path in enumerate(spec.gin_files):
        shutil.copyfile(path, os.path.join(spec.run_dir, "gin", f"{i:02d}-{os.path.basename(path)}"))
    with open(os.path.join(spec.run_dir, "gin", "bindings.gin"), "w") as f:
        f.write("".join(f"{b}\n" for b in spec.bindings))
    tmp = snap + ".tmp"
    with open(tmp, "w") as f:
        f.write(config)
    os.replace(tmp, snap)
    from decm.wandb_log import run_id

    run_id(spec.run_dir)  # the W&B id is fixed at launch and reused by every resume and requeue
    return config


def run(spec: RunSpec) -> dict:
    """The job body: re-parse the run directory's snapshot and run the experiment."""
    from decm.experiment import experiment

    parse([os.path.join(spec.run_dir, "config.gin")], [])
    return experiment(spec.run_dir)


class Job:
    """What submitit runs (local-subprocess or Slurm): plain data in, `run(spec)` inside the job.

    Checkpointable: on SIGUSR2 (time-out or preemption) the training loop stops at a step boundary
    and writes a checkpoint (decm.preemption); `checkpoint()` then resubmits the same plain RunSpec,
    and the requeued job resumes from the newest valid checkpoint in the run directory.

    Args:
      spec: the RunSpec (gin files, bindings, run dir).
    """

    def __init__(self, spec: RunSpec):
        self.spec = spec

    def __call__(self) -> dict:
        from decm import distributed, preemption

        _export_submitit_distributed_env()
        preemption.install()
        try:
            return run(self.spec)
        except preemption.Preempted as e:
            print(f"[decm] {str(e).splitlines()[0]}; handing over to submitit to requeue", flush=True)
            preemption.hand_off()  # rank 0 under submitit: checkpoint() + requeue + exit (does not return)
            if (distributed.env_ranks() or (0, 1, 0))[0] != 0:
                return {"preempted": True}  # other ranks: the requeue ends this allocation
            raise  # no submitit handler (in-process run): report the stop
        finally:
            distributed.shutdown()

    def checkpoint(self, *args, **kwargs):
        """Resubmits the same plain-data spec (state lives in the run directory, never in the pickle)."""
        import submitit

        return submitit.helpers.DelayedSubmission(Job(self.spec))

    def __repr__(self) -> str:
        return f"Job(run_dir={self.spec.run_dir!r})"


def _export_submitit_distributed_env() -> None:
    """Inside a submitit job with several tasks, exports RANK/WORLD_SIZE/MASTER_* for decm.distributed."""
    try:
        import submitit

        env = submitit.JobEnvironment()
    except RuntimeError:  # not inside a submitit job
        return
    if env.num_tasks > 1:
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
