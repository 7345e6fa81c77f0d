"""Optuna sweeps: two local workers on a journal file, a killed worker's trial reaped to FAIL, a bad
space rejected before any trial, rerunning resumes the study."""

import importlib.util
import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
from optuna.trial import TrialState

from decm import sweep

spec = importlib.util.spec_from_file_location("weight_sweep", "sweeps/weight_sweep.py")
weight_sweep = importlib.util.module_from_spec(spec)
spec.loader.exec_module(weight_sweep)

TINY = ["--bind", "backbones.mlp.width = 16", "--bind", "evaluate.n_samples = 200",
        "--bind", "evaluate.student_nfe = (1,)", "--bind", "wandb.enabled = False"]


def argv(tmp_path, trials, workers, steps=6, extra=()):
    return ["--gin", "sweeps/toy2d_sweep.gin", "--space", "sweeps/spaces/tiny.yaml", "--trials", str(trials),
            "--workers", str(workers), "--sweep-dir", str(tmp_path / "sw"), "--study", "t",
            "--bind", f"distill/train.steps = {steps}"] + TINY + list(extra)


def states(tmp_path):
    study = optuna.load_study(study_name="t", storage=sweep.storage_for(
        sweep.SweepSpec((), (), {}, str(tmp_path / "sw"), "t")))
    return [t.state for t in study.get_trials()], study


def test_two_local_workers_complete_a_study_and_a_rerun_resumes_it(tmp_path, capsys):
    assert weight_sweep.main(argv(tmp_path, 4, 2, extra=["--report-every", "3"])) == 0
    st, study = states(tmp_path)
    assert all(set(t.intermediate_values) and set(t.intermediate_values) <= {3, 6} for t in study.get_trials())  # the pruner feed
    finished = st.count(TrialState.COMPLETE) + st.count(TrialState.PRUNED)  # the median pruner may prune
    assert finished == len(st) and 4 <= len(st) <= 5 and st.count(TrialState.COMPLETE) >= 1  # 2 workers may overshoot by 1
    jobs = {t.user_attrs["job_id"] for t in study.get_trials()}
    assert len(jobs) == 2 and all(j.startswith("pid:") for j in jobs)  # both workers ran trials
    for t in study.get_trials(states=(TrialState.COMPLETE,)):
        assert os.path.exists(os.path.join(t.user_attrs["run_dir"], "metrics.json")) and t.user_attrs["wandb_id"]
    sw = tmp_path / "sw"
    best = (sw / "best.gin").read_text()
    assert "losses.n2n_loss.lam = " in best and "fm/objectives.term.weight = " in best
    assert len((sw / "trials.csv").read_text().strip().splitlines()) == 1 + len(st)
    assert (sw / "history.png").exists() and (sw / "slices.png").exists()
    first = [t.params for t in study.get_trials()]
    assert weight_sweep.main(argv(tmp_path, len(first) + 2, 2)) == 0  # resumes: more trials, the first untouched
    st, study = states(tmp_path)
    assert len(first) + 2 <= st.count(TrialState.COMPLETE) + st.count(TrialState.PRUNED) <= len(first) + 3
    assert [t.params for t in study.get_trials()][:len(first)] == first


def test_killed_worker_trial_is_reaped_to_fail_and_the_study_finishes(tmp_path):
    cmd = [sys.executable, "sweeps/weight_sweep.py"] + argv(tmp_path, 2, 1, steps=300)
    main = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, victim = time.time() + 120, None
    while time.time() < deadline and victim is None:
        time.sleep(0.5)
        if (tmp_path / "sw" / "journal.log").exists():
            _, study = states(tmp_path)
            running = study.get_trials(states=(TrialState.RUNNING,))
            if running and "job_id" in running[0].user_attrs:
                victim = running[0]
    assert victim is not None, "no running trial within 120 s"
    time.sleep(1.0)
    os.kill(int(victim.user_attrs["job_id"].split(":")[2]), signal.SIGKILL)  # the worker dies mid-trial
    assert main.wait(timeout=120) == 1  # its only worker died: no trial completed, so the command fails
    st, _ = states(tmp_path)
    assert st[victim.number] == TrialState.FAIL  # reaped by the launcher once its worker was gone
    assert weight_sweep.main(argv(tmp_path, 2, 1, steps=300)) == 0  # rerun: the study finishes
    st, _ = states(tmp_path)
    assert st.count(TrialState.COMPLETE) == 2 and st.count(TrialState.FAIL) == 1


