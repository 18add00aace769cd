"""viz/plots.py and viz/widgets.py on synthetic Grams and on the history of a real merge of a tiny MLP."""
import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.figure import Figure

from iteris_lab import merge_loras
from iteris_lab.viz import plots, widgets

from tiny import merge_case


@pytest.fixture(scope="module")
def history(tmp_path_factory):
    """IterIS on the tiny MLP (3 adapted Linear layers "0", "2", "4"), 2 tasks, 3 solves."""
    case = merge_case("mlp", tmp_path_factory.mktemp("plots"), n_tasks=2)
    return merge_loras(case.model, case.adapters, case.calibration, schedule="jacobi", max_iter=3,
                       progress=False).history


def _gram(n=12, seed=0):
    x = torch.randn(50, n, generator=torch.Generator().manual_seed(seed)) * torch.linspace(3, 0.1, n)
    return x.T @ x


def test_short_names_drop_the_shared_prefix():
    names = ["encoder.layer.0.attention.self.query", "encoder.layer.1.output.dense"]
    assert plots.short_names(names) == ["0.attention.self.query", "1.output.dense"]
    assert plots.short_names(["0", "2"]) == ["0", "2"]
    assert plots.task_labels(None, 2) == ["task 0", "task 1"]
    with pytest.raises(ValueError):
        plots.task_labels(["a"], 2)


def test_covariance_heatmap_saturates_only_the_largest_entries():
    g = _gram()
    fig = plots.plot_covariance(g, title="layer 0")
    assert isinstance(fig, Figure) and fig.axes[0].get_title() == "layer 0"
    assert fig.axes[0].get_xlabel().startswith("input feature") and len(fig.axes) == 2  # heatmap + colour bar
    assert np.asarray(fig.axes[0].collections[0].get_array()).size == 12 * 12
    mesh = fig.axes[0].collections[0]
    assert mesh.norm.vmax < float(g.abs().max())  # robust colour range: the largest entries saturate
    corr = plots.plot_covariance(g, correlation=True, limit=5)
    values = np.asarray(corr.axes[0].collections[0].get_array()).reshape(5, 5)
    assert np.allclose(np.diag(values), 1.0) and np.abs(values).max() <= 1 + 1e-9


def test_spectrum_is_normalized_and_log():
    iso = torch.eye(8) * 3.0
    fig = plots.plot_spectrum({"isotropic": iso, "anisotropic": _gram(8)})
    ax = fig.axes[0]
    assert ax.get_yscale() == "log" and "eigenvalue" in ax.get_xlabel()
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert set(lines) == {"isotropic", "anisotropic"}
    assert np.allclose(lines["isotropic"].get_ydata(), 1.0)  # XᵀX ∝ I: a flat spectrum
    y = lines["anisotropic"].get_ydata()
    assert y[0] == pytest.approx(1.0) and np.all(np.diff(y) <= 1e-12) and y[-1] < 1e-2


