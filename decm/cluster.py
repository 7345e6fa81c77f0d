"""Backends: where a launch runs — in this process, in a submitit subprocess, or as a Slurm job.

The resources are gin bindings of `cluster.*` (copy `gin/cluster/slurm_example.gin`); the launcher
reads them once into a plain `ClusterSpec` and submits a `decm.job.Job(RunSpec)` — plain data only;
the job re-parses `<run_dir>/config.gin` wherever it runs.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import shutil
import subprocess
import sys

import gin

from decm.job import ConfigError

BACKENDS = ("local", "local-subprocess", "slurm")



@dataclasses.dataclass(frozen=True)
class ClusterSpec:
    """Resolved resources of one launch (plain data; see `cluster` for the meaning of each field)."""

    backend: str = "local"
    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int = 0
    cpus_per_task: int = 1
    mem_gb: int = 0
    timeout_min: int = 60
    partition: str = ""
    account: str = ""
    qos: str = ""
    constraint: str = ""
    signal_delay_s: int = 120
    max_num_timeout: int = 10
    job_name: str = "decm"
    setup: tuple = ()
    extra_sbatch: tuple = ()
    folder: str = ""

    @property
    def tasks(self) -> int:
        """Processes per node: `tasks_per_node`, or one per GPU, or one."""
        return self.tasks_per_node or max(self.gpus_per_node, 1)


@gin.configurable("cluster")
def cluster(
    backend: str = "local",        # 'local' (this process), 'local-subprocess' (submitit local), 'slurm'
    nodes: int = 1,                # Slurm nodes
    gpus_per_node: int = 0,        # GPUs per node (0: CPU job)
    tasks_per_node: int = 0,       # processes per node (0: one per GPU, at least one)
    cpus_per_task: int = 1,        # CPU cores per process (data loading threads)
    mem_gb: int = 0,               # memory per node in GB (0: the partition's default)
    timeout_min: int = 60,         # wall-clock limit per allocation, minutes (the job requeues past it)
    partition: str = "",           # Slurm partition ('': the cluster's default)
    account: str = "",             # Slurm account ('': none)
    qos: str = "",                 # Slurm QoS ('': none)
    constraint: str = "",          # Slurm --constraint, e.g. 'h100' ('': none)
    signal_delay_s: int = 120,     # SIGUSR2 this many seconds before the limit: time to reach a step boundary and save
    max_num_timeout: int = 10,     # requeues after time-outs before giving up (preemptions do not count)
    job_name: str = "decm",        # Slurm job name
    setup: tuple = (),             # shell lines run before the job (module load ..., source .venv/bin/activate)
    extra_sbatch: dict | None = None,  # any other #SBATCH flag, e.g. {'exclusive': True, 'reservation': 'x'}
    folder: str = "",              # submitit logs and pickles ('': <run_dir>/submitit)
) -> ClusterSpec:
    """Where and with what resources the launch runs (plain data for the launcher).

    Args:
      backend: 'local', 'local-subprocess' or 'slurm'.
      nodes: number of nodes.
      gpus_per_node: GPUs per node.
      tasks_per_node: processes per node (0: one per GPU).
      cpus_per_task: CPU cores per process.
      mem_gb: memory per node (GB; 0 leaves it to the partition).
      timeout_min: time limit per allocation in minutes.
      partition: Slurm partition.
      account: Slurm account.
      qos: Slurm quality of service.
      constraint: Slurm node constraint.
      signal_delay_s: seconds between SIGUSR2 and the time limit.
      max_num_timeout: how many time-outs may requeue the job.
      job_name: job name.
      setup: shell lines run before the job starts.
      extra_sbatch: extra sbatch flags (name → value).
      folder: submitit folder.
    """
    if backend not in BACKENDS:
        raise ValueError(f"cluster.backend must be one of {BACKENDS}, got {backend!r}")
    for name, value in (("nodes", nodes), ("timeout_min", timeout_min), ("cpus_per_task", cpus_per_task)):
        if int(value) < 1:
            raise ValueError(f"cluster.{name} must be ≥ 1, got {value}")
    extra = tuple(sorted((extra_sbatch or {}).items()))
    return ClusterSpec(backend, int(nodes), int(gpus_per_node), int(tasks_per_node), int(cpus_per_task),
                       int(mem_gb), int(timeout_min), partition, account, qos, constraint, int(signal_delay_s),
                       int(max_num_timeout), job_name, tuple(setup), extra, folder)


def with_backend(spec: ClusterSpec, backend: str | None) -> ClusterSpec:
    """The spec with the command line's --backend (if any) in place of cluster.backend."""
    if backend is None:
        return spec
    if backend not in BACKENDS:
        raise ValueError(f"--backend must be one of {BACKENDS}, got {backend!r}")
    return dataclasses.replace(spec, backend=backend)