@pytest.mark.parametrize("space,needle", [
    ("losses.nope.x: {type: float, low: 0, high: 1}", "losses.nope.x"),
    ("objectives.objective.time_sampler: {type: categorical, choices: ['@time_samplers.nope()']}", "not a registered"),
    ("losses.n2n_loss.lam: {type: float, low: 1, high: 0}", "low < high"),
])
def test_bad_space_fails_before_any_trial(tmp_path, capsys, space, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(space + "\n")
    args = argv(tmp_path, 2, 1)
    args[args.index("--space") + 1] = str(path)
    assert weight_sweep.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]
    assert not (tmp_path / "sw").exists()


def test_sqlite_is_refused_for_parallel_workers(tmp_path, capsys):
    assert weight_sweep.main(argv(tmp_path, 2, 2, extra=["--storage", f"sqlite:///{tmp_path}/s.db"])) == 2
    assert "SQLite" in capsys.readouterr().err


def test_wrong_metric_is_one_line_before_any_training(tmp_path, capsys):
    assert weight_sweep.main(argv(tmp_path, 2, 1, extra=["--metric", "student.1.fid"])) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'student.1.fid' is not produced" in err[0] and "student.1.sw2" in err[0]
    assert not (tmp_path / "sw").exists()


def test_a_sweep_whose_trials_all_fail_exits_non_zero_with_the_causes(tmp_path, capsys):
    """One worker, --trials 1: exactly one trial runs; it fails after training, so no trial completes:
    exit 1, the cause printed, and only the files actually written are listed."""
    code = weight_sweep.main(argv(tmp_path, 1, 1, extra=["--bind", "evaluate.n_samples = -5"]))
    out, err = capsys.readouterr()
    assert code == 1
    st, _ = states(tmp_path)
    assert st == [TrialState.FAIL]  # exactly one trial for one worker
    assert "no trial completed" in err and "trial 0:" in err and "worker logs:" in err
    assert "[sweep] trial 0 FAIL:" in out  # the parent reports each trial as it ends
    assert "best.gin" not in out and not (tmp_path / "sw" / "best.gin").exists()


def test_a_sweep_journal_opens_in_optuna_dashboard(tmp_path):
    """The `dashboard` extra: optuna-dashboard serves the study of a sweep's journal file, and pandas makes
    `trials_dataframe()` work."""
    import io

    from optuna_dashboard import wsgi

    spec_ = sweep.SweepSpec((), (), {"x": {"type": "float", "low": 0.0, "high": 1.0}}, str(tmp_path), "dash")
    storage = sweep.storage_for(spec_)
    study = optuna.create_study(study_name="dash", storage=storage)
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    assert (tmp_path / "journal.log").exists()
    status = {}
    env = {"REQUEST_METHOD": "GET", "PATH_INFO": "/api/studies", "wsgi.input": io.BytesIO(), "wsgi.errors": sys.stderr,
           "SERVER_NAME": "localhost", "SERVER_PORT": "8080", "wsgi.url_scheme": "http", "QUERY_STRING": ""}
    body = b"".join(wsgi(storage)(env, lambda s, h, exc_info=None: status.update(code=s)))
    assert status["code"] == "200 OK" and b'"study_name": "dash"' in body
    assert study.trials_dataframe().shape[0] == 2


def test_a_broken_experiment_is_not_blamed_on_the_space(tmp_path, capsys):
    args = argv(tmp_path, 2, 1)
    args[args.index("--gin") + 1] = "sweeps/toy2.gin"
    assert weight_sweep.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the experiment (--gin / --bind" in err[0] and "gin file not found: sweeps/toy2.gin" in err[0]
    assert "space" not in err[0].split("gin file not found")[1]
