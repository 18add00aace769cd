"""Figures and a widget for chapter 06's precomputed study (benchmarks/results/study.json).

Each function takes the study's JSON (a dict) and returns a matplotlib Figure; legends sit outside the axes so that
they never cover a measured point. Tables of rows are flattened with `frame(...)`.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

METHOD_STYLE = {"linear": ("linear (average)", "C7"), "task_arithmetic": ("task arithmetic (sum)", "C5"),
                "ties": ("TIES", "C2"), "regmean": ("RegMean", "C0"), "iteris_sweep": ("IterIS (sweep)", "C3")}


def _figure(ncols: int = 1, width: float = 6.5, height: float = 3.8) -> tuple[Figure, list]:
    fig = Figure(figsize=(width, height), layout="constrained")
    axes = fig.subplots(1, ncols)
    return fig, list(np.atleast_1d(axes))


def add_references(ax, references: dict | None) -> None:
    """Horizontal lines for models that need no calibration data: {label in METHOD_STYLE (or any): value}, e.g. the
    data-free merges on the same test examples, so that every data-aware curve is read against them."""
    for i, (label, value) in enumerate((references or {}).items()):
        name, colour = METHOD_STYLE.get(label, (label, f"C{4 + i}"))
        ax.axhline(value, color=colour, ls=(0, (4, 2 + i)), lw=1.2, label=f"{name} (data-free)")


def add_error_bars(ax, points: dict | None, colour, offset: float = 1.0) -> None:
    """Error bars {x: measure.PairedDifference of a model's mean (tracks.harness.mean_interval)} at x·offset."""
    for x, d in (points or {}).items():
        ax.errorbar(x * offset, d.mean, yerr=[[d.mean - d.low], [d.high - d.mean]], fmt="none", ecolor=colour,
                    capsize=3, lw=1.2)


def _legend_outside(ax) -> None:
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize="small", frameon=False)


def plot_intervals(intervals: dict, title: str, xlabel: str, reference: float | None = 0.0, ax=None) -> Figure:
    """One horizontal error bar per label: {label: measure.PairedDifference} drawn at its mean with its interval,
    coloured by verdict (blue "ahead", red "behind", grey "within noise"); a dashed line at `reference` (0 for
    differences, None for none). Draws into `ax` when given (and returns its figure)."""
    colours = {"ahead": "C0", "behind": "C3", "within noise": "0.45"}
    if ax is None:
        fig, (ax,) = _figure(height=0.9 + 0.32 * len(intervals))
    labels = list(intervals)
    for y, label in enumerate(labels):
        d = intervals[label]
        ax.errorbar(d.mean, y, xerr=[[d.mean - d.low], [d.high - d.mean]], fmt="o", capsize=3,
                    color=colours[d.verdict] if reference == 0.0 else "C0")
    if reference is not None:
        ax.axvline(reference, color="0.3", ls="--", lw=1)
    ax.set_yticks(range(len(labels)), labels)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize="medium")
    return ax.figure


def frame(rows, per_task: bool = False) -> pd.DataFrame:
    """Rows of the study as a DataFrame; per_task=True gives one row per (row, task) with accuracy and normalized."""
    rows = [r for r in rows if "error" not in r]
    if not per_task:
        return pd.DataFrame([{k: v for k, v in r.items() if not isinstance(v, (dict, list))} for r in rows])
    out = []
    for r in rows:
        flat = {k: v for k, v in r.items() if not isinstance(v, (dict, list))}
        out += [{**flat, "task": t, "accuracy": r["accuracy"][t], "normalized": r["normalized"][t]}
                for t in r["accuracy"]]
    return pd.DataFrame(out)


def _measure(table: pd.DataFrame, task: str, normalized: bool) -> pd.Series:
    if task == "mean":
        return table["mean_normalized" if normalized else "mean_accuracy"]
    return table["normalized" if normalized else "accuracy"]


