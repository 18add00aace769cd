"""Figures for the notebooks and the benchmark. Every function returns a matplotlib Figure (never shows it).

Inputs are what the engine produces: Gram matrices (in, in), a merge history (list of IterationRecord, see
merge.py), or plain tables (a list of dicts or a pandas DataFrame). Layers are drawn in the history's order,
which is the model's forward order, so "depth" is the position of a layer in that order.
The figures are not registered with pyplot (no global state, nothing shown twice); in a notebook, `%matplotlib
inline` once makes a returned Figure display as the cell's value.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import seaborn as sns
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

__all__ = ["short_names", "task_labels", "plot_covariance", "plot_spectrum", "plot_weights", "plot_weights_shared",
           "plot_objective", "plot_drift", "plot_change", "plot_lines", "plot_bars", "plot_scores",
           "plot_image_grid", "plot_intervals"]


# ---------------------------------------------------------------- labels


def short_names(names) -> list[str]:
    """Module names without the dotted prefix they all share ("encoder.layer.0.attention.self.query" ->
    "0.attention.self.query" when every name starts with "encoder.layer.")."""
    names = list(names)
    if len(names) < 2:
        return [n.split(".")[-1] if n else n for n in names]
    parts = [n.split(".") for n in names]
    k = 0
    while all(len(p) > k + 1 for p in parts) and len({p[k] for p in parts}) == 1:
        k += 1
    return [".".join(p[k:]) for p in parts]


def task_labels(tasks, n: int) -> list[str]:
    """The given task names, or "task 0", "task 1", ... when there are none."""
    if tasks is None:
        return [f"task {i}" for i in range(n)]
    tasks = list(tasks)
    if len(tasks) != n:
        raise ValueError(f"got {len(tasks)} task names for {n} tasks")
    return tasks


def _figure(width: float = 6.0, height: float = 4.0):
    # A Figure outside pyplot's registry: a notebook shows it once (as the cell's value), nothing leaks between calls.
    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.subplots()


def _numpy(m) -> np.ndarray:
    return m.detach().double().cpu().numpy() if isinstance(m, torch.Tensor) else np.asarray(m, dtype=float)


def _record(history, iteration: int):
    if not history:
        raise ValueError("the history is empty (data-free methods record none)")
    for record in history:
        if record.iteration == iteration:
            return record
    raise ValueError(f"no iteration {iteration} in this history (1..{history[-1].iteration})")


def _table(table) -> pd.DataFrame:
    return table.copy() if isinstance(table, pd.DataFrame) else pd.DataFrame(list(table))


# ---------------------------------------------------------------- features


def plot_covariance(gram, title: str = "XᵀX", limit: int | None = None, correlation: bool = False,
                    robust: bool = True) -> Figure:
    """Heatmap of a Gram matrix (in, in). limit: show only the leading limit×limit block.
    correlation: divide by the diagonal's square roots (D^-½ G D^-½), so a few large features do not hide the rest.
    robust: colour range at the 99th percentile of |entries| (larger ones saturate) instead of the maximum."""
    g = _numpy(gram)
    if correlation:
        d = np.sqrt(np.clip(np.diag(g), 1e-300, None))
        g = g / d[:, None] / d[None, :]
    if limit is not None:
        g = g[:limit, :limit]
    bound = float(np.percentile(np.abs(g), 99) if robust else np.abs(g).max()) or 1.0
    fig, ax = _figure(5.6, 4.6)
    sns.heatmap(g, ax=ax, cmap="vlag", center=0, vmin=-bound, vmax=bound, square=True,
                xticklabels=False, yticklabels=False,
                cbar_kws={"label": "correlation" if correlation else "Σ over rows of x_a·x_b"})
    ax.set_xlabel(f"input feature (0..{g.shape[1] - 1})")
    ax.set_ylabel(f"input feature (0..{g.shape[0] - 1})")
    ax.set_title(title)
    return fig


def plot_spectrum(grams: dict, title: str = "Eigenvalues of XᵀX", normalize: bool = True) -> Figure:
    """Eigenvalue spectra, largest first, on a log scale: one line per label of `grams` ({label: (in, in)}).
    normalize: divide by the largest eigenvalue, so spectra of different scales share an axis.
    A flat line is isotropic features (XᵀX ∝ I); a steep drop is features that fill few directions."""
    fig, ax = _figure()
    for label, gram in grams.items():
        # torch, not numpy: its LAPACK follows torch.set_num_threads (numpy's may spawn a thread per core)
        eig = torch.linalg.eigvalsh(torch.as_tensor(gram).double()).flip(0).clamp_min(0).numpy()
        if normalize and eig[0] > 0:
            eig = eig / eig[0]
        positive = eig > 0
        ax.plot(np.arange(1, eig.size + 1)[positive], eig[positive], label=str(label))
    ax.set_yscale("log")
    ax.set_xlabel("eigenvalue index (largest first)")
    ax.set_ylabel("eigenvalue / largest" if normalize else "eigenvalue")
    ax.set_title(title)
    ax.legend(fontsize="small")
    return fig


# ---------------------------------------------------------------- a merge's history


def plot_weights(history, iteration: int = 1, tasks=None, normalize: bool = True,
                 title: str | None = None) -> Figure:
    """Heatmap of the adaptive weights λ at one iteration: layers (rows) × tasks (columns).
    normalize: λ_i / Σ_j λ_j per layer; only these shares matter, a common factor changes nothing."""
    record = _record(history, iteration)
    names = list(record.lambdas)
    lam = np.array([record.lambdas[n] for n in names], dtype=float)
    if normalize:
        lam = lam / lam.sum(axis=1, keepdims=True)
    labels = task_labels(tasks, lam.shape[1])
    fig, ax = _figure(2.2 + 1.1 * lam.shape[1], 1.5 + 0.22 * len(names))
    sns.heatmap(lam, ax=ax, cmap="viridis", xticklabels=labels, yticklabels=short_names(names),
                annot=lam.shape[1] * len(names) <= 60, fmt=".2f",
                cbar_kws={"label": "λ_i / Σλ" if normalize else "λ_i"})
    ax.set_xlabel("task")
    ax.set_ylabel("layer")
    ax.tick_params(axis="y", labelsize=7)
    ax.tick_params(axis="x", labelrotation=20)
    ax.set_title(title or f"adaptive weights λ, iteration {iteration}")
    return fig


def plot_weights_shared(histories: dict, iteration: int = 1, tasks=None, title: str | None = None) -> Figure:
    """The λ shares λ_i / Σ_j λ_j of several merges side by side, one heatmap per label of `histories`
    ({label: history}), layers (rows) × tasks (columns), on ONE colour scale (the range over all panels) with one
    colour bar: equal colours are equal shares in every panel, so a flat panel next to a varied one shows as flat."""
    shares = {}
    for label, history in histories.items():
        record = _record(history, iteration)
        lam = np.array([record.lambdas[n] for n in record.lambdas], dtype=float)
        shares[label] = (list(record.lambdas), lam / lam.sum(axis=1, keepdims=True))
    if not shares:
        raise ValueError("plot_weights_shared needs at least one history")
    low = min(float(s.min()) for _, s in shares.values())
    high = max(float(s.max()) for _, s in shares.values())
    n_tasks = next(iter(shares.values()))[1].shape[1]
    labels = task_labels(tasks, n_tasks)
    n_layers = max(len(names) for names, _ in shares.values())
    fig = Figure(figsize=(1.6 + 1.1 * n_tasks * len(shares), 1.7 + 0.22 * n_layers), layout="constrained")
    axes = fig.subplots(1, len(shares), squeeze=False)[0]
    for k, (ax, (label, (names, share))) in enumerate(zip(axes, shares.items())):
        sns.heatmap(share, ax=ax, cmap="viridis", vmin=low, vmax=high, xticklabels=labels,
                    yticklabels=short_names(names) if k == 0 else False, annot=share.size <= 60, fmt=".2f",
                    cbar=k == len(shares) - 1, cbar_kws={"label": "λ_i / Σλ (one scale for all panels)"})
        ax.set_title(str(label))
        ax.set_xlabel("task")
        ax.tick_params(axis="x", labelrotation=20)
    axes[0].set_ylabel("layer")
    axes[0].tick_params(axis="y", labelsize=7)
    fig.suptitle(title or f"adaptive weights λ (shares), iteration {iteration}")
    return fig


def _per_task_mean(values: dict) -> np.ndarray:
    """{layer: [per task]} -> (tasks,) mean over layers."""
    return np.array(list(values.values()), dtype=float).mean(axis=0)


def plot_objective(history, tasks=None, title: str = "IterIS objective per iteration", log: bool = True) -> Figure:
    """Relative objective ‖X_iΔW_iᵀ − X̃_iWᵀ‖²/‖X_iΔW_iᵀ‖², mean over layers, one colour per task.
    Solid: the new W on the features it was solved from (IterationRecord.objective). Dashed: a solve's W on the
    inputs of the model it produced (record t+1's merged_objective, drawn at t): what that merge really does."""
    iterations = [r.iteration for r in history]
    solved = np.array([_per_task_mean(r.objective) for r in history])
    labels = task_labels(tasks, solved.shape[1])
    fig, ax = _figure()
    colors = sns.color_palette(n_colors=len(labels))
    for i, label in enumerate(labels):
        ax.plot(iterations, solved[:, i], "o-", color=colors[i], label=f"{label}: solved")
        merged = [(r.iteration - 1, _per_task_mean(r.merged_objective)[i]) for r in history if r.merged_objective]
        if merged:
            ax.plot(*zip(*merged), "s--", color=colors[i], alpha=0.7, label=f"{label}: merged model")
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("iteration (solve) t")
    ax.set_ylabel("objective / ‖X_iΔW_iᵀ‖² (mean over layers)")
    ax.set_xticks(iterations)
    ax.set_title(title)
    ax.legend(fontsize="small")
    return fig


def plot_drift(history, task: int | None = None, tasks=None, title: str | None = None) -> Figure:
    """Input drift ‖X_i − X̃_i‖²/‖X_i‖² against depth (layer position), one line per iteration.
    task: one task's index, or None for the mean over tasks. Iteration 1 is 0 by definition (X̃ = X); iteration t
    shows the merged model of solve t−1."""
    names = list(history[0].drift)
    n_tasks = len(next(iter(history[0].drift.values())))
    labels = task_labels(tasks, n_tasks)
    fig, ax = _figure(7, 4)
    palette = sns.color_palette("rocket_r", n_colors=len(history))
    for color, record in zip(palette, history):
        values = np.array([record.drift[n] for n in names], dtype=float)
        y = values.mean(axis=1) if task is None else values[:, task]
        ax.plot(np.arange(len(names)), y, "o-", ms=3, color=color, label=f"iteration {record.iteration}")
    ax.set_xlabel("depth (adapted layer, forward order)")
    ax.set_ylabel("‖X − X̃‖² / ‖X‖²")
    step = max(1, len(names) // 12)
    ax.set_xticks(np.arange(0, len(names), step), short_names(names)[::step], rotation=60, ha="right",
                  fontsize=7)
    which = "mean over tasks" if task is None else labels[task]
    ax.set_title(title or f"input drift of the merged model ({which})")
    ax.legend(fontsize="small")
    return fig


def plot_change(history, title: str = "relative change of ΔW per iteration", floor: float = 1e-12) -> Figure:
    """‖ΔW_t − ΔW_{t−1}‖/‖ΔW_t‖ per layer (thin lines) and its maximum (thick), log scale; it is 1 at t = 1.
    Exact zeros (a layer at its fixed point) are drawn on the dotted line at `floor`."""
    names = list(history[0].change)
    iterations = [r.iteration for r in history]
    values = np.array([[r.change[n] for n in names] for r in history], dtype=float)  # (iterations, layers)
    fig, ax = _figure()
    ax.plot(iterations, np.clip(values, floor, None), color="0.7", lw=0.8)
    ax.plot(iterations, np.clip(values.max(axis=1), floor, None), "o-", color="C3", lw=2, label="max over layers")
    if (values < floor).any():
        ax.axhline(floor, color="0.4", ls=":", lw=1, label=f"exactly 0 (drawn at {floor:g})")
    ax.set_yscale("log")
    ax.set_xticks(iterations)
    ax.set_xlabel("iteration (solve) t")
    ax.set_ylabel("‖ΔW_t − ΔW_{t−1}‖ / ‖ΔW_t‖")
    ax.set_title(title)
    ax.legend(fontsize="small")
    return fig


# ---------------------------------------------------------------- tables


def plot_lines(table, x: str, y: str, hue: str | None = None, logx: bool = False, logy: bool = False,
               title: str = "", xlabel: str | None = None, ylabel: str | None = None) -> Figure:
    """Line plot of a table (list of dicts or DataFrame): `y` against `x`, one line per value of `hue`."""
    frame = _table(table)
    fig, ax = _figure()
    sns.lineplot(frame, x=x, y=y, hue=hue, marker="o", ax=ax, palette="deep" if hue else None)
    if logx:
        ax.set_xscale("log")
    elif pd.api.types.is_integer_dtype(frame[x]):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel or x)
    ax.set_ylabel(ylabel or y)
    ax.set_title(title)
    return fig


def plot_bars(table, x: str, y: str, hue: str | None = None, title: str = "", xlabel: str | None = None,
              ylabel: str | None = None, reference: float | None = None, logy: bool = False) -> Figure:
    """Grouped bars of a table (list of dicts or DataFrame); `reference` draws a horizontal line."""
    frame = _table(table)
    fig, ax = _figure(max(5.0, 2.0 + 1.2 * frame[x].nunique()), 4.0)
    sns.barplot(frame, x=x, y=y, hue=hue, ax=ax, errorbar=None)
    if reference is not None:
        ax.axhline(reference, color="0.3", ls="--", lw=1)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel or x)
    ax.set_ylabel(ylabel or y)
    ax.set_title(title)
    if hue:
        ax.legend(fontsize="small", title=hue)
    return fig