def test_weights_heatmap_is_layers_by_tasks(history):
    fig = plots.plot_weights(history, iteration=1, tasks=["a", "b"])
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["0", "2", "4"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b"]
    assert ax.get_xlabel() == "task" and ax.get_ylabel() == "layer" and "iteration 1" in ax.get_title()
    shares = np.asarray(ax.collections[0].get_array()).reshape(3, 2)
    assert np.allclose(shares.sum(axis=1), 1.0)
    raw = np.asarray(plots.plot_weights(history, normalize=False).axes[0].collections[0].get_array()).reshape(3, 2)
    assert np.allclose(raw, [history[0].lambdas[n] for n in ("0", "2", "4")])
    with pytest.raises(ValueError, match="no iteration 9"):
        plots.plot_weights(history, iteration=9)


def test_objective_plot_has_solved_and_merged_lines(history):
    ax = plots.plot_objective(history).axes[0]
    labels = [line.get_label() for line in ax.get_lines()]
    assert labels == ["task 0: solved", "task 0: merged model", "task 1: solved", "task 1: merged model"]
    solved = ax.get_lines()[0]
    assert list(solved.get_xdata()) == [1, 2, 3]
    expected = np.mean([history[0].objective[n][0] for n in history[0].objective])
    assert solved.get_ydata()[0] == pytest.approx(expected)
    assert list(ax.get_lines()[1].get_xdata()) == [1, 2]  # merged model of solves 1 and 2
    assert "iteration" in ax.get_xlabel() and ax.get_yscale() == "log"


def test_drift_plot_one_line_per_iteration(history):
    ax = plots.plot_drift(history, task=1, tasks=["a", "b"]).axes[0]
    lines = ax.get_lines()
    assert [line.get_label() for line in lines] == ["iteration 1", "iteration 2", "iteration 3"]
    assert np.allclose(lines[0].get_ydata(), 0.0)  # X̃ = X at the first solve
    assert lines[1].get_ydata()[0] == pytest.approx(0.0, abs=1e-6)  # the first layer's input never changes
    assert lines[1].get_ydata()[-1] > 0
    assert "(b)" in ax.get_title() and "depth" in ax.get_xlabel()


def test_change_plot_shows_the_max_over_layers_on_a_log_scale(history):
    ax = plots.plot_change(history).axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    top = lines["max over layers"]
    assert list(top.get_xdata()) == [1, 2, 3] and top.get_ydata()[0] == pytest.approx(1.0)
    assert any(label.startswith("exactly 0") for label in lines)  # layer "0" is final after one solve
    assert ax.get_yscale() == "log" and "iteration" in ax.get_xlabel()


def test_scores_from_dicts_and_frames():
    rows = [{"method": m, "task": t, "normalized": v}
            for m, vals in {"iteris": (0.9, 0.8), "linear": (0.7, 0.6)}.items() for t, v in zip("xy", vals)]
    for table in (rows, pd.DataFrame(rows)):
        ax = plots.plot_scores(table).axes[0]
        assert [t.get_text() for t in ax.get_xticklabels()] == ["x", "y", "mean"]
        heights = sorted(round(p.get_height(), 6) for p in ax.patches if p.get_height() > 0)
        assert heights == sorted([0.9, 0.8, 0.7, 0.6, 0.85, 0.65])
        assert ax.get_ylabel() == "normalized score"
    with pytest.raises(ValueError, match="normalized"):
        plots.plot_scores([{"method": "a", "task": "x"}])


def test_lines_and_bars_label_axes():
    table = [{"n": n, "err": 1 / n, "alpha": a} for n in (1, 2, 4) for a in ("0", "1e-4")]
    ax = plots.plot_lines(table, "n", "err", hue="alpha", logy=True, xlabel="samples", title="t").axes[0]
    assert ax.get_xlabel() == "samples" and ax.get_ylabel() == "err" and ax.get_yscale() == "log"
    ax = plots.plot_bars(table, "n", "err", hue="alpha", reference=1.0).axes[0]
    assert ax.get_xlabel() == "n" and len(ax.get_lines()) == 1


def test_widgets_build_and_redraw(history):
    pytest.importorskip("ipywidgets")
    grams = {"a": {"enc.0": _gram(6, 0), "enc.1": _gram(6, 1)}, "b": {"enc.0": _gram(6, 2), "enc.1": _gram(6, 3)}}
    box = widgets.covariance_widget(grams)
    assert isinstance(box.figure, Figure) and "a, 0" in box.figure.axes[0].get_title()
    task, layer = box.children[0].children
    layer.value = "enc.1"
    assert "a, 1" in box.figure.axes[0].get_title()

    box = widgets.spectrum_widget(grams, alpha=1e-3)
    _, alpha = box.children[0].children
    alpha.value = 1e-2
    floor = min(line.get_ydata().min() for line in box.figure.axes[0].get_lines())
    assert floor > 1e-3  # α‖G‖_F·I lifts every eigenvalue

    histories = {"paper": history, "official": history[:2]}
    box = widgets.weights_widget(histories)
    run, iteration = box.children[0].children
    assert iteration.max == 3
    iteration.value = 3
    assert "iteration 3" in box.figure.axes[0].get_title()
    run.value = "official"  # a shorter history shows its last iteration
    assert "iteration 2" in box.figure.axes[0].get_title()

    box = widgets.drift_widget(histories, tasks=["a", "b"])
    run, task = box.children[0].children
    task.value = 1
    assert "input drift" in box.figure.axes[0].get_title() and len(box.figure.axes[0].get_lines()) == 3


def test_interval_plot_draws_each_interval_in_its_verdicts_colour():
    from matplotlib.colors import to_rgba

    from iteris_lab.measure import paired_difference

    ahead = paired_difference([1.0] * 8, [0.0] * 8)
    noise = paired_difference([1, 0, 1, 0], [0, 1, 0, 1])
    ax = plots.plot_intervals({"a vs b": ahead, "c vs d": noise}, xlabel="accuracy difference").axes[0]
    lines = [c for c in ax.containers]
    assert len(lines) == 2 and [t.get_text() for t in ax.get_yticklabels()] == ["a vs b", "c vs d"]
    dots = [c.lines[0] for c in lines]
    assert to_rgba(dots[0].get_color()) == to_rgba("C2") and to_rgba(dots[1].get_color()) == to_rgba("0.45")
    assert dots[0].get_xdata()[0] == ahead.mean == 1.0
    with pytest.raises(ValueError):
        plots.plot_intervals({})


def test_weights_shared_puts_every_panel_on_one_colour_scale(history):
    flat = [type(r)(**{**r.__dict__, "lambdas": {n: [1.0, 1.0] for n in r.lambdas}}) for r in history]
    fig = plots.plot_weights_shared({"varied": history, "flat": flat}, tasks=["a", "b"])
    varied_ax, flat_ax = fig.axes[:2]
    assert [varied_ax.get_title(), flat_ax.get_title()] == ["varied", "flat"]
    meshes = [ax.collections[0] for ax in (varied_ax, flat_ax)]
    assert meshes[0].norm.vmin == meshes[1].norm.vmin and meshes[0].norm.vmax == meshes[1].norm.vmax
    lam = np.array([history[0].lambdas[n] for n in ("0", "2", "4")])
    shares = lam / lam.sum(axis=1, keepdims=True)
    assert meshes[0].norm.vmin == pytest.approx(min(shares.min(), 0.5))
    assert meshes[0].norm.vmax == pytest.approx(max(shares.max(), 0.5))
    assert np.allclose(np.asarray(meshes[1].get_array()), 0.5)
    assert len(fig.axes) == 3  # two heatmaps, one colour bar


def test_interval_plot_spans_each_interval_draws_zero_and_names_the_verdicts():
    from iteris_lab.measure import PairedDifference

    diffs = {"ahead": PairedDifference(0.2, 0.1, 0.3, 50, 0.95), "noise": PairedDifference(0.0, -0.1, 0.1, 50, 0.95)}
    ax = plots.plot_intervals(diffs, title="t").axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["ahead", "noise"]
    bars = [c for c in ax.containers]
    assert len(bars) == 2
    segments = bars[0].lines[2][0].get_segments()[0]
    assert np.allclose(sorted(segments[:, 0]), [0.1, 0.3])  # the bar spans the interval
    assert any(np.allclose(line.get_xdata(), 0.0) for line in ax.get_lines())  # the zero line
    assert sorted(t.get_text() for t in ax.get_legend().get_texts()) == ["ahead", "within noise"]
    with pytest.raises(ValueError):
        plots.plot_intervals({})