def plot_samples(minilm: dict, task: str = "mean", show_seeds: bool = True, mark: int | None = None,
                 references: dict | None = None, intervals: dict | None = None) -> Figure:
    """Normalized accuracy against calibration samples per task (log x): RegMean and the IterIS sweep, the mean
    over seeded draws as a line, each draw as a dot (show_seeds). mark: a measured sample count to read off: a
    vertical line there and each method's mean of draws at it in the title. references: {data-free label: value}
    drawn as horizontal lines (add_references); intervals: {label: {samples: PairedDifference}}, 95 % error bars of
    one draw at those sizes (add_error_bars), only for task="mean"."""
    table = frame(minilm["samples"], per_task=task != "mean")
    if task != "mean":
        table = table[table.task == task]
    table = table.assign(value=_measure(table, task, True))
    fig, (ax,) = _figure()
    readings = []
    for label, group in table.groupby("label", sort=False):
        name, colour = METHOD_STYLE[label]
        mean = group.groupby("samples")["value"].mean()
        ax.plot(mean.index, mean.values, marker="o", color=colour, label=f"{name}, mean of draws")
        if mark is not None:
            readings.append(f"{name} {mean.loc[mark]:.3f}")
        if show_seeds:
            ax.scatter(group["samples"], group["value"], s=12, color=colour, alpha=0.45, label=f"{name}, each draw")
        if task == "mean":  # the two methods' bars side by side, not on top of each other
            add_error_bars(ax, (intervals or {}).get(label), colour, 0.94 if label == "regmean" else 1.06)
    if task == "mean":
        add_references(ax, references)
    ax.set_xscale("log")
    ax.set_xticks(sorted(table["samples"].unique()), [str(s) for s in sorted(table["samples"].unique())])
    ax.set_xlabel("calibration samples per task (unlabeled prompts)")
    ax.set_ylabel("normalized accuracy" + (" (mean over tasks)" if task == "mean" else f" ({task})"))
    title = f"{minilm['model']}: accuracy against calibration samples"
    if mark is not None:
        ax.axvline(mark, color="0.5", linestyle=":", linewidth=1)
        title += f"\nat {mark} per task: " + ", ".join(readings)
    ax.set_title(title)
    _legend_outside(ax)
    return fig


def plot_alpha(minilm: dict, references: dict | None = None, intervals: dict | None = None) -> Figure:
    """IterIS (sweep) mean normalized accuracy against α, one line per number of samples; α = 0 drawn at the left
    edge (symmetric-log axis), failed solves marked. references: {label: value} as horizontal lines (data-free
    merges, RegMean); intervals: {samples: {α: PairedDifference}} as 95 % error bars."""
    table = frame(minilm["alpha"])
    fig, (ax,) = _figure()
    positive = [a for a in table["alpha"].unique() if a > 0]
    ax.set_xscale("symlog", linthresh=min(positive) if positive else 1e-8)
    for i, (n, group) in enumerate(table.groupby("samples")):
        ax.plot(group["alpha"], group["mean_normalized"], marker="o", color=f"C{i}", label=f"{n} samples per task")
        add_error_bars(ax, (intervals or {}).get(n), f"C{i}")
    add_references(ax, references)
    failed = [r for r in minilm["alpha"] if "error" in r]
    for r in failed:
        ax.axvline(r["alpha"], color="0.5", ls=":", lw=1)
    ax.set_xlabel("α (regularizer α‖M‖_F·I on C_i and G_i; symlog axis)")
    ax.set_ylabel("normalized accuracy (mean over tasks)")
    ax.set_title(f"{minilm['model']}: IterIS (sweep) against α")
    _legend_outside(ax)
    return fig


def plot_solves(solves: dict) -> Figure:
    """Left: distance of the Jacobi solve's ΔW to the sweep's (log y). Right: mean normalized accuracy per solve,
    with the sweep's as a horizontal line."""
    table = pd.DataFrame(solves["per_solve"])
    fig, (left, right) = _figure(2, width=10.0)
    exact = table["distance_to_fixed_point"] == 0
    left.plot(table["solve"][~exact], table["distance_to_fixed_point"][~exact], marker="o", color="C3",
              label="Jacobi solve t")
    left.set_yscale("log")
    if exact.any():  # a log axis has no 0: mark those solves on the bottom edge instead of inventing a value
        left.plot(table["solve"][exact], [left.get_ylim()[0]] * int(exact.sum()), ls="none", marker="v",
                  color="C3", clip_on=False, label="exactly 0")
        left.legend(loc="upper right", fontsize="small", frameon=False)
    left.set_xlabel("solve t (paper's loop)")
    left.set_ylabel("‖ΔW_t − ΔW_sweep‖ / ‖ΔW_sweep‖")
    left.set_title("distance to the fixed point")
    right.plot(table["solve"], table["mean_normalized"], marker="o", color="C3", label="Jacobi solve t")
    right.axhline(solves["sweep"]["mean_normalized"], color="k", ls="--", lw=1, label="sweep (fixed point)")
    right.set_xlabel("solve t (paper's loop)")
    right.set_ylabel("normalized accuracy (mean over tasks)")
    right.set_title("accuracy per solve")
    for ax in (left, right):
        ax.set_xticks(table["solve"].tolist())
    _legend_outside(right)
    return fig


