"""Argument parsers for every command: the docstring's first paragraph as the description, and each
option's default in `--help`."""

from __future__ import annotations

import argparse


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in the help; the description kept as written."""


def parser(prog: str | None, doc: str | None) -> argparse.ArgumentParser:
    """An ArgumentParser whose description is the first paragraph of `doc` (never cut mid-sentence)."""
    first = (doc or "").strip().split("\n\n")[0]
    return argparse.ArgumentParser(prog=prog, description=" ".join(first.split()), formatter_class=_Formatter)
