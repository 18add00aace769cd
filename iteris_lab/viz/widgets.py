"""ipywidgets controls (layer, task, iteration, α) around the plain plotting functions of plots.py.

Each widget is a VBox of controls over an Output that redraws one plots.py figure whenever a control changes;
it is built (and drawn once) without a browser, so tests can create it. ipywidgets is imported only here,
inside the functions, so the rest of the library does not need it.
"""
from __future__ import annotations

from typing import Callable

from ..objective import regularize
from . import plots


def figure_widget(plot: Callable[..., object], controls: dict):
    """controls: {keyword: ipywidgets control}; plot(**values) returns a Figure. Returns a VBox (the controls in a
    row, the figure below) with `.redraw()`, which draws the current values (called once here and on every
    change), and `.figure`, the Figure last drawn."""
    import ipywidgets as w
    from IPython.display import display

    out = w.Output()

    def redraw(*_):
        figure = plot(**{key: control.value for key, control in controls.items()})
        out.clear_output(wait=True)
        with out:
            display(figure)
        box.figure = figure

    box = w.VBox([w.HBox(list(controls.values())), out])
    box.redraw = redraw
    for control in controls.values():
        control.observe(redraw, names="value")
    redraw()
    return box


def _dropdown(options, description: str):
    """A dropdown on its first option; options are values or (label, value) pairs."""
    import ipywidgets as w

    return w.Dropdown(options=list(options), description=description)


def _layer_options(names) -> list[tuple[str, str]]:
    return list(zip(plots.short_names(names), names))


def covariance_widget(grams: dict, correlation: bool = True, limit: int | None = None):
    """Heatmap of XᵀX by task and layer. grams: {task: {layer: (in, in)}} (every task has the same layers)."""
    tasks = list(grams)
    layers = list(grams[tasks[0]])

    short = dict(zip(layers, plots.short_names(layers)))

    def draw(task, layer):
        return plots.plot_covariance(grams[task][layer], title=f"XᵀX — {task}, {short[layer]}", limit=limit,
                                     correlation=correlation)

    return figure_widget(draw, {"task": _dropdown(tasks, "task"), "layer": _dropdown(_layer_options(layers), "layer")})


def spectrum_widget(grams: dict, alpha: float = 1e-4):
    """Eigenvalue spectra of the regularized Gram X̃ᵀX̃ + α‖X̃ᵀX̃‖_F·I, one line per task, by layer and α
    (log slider): α lifts the bottom of the spectrum to α·‖G‖_F. grams: {task: {layer: (in, in)}}."""
    import ipywidgets as w

    tasks = list(grams)
    layers = list(grams[tasks[0]])

    def draw(layer, alpha):
        regular = {task: regularize(grams[task][layer].double(), alpha) for task in tasks}
        return plots.plot_spectrum(regular, title=f"spectrum of XᵀX + α‖XᵀX‖_F·I, α = {alpha:.1e}")

    slider = w.FloatLogSlider(value=alpha, base=10, min=-9, max=-1, step=0.5, description="α",
                              readout_format=".0e")
    return figure_widget(draw, {"layer": _dropdown(_layer_options(layers), "layer"), "alpha": slider})


def weights_widget(histories: dict, tasks=None):
    """λ heatmap (layers × tasks) by run and iteration. histories: {label: list of IterationRecord}."""
    import ipywidgets as w

    labels = list(histories)
    longest = max(len(h) for h in histories.values())

    def draw(run, iteration):
        history = histories[run]
        iteration = min(iteration, history[-1].iteration)
        return plots.plot_weights(history, iteration, tasks=tasks, title=f"λ share — {run}, iteration {iteration}")

    slider = w.IntSlider(value=1, min=1, max=longest, description="iteration")
    return figure_widget(draw, {"run": _dropdown(labels, "run"), "iteration": slider})


def drift_widget(histories: dict, tasks=None):
    """Input drift against depth by run and task (or their mean). histories: {label: list of IterationRecord}."""
    labels = list(histories)
    first = next(iter(histories.values()))
    n_tasks = len(next(iter(first[0].drift.values())))
    names = plots.task_labels(tasks, n_tasks)
    task_options = [("mean", -1)] + [(name, i) for i, name in enumerate(names)]

    def draw(run, task):
        return plots.plot_drift(histories[run], task=None if task < 0 else task, tasks=names,
                                title=f"input drift — {run}")

    return figure_widget(draw, {"run": _dropdown(labels, "run"), "task": _dropdown(task_options, "task")})