def plot_weights(minilm: dict, references: dict | None = None, intervals: dict | None = None) -> Figure:
    """Mean normalized accuracy of the IterIS sweep for each λ variant (a dot each), grouped by calibration
    samples. references: {label: value} as horizontal lines; intervals: {variant: {samples: PairedDifference}} as
    95 % error bars."""
    table = frame(minilm["weights"])
    fig, (ax,) = _figure()
    variants = list(dict.fromkeys(table["adaptive_weights"]))
    sizes = sorted(table["samples"].unique())
    step = 0.6 / max(1, len(variants) - 1)
    for i, variant in enumerate(variants):
        values = [table[(table.adaptive_weights == variant) & (table.samples == n)]["mean_normalized"].iloc[0]
                  for n in sizes]
        x = np.arange(len(sizes)) - 0.3 + i * step
        ax.plot(x, values, ls="none", marker="o", ms=8, color=f"C{i}", label=f"λ {variant}")
        bars = (intervals or {}).get(variant, {})
        add_error_bars(ax, {x[j]: bars[n] for j, n in enumerate(sizes) if n in bars}, f"C{i}")
    add_references(ax, references)
    ax.set_xlim(-0.7, len(sizes) - 0.3)
    ax.set_xticks(range(len(sizes)), [f"{n} samples" for n in sizes])
    ax.set_xlabel("calibration samples per task")
    ax.set_ylabel("normalized accuracy (mean over tasks)")
    ax.set_title(f"{minilm['model']}: IterIS (sweep) per λ variant")
    _legend_outside(ax)
    return fig


def task_count_table(tasks: dict) -> pd.DataFrame:
    """One row per (merge, task): k (tasks merged), label, task, accuracy, normalized."""
    return frame(tasks["rows"], per_task=True)


def plot_task_count(tasks: dict, task: str = "mean", normalized: bool = True, methods=None,
                    intervals: dict | None = None) -> Figure:
    """Accuracy of each merge against the number of merged tasks k (nested subsets of tasks['order']).
    task="mean": mean over the k merged tasks; a task name: that task's score (defined from the k that adds it).
    The data-free merges (linear, task arithmetic) are drawn as lines like the others, since their value changes
    with k. intervals: {label: {k: PairedDifference}}, 95 % error bars (task="mean", normalized only)."""
    per_task = task != "mean"
    table = frame(tasks["rows"], per_task=per_task)
    if per_task:
        table = table[table.task == task]
    table = table.assign(value=_measure(table, task, normalized))
    methods = methods or list(dict.fromkeys(table["label"]))
    fig, (ax,) = _figure()
    for label in methods:
        group = table[table.label == label].sort_values("k")
        name, colour = METHOD_STYLE.get(label, (label, None))
        ax.plot(group["k"], group["value"], marker="o", color=colour, label=name)
        if task == "mean" and normalized:
            add_error_bars(ax, (intervals or {}).get(label), colour)
    if normalized:
        ax.axhline(1.0, color="0.4", ls="--", lw=1, label="own LoRA")
    elif per_task:
        ax.axhline(tasks["own"][task], color="0.4", ls="--", lw=1, label="own LoRA")
        ax.axhline(tasks["base"][task], color="0.6", ls=":", lw=1, label="base model")
    ks = sorted(table["k"].unique())
    order = tasks["order"]
    ax.set_xticks(ks, [f"{k}\n+{order[k - 1]}" for k in ks])
    ax.set_xlabel("tasks merged (k; the task added at k)")
    what = "normalized accuracy" if normalized else "accuracy"
    ax.set_ylabel(f"{what} ({'mean over merged tasks' if not per_task else task})")
    ax.set_title(f"{tasks['model']}: merges of 2 to {len(order)} task LoRAs")
    _legend_outside(ax)
    return fig


def task_count_widget(parts: dict, intervals: dict | None = None):
    """Dropdowns "order" (which study part: its task order) and "task" (the mean or one task) and a checkbox
    "normalized" over plot_task_count; each redraws. parts: {name: the study's task-count part}, or one part;
    intervals: {part name: plot_task_count's intervals}."""
    import ipywidgets as w

    from .widgets import figure_widget

    parts = {"order 1": parts} if "rows" in parts else parts
    tasks = list(dict.fromkeys(t for part in parts.values() for t in part["order"]))
    controls = {"order": w.Dropdown(options=[(f"{name}: {', '.join(p['order'])}", name) for name, p in parts.items()],
                                    description="order"),
                "task": w.Dropdown(options=["mean", *tasks], description="task"),
                "normalized": w.Checkbox(value=True, description="normalized by own LoRA")}
    return figure_widget(lambda order, task, normalized: plot_task_count(parts[order], task, normalized,
                                                                         intervals=(intervals or {}).get(order)),
                         controls)


def samples_widget(minilm: dict, references: dict | None = None, intervals: dict | None = None):
    """Dropdown "task", checkbox "show each draw" and a slider over the measured sample counts (read off both
    methods there) over plot_samples (with its references and intervals); each redraws."""
    import ipywidgets as w

    from .widgets import figure_widget

    counts = sorted({row["samples"] for row in minilm["samples"] if "error" not in row})
    controls = {"task": w.Dropdown(options=["mean", *minilm["tasks"]], description="task"),
                "show_seeds": w.Checkbox(value=True, description="show each seeded draw"),
                "mark": w.SelectionSlider(options=counts, value=counts[0], description="samples")}
    return figure_widget(lambda task, show_seeds, mark: plot_samples(minilm, task, show_seeds, mark, references,
                                                                      intervals), controls)
