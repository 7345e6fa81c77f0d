"""Every command's --help: runs, shows defaults, gives every option a help text, ends its description
on a full sentence."""

import argparse
import importlib
import importlib.util
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(__file__))
MODULES = ["decm.launch", "decm.evaluate", "decm.report", "decm.eval.ref_stats", "decm.data.encode_latents",
           "decm.eval.digits_features", "decm.export"]
SCRIPTS = ["analysis/ablation_table.py", "analysis/loss_divergence.py", "analysis/error_accumulation.py",
           "analysis/n2n_diagnostic.py", "analysis/run_table.py", "analysis/digits_nfe.py", "analysis/study_nfe.py", "analysis/seed_variance.py", "analysis/posthoc_ema.py",
           "bench/step_cost.py",
           "bench/sampling.py", "bench/memory.py", "bench/mutations.py", "bench/xl_cpu.py", "bench/install_size.py",
           "docs/build_results.py",
           "sweeps/weight_sweep.py"]


def load(target):
    if target.endswith(".py"):
        sys.path.insert(0, os.path.join(ROOT, os.path.dirname(target)))
        spec = importlib.util.spec_from_file_location(os.path.basename(target)[:-3], os.path.join(ROOT, target))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    return importlib.import_module(target)


@pytest.mark.parametrize("target", MODULES + SCRIPTS)
def test_help_shows_defaults_and_documents_every_option(target, monkeypatch, capsys):
    seen = []
    original = argparse.ArgumentParser.parse_args

    def capture(self, args=None, namespace=None):
        seen.append(self)
        return original(self, args, namespace)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    mod = load(target)
    with pytest.raises(SystemExit) as e:
        mod.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    parser = seen[0]
    assert parser.description and parser.description.rstrip().endswith((".", ")", "?")), parser.description
    undocumented = [a.dest for a in parser._actions if a.help is None and a.dest != "help"]
    assert not undocumented, undocumented
    with_default = [a for a in parser._actions if a.default not in (None, False, argparse.SUPPRESS, [])
                    and a.help != argparse.SUPPRESS and a.dest != "help"]
    assert not with_default or "(default: " in out, out
    formatter = parser._get_formatter()  # its help strings hold '%(default)s' where argparse fills the default in
    doubled = [a.dest for a in parser._actions
               if a.help and len(re.findall(r"\(default(?!\))", formatter._get_help_string(a))) > 1]
    assert not doubled and "(default: None)" not in out, doubled  # each default said once, never 'None'


def test_timing_helper_is_not_a_command():
    proc = subprocess.run([sys.executable, "bench/_timing.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode != 0 and "helper module" in proc.stderr
