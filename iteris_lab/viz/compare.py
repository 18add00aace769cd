"""Figures of a comparison (iteris_lab.tracks.own.compare, chapter 07). Each function returns a matplotlib Figure.

plot_fidelity(result)          agreement and KL per task (x) and model (colour)
plot_paired(result, baseline)  each model minus `baseline`, per task: the mean per-prompt difference with its paired
                               bootstrap interval (measure.paired_difference); an interval holding 0 is noise
"""
from __future__ import annotations

import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from .plots import plot_intervals

_LABELS = {"agreement": "agreement with own LoRA", "kl": "KL(own LoRA ‖ model), nats", "accuracy": "accuracy",
           "correct": "accuracy"}


def plot_fidelity(result, measures=("agreement", "kl"), models=None, title: str = "") -> Figure:
    """One panel per measure: bars per task (x) and model (hue); agreement has a line at 1 (the own LoRA)."""
    frame = pd.DataFrame(result.rows)
    if models is not None:
        frame = frame[frame["model"].isin(models)]
    fig = Figure(figsize=(5.0 * len(measures), 4.0), layout="constrained")
    axes = fig.subplots(1, len(measures), squeeze=False)[0]
    for ax, measure in zip(axes, measures):
        shown = frame.dropna(subset=[measure])
        sns.barplot(shown, x="task", y=measure, hue="model", ax=ax, errorbar=None)
        if measure == "agreement":
            ax.axhline(1.0, color="0.3", ls="--", lw=1)
        ax.set_xlabel("task")
        ax.set_ylabel(_LABELS[measure])
        ax.legend(fontsize="small", title="model")
    fig.suptitle(title)
    return fig


def paired_table(result, baseline: str, measure: str = "agreement", models=None, **options) -> pd.DataFrame:
    """{model, task, mean, low, high, verdict} of model − baseline per task (result.paired for every pair)."""
    models = [m for m in (models or result.models) if m != baseline]
    rows = []
    for model in models:
        for task in result.tasks:
            d = result.paired(model, baseline, task, measure, **options)
            rows.append({"model": model, "task": task, "mean": d.mean, "low": d.low, "high": d.high,
                         "verdict": d.verdict})
    return pd.DataFrame(rows)


def plot_paired(result, baseline: str, measure: str = "agreement", models=None, title: str = "",
                **options) -> Figure:
    """Mean per-prompt difference (model − baseline) with its paired interval, one row per model and task, drawn by
    the chapters' one forest plot (viz.plots.plot_intervals). Options go to paired_difference (confidence,
    resamples, seed)."""
    models = [m for m in (models or result.models) if m != baseline]
    intervals = {f"{model} · {task}": result.paired(model, baseline, task, measure, **options)
                 for model in models for task in result.tasks}
    return plot_intervals(intervals, title or f"paired differences against {baseline} (grey: within noise)",
                          f"{_LABELS[measure]}: model − {baseline}")
