"""Weights & Biases: one run per launch, offline unless a key is configured, rank 0 only.

- Id: fixed when the run directory is created (`<run_dir>/wandb_id`) and reused on every resume,
  requeue and later `python -m decm.evaluate`, with `resume="allow"`.
- Mode: `wandb.mode` if set, else $WANDB_MODE, else 'online' when a key is configured ($WANDB_API_KEY
  or a netrc entry for api.wandb.ai), else 'offline'. Offline runs land in
  `<run_dir>/wandb/offline-run-<time>-<id>[-<n>]/` (one per attempt; wandb appends -<n> when two
  attempts start within a second) and upload later with `wandb sync <those folders>`.
- Config: every parameter under the name users bind (`'distill/train.lr'`, `'cm/objectives.term.weight'`,
  `'losses.cm_loss.target'`): the bound values at start, the operative config (defaults such as
  `train.seed` included) after the first step; `config.gin` and `operative_config.gin` are saved as files.
- Console: offline runs print one line (`wandb sync <run_dir>/wandb/offline-run-*`, every attempt of
  the run) instead of W&B's summary; scripts that train many runs print one such line at the end
  (`one_sync_line`). Scalars: every stats.jsonl record, under `<stage>/...` with
  its own step axis `<stage>/step` (teacher and distillation steps both start at 0). Images: sample
  grids and NFE plots. Sweeps and ablations set `wandb.group` / `wandb.tags`.
"""

from __future__ import annotations

import contextlib
import netrc
import os
import uuid

import gin

from decm.gin_names import bound_names


@gin.configurable("wandb")
def wandb_settings(
    enabled: bool = True,        # False: nothing is written
    project: str = "decm",       # W&B project
    entity: str | None = None,   # W&B entity (team or user); None: the key's default
    group: str | None = None,    # run group (sweeps, ablation tables)
    tags=(),                     # run tags
    notes: str | None = None,    # run notes
    mode: str | None = None,     # 'online', 'offline', 'disabled'; None: $WANDB_MODE, else online iff a key exists
) -> dict:
    """W&B settings of a launch, as plain data.

    Args:
      enabled: log to W&B at all.
      project: project name.
      entity: entity name.
      group: group name.
      tags: tags.
      notes: notes.
      mode: W&B mode.
    """
    return dict(enabled=enabled, project=project, entity=entity, group=group, tags=list(tags), notes=notes,
                mode=mode)


def resolve_mode(mode: str | None) -> str:
    if mode:
        return mode
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        if netrc.netrc().authenticators("api.wandb.ai"):
            return "online"
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        pass
    return "offline"


def run_id(run_dir: str) -> str:
    """The run's W&B id, created once (atomically) and reused forever after."""
    path = os.path.join(run_dir, "wandb_id")
    if os.path.exists(path):
        with open(path) as f:
            value = f.read().strip()
        if value:
            return value
    os.makedirs(run_dir, exist_ok=True)
    value = uuid.uuid4().hex[:12]
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(value)
    try:
        os.link(tmp, path)  # first writer wins; a concurrent writer reads the winner's id
    except FileExistsError:
        pass
    finally:
        os.remove(tmp)
    with open(path) as f:
        return f.read().strip()


def bound_config() -> dict:
    """The bound values of the parsed gin config, under the names users bind."""
    import gin.config

    return bound_names(gin.config._CONFIG)  # noqa: SLF001


def operative_defaults() -> dict:
    """Every parameter of every configurable called so far, defaults included (after the first step)."""
    import gin.config

    return bound_names(gin.config._OPERATIVE_CONFIG)  # noqa: SLF001