def plot_scores(table, title: str = "normalized score (merged / own LoRA)") -> Figure:
    """Bars of the normalized score per task (x) and method (colour), with a "mean" group and a line at 1.
    table: rows {method, task, normalized}, as a list of dicts or a DataFrame."""
    frame = _table(table)
    missing = {"method", "task", "normalized"} - set(frame.columns)
    if missing:
        raise ValueError(f"the score table lacks column(s) {sorted(missing)}")
    mean = frame.groupby("method", sort=False, as_index=False)["normalized"].mean().assign(task="mean")
    frame = pd.concat([frame[["method", "task", "normalized"]], mean], ignore_index=True)
    return plot_bars(frame, x="task", y="normalized", hue="method", title=title,
                     ylabel="normalized score", reference=1.0)


def plot_image_grid(rows: dict, columns=None, title: str = "", cell: float = 0.55) -> Figure:
    """A grid of grey images: one row per key of `rows` ({row label: (N, 1, H, W) or (N, H, W) in [0, 1]}),
    N images per row; `columns` optionally labels the columns."""
    labels = list(rows)
    n = max(len(v) for v in rows.values())
    fig = Figure(figsize=(2.2 + cell * n, 0.3 + cell * len(labels)), layout="constrained")
    axes = fig.subplots(len(labels), n, squeeze=False)
    for r, label in enumerate(labels):
        images = _numpy(torch.as_tensor(rows[label]).reshape(len(rows[label]), *rows[label].shape[-2:]))
        for c in range(n):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            for side in ax.spines.values():
                side.set_visible(False)
            if c < len(images):
                ax.imshow(images[c], cmap="gray_r", vmin=0, vmax=1)
            if c == 0:
                ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize="small")
            if r == 0 and columns is not None and c < len(columns):
                ax.set_title(str(columns[c]), fontsize="small")
    if title:
        fig.suptitle(title)
    return fig


