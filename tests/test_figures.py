"""Figures a researcher can read: labels, ticks, scales, layout and titles, read back from the figure
objects the plotting functions save."""

import pytest
import torch

from decm import plots


@pytest.fixture
def saved(monkeypatch):
    """Captures every figure passed to decm.plots.save (then saves it as usual)."""
    figs = []
    original = plots.save

    def capture(fig, path, dpi=100, **kwargs):
        figs.append(fig)
        original(fig, path, dpi, **kwargs)

    monkeypatch.setattr(plots, "save", capture)
    return figs


def test_nfe_panels_label_axes_tick_used_nfes_and_say_lower_is_better(tmp_path, saved):
    from decm.eval.evaluate import plot_nfe

    rows = [{"model": m, "sampler": s, "nfe": k, "sw2": v, "energy": v / 10}
            for m, s, ks in (("student", "chain", (1, 2, 4)), ("teacher", "teacher_euler", (1, 2, 4, 50)))
            for k, v in zip(ks, (0.5, 0.4, 0.3, 0.2))]
    plot_nfe(rows, str(tmp_path / "nfe.png"), label="fm_cd-seed0")
    ax = saved[-1].axes[0]
    assert ax.get_xlabel().startswith("NFE") and ax.get_ylabel() == "sw2 (lower is better)"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "2", "4", "50"]
    assert ax.get_yscale() == "linear"  # 0.2–0.5: no decade, no log scale
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["fm_cd-seed0 · chain", "teacher · Euler"]


def test_coinciding_curves_are_said_to_coincide(tmp_path, saved):
    pts = [(1, 0.5), (2, 0.4)]
    plots.line_panels({"sw2": [("a", pts), ("b", list(pts))]}, str(tmp_path / "x.png"), xlabel="NFE")
    labels = [t.get_text() for t in saved[-1].axes[0].get_legend().get_texts()]
    assert labels == ["a", "b (same as a)"]


def test_report_losses_have_one_legend_beside_the_panels_and_claim_no_comparison_across_objectives(tmp_path, saved):
    from decm.report import plot_losses

    runs = [{"name": f"run{i}", "stats": [{"step": s, "loss/total": 1.0 / (s + i), "loss/cm": 0.5 / (s + i)}
                                           for s in (1, 2, 3)]} for i in range(6)]
    assert plot_losses(runs, str(tmp_path / "losses.png"))
    fig = saved[-1]
    assert all(ax.get_legend() is None for ax in fig.axes)
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == [f"run{i}" for i in range(6)]
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)  # the saved figure is closed: draw it again to measure its layout
    canvas.draw()
    renderer = canvas.get_renderer()
    box = legend.get_window_extent(renderer)
    assert not any(box.overlaps(ax.get_window_extent(renderer)) for ax in fig.axes)  # covers no curve
    assert [ln.get_color() for ln in fig.axes[0].lines] == [ln.get_color() for ln in fig.axes[1].lines]
    assert all(ax.get_ylabel() == "value in the run's own objective" for ax in fig.axes)


def test_a_figure_of_one_seed_of_several_says_which(tmp_path, saved):
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "analysis", "loss_divergence.py")
    spec = importlib.util.spec_from_file_location("loss_divergence", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    stats = [{"step": s, "loss/total": 1.0 / s, "grad/cm_sup": 1.0, "grad/cm_self": 2.0} for s in range(1, 6)]
    summaries = {"cd_only": {"divergence_rate": 0.1}, "cd_fm": {"divergence_rate": 0.0}}
    mod.plots({"cd_only": stats, "cd_fm": stats}, summaries, str(tmp_path), caption="training seed 0 of 3")
    titled = [f for f in saved if f._suptitle is not None and f._suptitle.get_text() == "training seed 0 of 3"]
    assert len(titled) == 2  # grad_parts.png and losses.png
    assert os.path.exists(tmp_path / "divergence.png")


def test_many_panels_are_a_grid_not_a_strip(tmp_path, saved):
    panels = {f"m{i}": [("run", [(1, i + 1.0), (2, i + 2.0)])] for i in range(7)}
    plots.line_panels(panels, str(tmp_path / "g.png"), xlabel="training step")
    w, h = saved[-1].get_size_inches()
    assert w / h < 2.5  # 3 columns × 3 rows, not 7 × 1
    assert sum(ax.get_visible() for ax in saved[-1].axes) == 7


def test_sample_panels_are_titled_with_the_run_and_nfe_and_not_clipped(tmp_path, saved):
    from decm.eval.evaluate import panel_title, save_picture

    g = torch.Generator().manual_seed(0)
    data = torch.randn(500, 2, generator=g) * 3.0  # wider than a fixed ±3 window
    pictures = {panel_title("student", "chain", k, "fm_cd-seed0"): data for k in (1, 2, 4)}
    pictures.update({panel_title("teacher", "teacher_euler", k, "x"): data for k in (1, 2, 4, 50)})
    save_picture(pictures, data, str(tmp_path / "samples.png"), images=False, num_classes=0)
    fig = saved[-1]
    titles = [ax.get_title() for ax in fig.axes if ax.get_visible()]
    assert titles[1] == "fm_cd-seed0 · chain · NFE 1" and titles[4] == "teacher · Euler · 1 step"
    assert titles[-1] == "teacher · Euler · 50 steps" and not any("DE-CM" in t for t in titles)
    w, h = fig.get_size_inches()
    assert w / h < 2.5  # 8 panels in 2 rows of 4
    ax = fig.axes[0]
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    inside = ((data[:, 0] >= x0) & (data[:, 0] <= x1) & (data[:, 1] >= y0) & (data[:, 1] <= y1)).float().mean()
    assert inside > 0.99


def test_sweep_history_has_integer_trial_ticks_and_the_metric_name_and_no_importances_from_few_trials(tmp_path, saved):
    import optuna
    from optuna.distributions import FloatDistribution

    from decm import sweep

    spec = sweep.SweepSpec(("x",), (), {"losses.n2n_loss.lam": {"type": "float", "low": 0.0, "high": 1.0},
                                        "losses.n2n_loss.gamma": {"type": "float", "low": 0.0, "high": 1.0}},
                           str(tmp_path), "demo", "", 4, "student.1.sw2")
    study = optuna.create_study()
    dists = {k: FloatDistribution(0.0, 1.0) for k in spec.space}
    for i in range(4):
        study.add_trial(optuna.trial.create_trial(params={k: 0.1 * i + 0.05 for k in dists}, distributions=dists,
                                                  value=1.0 / (i + 1)))
    assert sweep.plot_history(study, spec, str(tmp_path / "h.png"))
    ax = saved[-1].axes[0]
    assert ax.get_ylabel() == "student.1.sw2 (lower is better)" and ax.get_xlabel() == "trial number"
    assert all(float(t).is_integer() for t in ax.get_xticks())
    assert not sweep.plot_importances(study, spec, str(tmp_path / "i.png"))  # 4 trials: not drawn
    assert not (tmp_path / "i.png").exists()
