"""Argument parsers for every command: the docstring's first paragraph as the description, and each
option's default in `--help`."""

from __future__ import annotations

import argparse


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in the help (once: not when the text already says its default, nor for None); the
    description kept as written."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default is None or "(default" in text:
            return text
        return super()._get_help_string(action)


def parser(prog: str | None, doc: str | None) -> argparse.ArgumentParser:
    """An ArgumentParser whose description is the first paragraph of `doc` (never cut mid-sentence)."""
    first = (doc or "").strip().split("\n\n")[0]
    return argparse.ArgumentParser(prog=prog, description=" ".join(first.split()), formatter_class=_Formatter)


def interrupted(prog: str, e: BaseException) -> int:
    """Ctrl-C in a command: one line saying where the work stopped and how to go on; exit code 130.

    `e` is a `decm.preemption.Interrupted` when the training loop stopped at a step boundary with a
    checkpoint, else a plain KeyboardInterrupt (outside the loop: finished work is on disk)."""
    import sys

    step = getattr(e, "step", None)
    where = f"interrupted at step {step}" if step is not None else "interrupted"
    print(f"\n{prog}: {where}; rerun the same command to resume", file=sys.stderr, flush=True)
    return 130


def main_exit(prog: str, main, argv=None) -> int:
    """Runs a command's `main(argv)`; Ctrl-C anywhere in it ends with `interrupted`'s line and 130 (its
    runs stopped at checkpoints; rerunning the command resumes them)."""
    try:
        return main(argv)
    except KeyboardInterrupt as e:
        return interrupted(prog, e)