# ---------------------------------------------------------------- uncertainty

VERDICT_COLOURS = {"ahead": "C2", "behind": "C3", "within noise": "0.45"}


def plot_intervals(intervals: dict, title: str = "", xlabel: str = "difference", reference: float | None = 0.0,
                   ax=None) -> Figure:
    """A forest plot: one row per label of `intervals` ({label: an object with mean, low, high, e.g. a
    measure.PairedDifference}), the mean as a dot with [low, high] as its error bar, top to bottom in the dict's
    order. A row's `verdict` (ahead / behind / within noise), when it has one, sets its colour; `reference` draws a
    vertical line (0: no difference). Given `ax`, draws there and returns its figure."""
    if not intervals:
        raise ValueError("plot_intervals needs at least one interval")
    if ax is None:
        fig, ax = _figure(6.0, 1.0 + 0.4 * len(intervals))
    labels = list(intervals)
    for k, label in enumerate(labels):
        d = intervals[label]
        colour = VERDICT_COLOURS.get(getattr(d, "verdict", None), "C0")
        ax.errorbar([d.mean], [k], xerr=[[d.mean - d.low], [d.high - d.mean]], fmt="o", color=colour, capsize=3,
                    label=getattr(d, "verdict", None) or "_")
    if reference is not None:
        ax.axvline(reference, color="0.3", ls="--", lw=1)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_ylim(len(labels) - 0.5, -0.5)
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    handles = {h.get_label(): h for h in ax.get_legend_handles_labels()[0]}  # one legend entry per verdict
    if handles:
        confidence = getattr(intervals[labels[0]], "confidence", None)
        ax.legend(handles.values(), handles.keys(), fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0),
                  borderaxespad=0.0, title=f"{confidence:.0%} interval" if confidence else None)
    return ax.figure
