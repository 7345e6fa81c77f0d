"""The submitted unit: a frozen RunSpec (plain data) and the callable that runs it.

The job never receives gin objects: it re-parses `<run_dir>/config.gin` (written at launch) inside the
process that runs it — locally, in a submitit subprocess, or on a Slurm node.
"""

from __future__ import annotations

import dataclasses
import os
import shutil

import gin

from decm import registry


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


def one_line(e: BaseException) -> str:
    msg = " ".join(str(e).split())
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def parse(gin_files, bindings) -> str:
    """Parses gin files + bindings (unknown keys are errors) and returns the resolved config string."""
    registry.import_all()
    import decm.experiment  # noqa: F401  (registers train / evaluate / experiment)

    for path in gin_files:
        if not os.path.isfile(path):
            raise ConfigError(f"gin file not found: {path}")
    gin.clear_config()
    try:
        gin.parse_config_files_and_bindings(list(gin_files), list(bindings), skip_unknown=False,
                                            finalize_config=False)
    except Exception as e:  # gin raises ValueError / KeyError / ParseError subclasses
        raise ConfigError(f"bad gin config: {one_line(e)}") from None
    return gin.config_str()


def build(run_dir: str) -> dict:
    """Builds every object of the parsed experiment without running it (dry run / validation)."""
    from decm.experiment import experiment

    try:
        return experiment(run_dir, build_only=True)
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(one_line(e)) from None


def prepare(spec: RunSpec) -> str:
    """Validates the spec, then creates the run directory and writes its gin snapshot.

    Nothing is created if validation fails. A run directory whose `config.gin` differs from this
    config is refused unless `spec.force`.
    """
    config = parse(spec.gin_files, spec.bindings)
    build(spec.run_dir)
    snap = os.path.join(spec.run_dir, "config.gin")
    if os.path.exists(snap):
        with open(snap) as f:
            old = f.read()
        if old != config and not spec.force:
            raise ConfigError(f"{spec.run_dir} was launched with a different gin config; "
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
    return config


def run(spec: RunSpec) -> dict:
    """The job body: re-parse the run directory's snapshot and run the experiment."""
    from decm.experiment import experiment

    parse([os.path.join(spec.run_dir, "config.gin")], [])
    return experiment(spec.run_dir)