def folder_for(spec: ClusterSpec, run_dir: str) -> str:
    return spec.folder or os.path.join(run_dir, "submitit")


def slurm_parameters(spec: ClusterSpec) -> dict:
    """submitit SlurmExecutor parameters (the keys of its sbatch template)."""
    p = dict(job_name=spec.job_name, time=spec.timeout_min, nodes=spec.nodes, ntasks_per_node=spec.tasks,
             cpus_per_task=spec.cpus_per_task, signal_delay_s=spec.signal_delay_s, stderr_to_stdout=False)
    if spec.gpus_per_node:
        p["gpus_per_node"] = spec.gpus_per_node
    if spec.mem_gb:
        p["mem"] = f"{spec.mem_gb}GB"
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(spec, key):
            p[key] = getattr(spec, key)
    if spec.setup:
        p["setup"] = list(spec.setup)
    if spec.extra_sbatch:
        p["additional_parameters"] = dict(spec.extra_sbatch)
    return p


def sbatch_script(spec: ClusterSpec, run_dir: str) -> str:
    """The sbatch script submitit writes for this spec (what --dry-run prints)."""
    from submitit.slurm.slurm import _make_sbatch_string

    folder = os.path.join(os.path.abspath(folder_for(spec, run_dir)), "%j")
    command = " ".join(shlex.quote(a) for a in (sys.executable, "-u", "-m", "submitit.core._submit", folder))
    return _make_sbatch_string(command=command, folder=folder, map_count=None, **slurm_parameters(spec))


def executor(spec: ClusterSpec, run_dir: str):
    """A submitit executor for 'local-subprocess' or 'slurm'."""
    import submitit

    folder = os.path.join(folder_for(spec, run_dir), "%j")
    if spec.backend == "slurm":
        ex = submitit.SlurmExecutor(folder=folder, max_num_timeout=spec.max_num_timeout)
        ex.update_parameters(**slurm_parameters(spec))
        return ex
    if spec.backend == "local-subprocess":
        ex = submitit.LocalExecutor(folder=folder, max_num_timeout=spec.max_num_timeout)
        ex.update_parameters(timeout_min=spec.timeout_min, tasks_per_node=spec.tasks, gpus_per_node=spec.gpus_per_node,
                             signal_delay_s=spec.signal_delay_s)
        return ex
    raise ValueError(f"backend {spec.backend!r} runs in-process; no executor")


def submit(run_spec, spec: ClusterSpec):
    """Submits `decm.job.Job(run_spec)`; returns the submitit job."""
    from decm.job import Job

    return executor(spec, run_spec.run_dir).submit(Job(run_spec))


class SchedulerError(ConfigError):
    """Slurm is missing, does not answer, or refused the submission (one line for the user, exit 2)."""


def _last_line(text) -> str:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def check_scheduler(timeout_s: float = 60.0) -> None:
    """Raises SchedulerError unless `sbatch` exists and the Slurm controller answers `sinfo` (before the
    launcher writes anything). An unreachable controller makes sinfo give up after ~10 s."""
    hint = "run here with --backend local, or see the sbatch script with --dry-run"
    if shutil.which("sbatch") is None:
        raise SchedulerError(f"backend 'slurm' needs Slurm (sbatch not found on PATH on this machine); {hint}")
    try:
        out = subprocess.run(["sinfo", "--noheader", "--format=%P"], capture_output=True, text=True, timeout=timeout_s)
    except FileNotFoundError:
        raise SchedulerError(f"backend 'slurm': sbatch exists but sinfo does not, so the controller cannot be "
                             f"checked; {hint}") from None
    except subprocess.TimeoutExpired:
        raise SchedulerError(f"backend 'slurm': the Slurm controller did not answer sinfo within {timeout_s:.0f} s; "
                             f"{hint}") from None
    if out.returncode != 0:
        why = _last_line(out.stderr) or _last_line(out.stdout) or f"exit code {out.returncode}"
        conf = os.environ.get("SLURM_CONF")
        raise SchedulerError(f"backend 'slurm': the Slurm controller does not answer (sinfo: {why}); nothing was "
                             f"submitted or written. Check `sinfo` and SLURM_CONF ({conf or 'unset'}), or {hint}")


def submission_error(e: BaseException) -> SchedulerError:
    """A failed submission (sbatch refused it, submitit raised) as one line."""
    why = _last_line(getattr(e, "stderr", None)) or _last_line(getattr(e, "output", None)) or _last_line(str(e))
    return SchedulerError(f"submission failed: {type(e).__name__}: {why or 'no message'}")