class Tracker:
    """A W&B run or a no-op (disabled, or not rank 0). Methods never raise on logging problems.

    Args:
      run_dir: the run directory (W&B files go to `<run_dir>/wandb`).
      settings: `wandb_settings()` output.
      rank: process rank (only rank 0 logs).
    """

    def __init__(self, run_dir: str, settings: dict | None = None, rank: int = 0):
        self.run, self.run_dir = None, run_dir
        settings = settings if settings is not None else wandb_settings()
        mode = resolve_mode(settings.get("mode"))
        if not settings.get("enabled", True) or rank != 0 or mode == "disabled":
            return
        import wandb

        config = bound_config()
        self.run = wandb.init(
            project=settings.get("project"), entity=settings.get("entity"), group=settings.get("group"),
            tags=settings.get("tags") or None, notes=settings.get("notes"), id=run_id(run_dir), resume="allow",
            dir=run_dir, mode=mode, config=config, name=os.path.basename(os.path.abspath(run_dir)),
            settings=wandb.Settings(console="off", x_disable_stats=True, quiet=mode == "offline",
                                    silent=mode == "offline"))
        for stage in ("teacher", "distill"):
            self.run.define_metric(f"{stage}/step")
            self.run.define_metric(f"{stage}/*", step_metric=f"{stage}/step")
        self.save_files("config.gin", "operative_config.gin")

    @property
    def active(self) -> bool:
        return self.run is not None

    def save_files(self, *names: str) -> None:
        if not self.active:
            return
        import shutil

        for name in names:  # files in run.dir are uploaded with the run (offline: by `wandb sync`)
            path = os.path.join(self.run_dir, name)
            if os.path.exists(path):
                shutil.copyfile(path, os.path.join(self.run.dir, name))

    def log_stats(self, stage: str, record: dict) -> None:
        """One stats.jsonl record under `<stage>/` with `<stage>/step` as its x-axis."""
        if self.active:
            self.run.log({f"{stage}/{k}": v for k, v in record.items()})

    def log_images(self, images: dict) -> None:
        """{name: path of a PNG} → W&B images."""
        if not self.active:
            return
        import wandb

        self.run.log({k: wandb.Image(p) for k, p in images.items() if os.path.exists(p)})

    def log_table(self, name: str, rows: list[dict]) -> None:
        if not self.active or not rows:
            return
        import wandb

        keys = list(dict.fromkeys(k for r in rows for k in r))
        self.run.log({name: wandb.Table(columns=keys, data=[[r.get(k) for k in keys] for r in rows])})

    def summary(self, values: dict) -> None:
        if self.active:
            self.run.summary.update(values)

    def update_config(self, values: dict) -> None:
        """Adds parameters to the run's config (the loop calls it after its first step with the
        operative config, so unbound defaults such as train.seed are logged too)."""
        if self.active:
            self.run.config.update(values, allow_val_change=True)

    def finish(self) -> None:
        if self.active:
            offline = self.run.settings.mode == "offline"
            folder = os.path.dirname(self.run.dir) if offline else None
            self.run.finish()
            self.run = None
            if folder:  # offline: one line instead of W&B's console summary
                if _collected is not None:
                    _collected.append(folder)
                else:
                    print(f"[decm] W&B offline run: {sync_command([folder])}", flush=True)


_collected: list | None = None  # offline folders gathered by `one_sync_line` (None: print one line per run)


def sync_command(folders) -> str:
    """One `wandb sync` command that uploads these offline folders and every other attempt of their runs
    (each resume or evaluation of a run starts a folder `<run_dir>/wandb/offline-run-*`; W&B appends the
    attempts of one run id in order): path parts that differ between the runs become `*`."""
    patterns = sorted({os.path.join(os.path.dirname(f), "offline-run-*") for f in folders})
    parts = [p.split(os.sep) for p in patterns]
    if len(patterns) > 1 and len({len(p) for p in parts}) == 1:
        patterns = [os.sep.join(c[0] if len(set(c)) == 1 else "*" for c in zip(*parts))]
    return "wandb sync " + " ".join(patterns)


@contextlib.contextmanager
def one_sync_line(prog: str = "decm"):
    """Within the block, finished offline runs print nothing; at its end one line names them all and the
    one command that uploads them (analysis scripts and sweeps that train many runs)."""
    global _collected
    outer, _collected = _collected, []
    try:
        yield
    finally:
        folders, _collected = _collected, outer
        if folders:
            runs = len({os.path.dirname(os.path.dirname(f)) for f in folders})
            print(f"[{prog}] W&B: {runs} offline run{'s' if runs != 1 else ''}; upload with: "
                  f"{sync_command(folders)}", flush=True)
