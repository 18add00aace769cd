"""The benchmark harness every track and hub recipe runs on: the base model, each task LoRA and every merge of the
LoRAs, measured on the same test sets; IterIS settings chosen on a validation split; one markdown table.

A track declares what is model-specific (the `Track` interface below): its LoRAs, calibration batches per task,
`evaluate` (metrics of the model as its weights stand now), `score` (a result row from metrics and the references)
and `validation` (what "best" means on the validation split). Everything else happens here, once:

    references(track, split)      base and each LoRA alone                    -> References(base, loras)
    run_methods(track, profile)   those rows, then one row per merge method   -> [row, ...]
    choose_iteris(track, profile, grid)  the grid's best IterIS settings on validation (test never read)
    markdown_table(rows, columns) the rows as a table

Scores follow the paper: a merged model's metric on task i divided by the same metric of task i's own LoRA is its
normalized score (`score_row`); the table reports both per task and their means.

Per-example outcomes (the contract every track follows, so that any two rows on one test set compare paired):
`Track.evaluate` may return, next to its metrics, per-example values of any metric, in test-set order, in either
place —
    per task:   metrics[task]["per_example"] = {metric: [value of example 0, 1, ...]}   (tracks whose per-task
                metrics are a dict, e.g. {"content": .., "style": .., "per_example": {"content": [1, 0, ..]}})
    top level:  metrics["per_example"] = {task: {metric: [...]}}    (tracks whose per-task metric is one number:
                the LLM tracks return {task: accuracy, "per_example": {task: {"correct": [1, 0, ...]}}})
A value is 0/1 (right or wrong: `paired` then adds the exact McNemar p-value) or a score per example. The harness
takes them out before `Track.score` sees the metrics (`split_outcomes`) and keeps them in every row, reference rows
included, as row["per_example"] = {task: {metric: [...]}}. Then
    paired(row_a, row_b, task, metric)         -> measure.PairedDifference of a − b on that task
    paired_mean(row_a, row_b, metric, scale)   -> the same for the mean over tasks (each task weighted equally,
                                                  examples paired; scale={task: 1/own metric} gives normalized)
"""
from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from tqdm.auto import tqdm

from ..io.peft import load_adapter
from ..errors import IterisError
from ..measure import PairedDifference, PeakMemory, paired_difference, weights_added
from ..merge import merge_loras
from ..profiles import Profile
from .environment import environment  # noqa: F401  (every track's JSON imports it from here)

DEMO_METHODS = ("linear", "task_arithmetic", "ties", "dare_ties", "cat", "regmean", "regmean_many", "iteris",
                "iteris_sweep")
ITERIS_GRID = {"alpha": (1e-4, 1e-2), "adaptive_weights": ("official", "paper", "none")}
Column = tuple[str, Callable[[dict], str]]  # (header, row -> cell text)
PER_EXAMPLE = "per_example"


class OutcomesError(IterisError):
    """Two rows cannot be compared paired: per-example outcomes missing, or not on the same examples."""


@dataclass
class References:
    """Metrics of the base model (None when not measured) and, per task, of the model with that task's LoRA;
    `outcomes`: {row label ("base", "lora:<task>"): that model's per-example outcomes} where the track gave them."""

    base: dict | None
    loras: dict[str, dict]
    outcomes: dict[str, dict] = field(default_factory=dict)

    @classmethod
    def from_own(cls, own: dict) -> "References":
        """From {task: metric of its own LoRA on that task} (what normalized scores divide by)."""
        return cls(None, {task: {task: value} for task, value in own.items()})

    def own(self) -> dict:
        """{task: the task's metric with its own LoRA}."""
        return {task: metrics[task] for task, metrics in self.loras.items()}


class Track:
    """What a track declares. Subclasses set `name`, `model`, `adapters` ({task: PEFT folder or LoraAdapter}, in
    task order) and implement evaluate / calibration / score / validation; the class attributes are defaults."""

    name: str
    model: torch.nn.Module
    adapters: dict
    forward = None  # merge_loras(forward=...): a custom calibration pass
    merge_options: dict = {}  # further merge_loras keyword arguments (e.g. a seed)
    calibration_info: dict = {}  # written into every merge row (None for data-free methods)
    own_only = True  # validation references: each LoRA on its own task only (what normalized scores need)

    def evaluate(self, split: str, limit: int | None, tasks=None, label: str = "") -> dict:
        """{task (or prompt set): metrics} of self.model as its weights stand now, on `split` (at most `limit`
        examples; only `tasks` when given). `label` names the model being measured (e.g. for image files)."""
        raise NotImplementedError

    def calibration(self, samples: int, batch_size: int) -> list[list]:
        """Per task (adapter order): calibration batches of `samples` unlabeled inputs."""
        raise NotImplementedError

    def score(self, label: str, method: str, metrics: dict, refs: References) -> dict:
        """A result row {"label", "method", ...} from the metrics of one model."""
        raise NotImplementedError

    def validation(self, row: dict) -> tuple[tuple, dict]:
        """(sort key: higher is better, the fields recorded per grid point) of a row scored on validation."""
        raise NotImplementedError

    def after_merge(self, label: str, result) -> dict:
        """Extra fields of a merge row (e.g. where the merged LoRA was written)."""
        return {}


def method_specs(profile: Profile, iteris: dict | None = None) -> dict[str, dict]:
    """label -> merge_loras keyword arguments; `samples` is the calibration size per task."""
    few, many = profile.calibration_samples, profile.many_samples
    return {
        "linear": dict(method="linear"), "task_arithmetic": dict(method="task_arithmetic", weights=None),
        "ties": dict(method="ties"), "dare_ties": dict(method="dare_ties"), "cat": dict(method="cat"),
        "regmean": dict(method="regmean", samples=few), "regmean_many": dict(method="regmean", samples=many),
        "iteris": dict(method="iteris", samples=few, schedule="jacobi", max_iter=profile.max_iter, **(iteris or {})),
        "iteris_sweep": dict(method="iteris", samples=few, schedule="sweep", **(iteris or {})),
    }


def _quiet(progress: bool) -> bool:
    return not progress or bool(os.environ.get("TQDM_DISABLE"))


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _adapters(track: Track) -> list:
    return [a if hasattr(a, "layers") else load_adapter(a) for a in track.adapters.values()]


def references(track: Track, limit: int | None, split: str = "test", own_only: bool = False) -> References:
    """The base model's metrics (skipped with own_only) and each LoRA's alone (with own_only: on its task only)."""
    refs = References(None, {})
    if not own_only:
        refs.base, refs.outcomes["base"] = split_outcomes(track.evaluate(split, limit, label="base"))
    for task, adapter in zip(track.adapters, _adapters(track)):
        with weights_added(track.model, adapter.layers):
            metrics = track.evaluate(split, limit, (task,) if own_only else None, label=f"lora:{task}")
        refs.loras[task], refs.outcomes[f"lora:{task}"] = split_outcomes(metrics)
    return refs


def reference_rows(track: Track, refs: References) -> list[dict]:
    """The base row (when measured) and one row per LoRA, each with its per-example outcomes when the track gave
    them."""
    rows = [track.score("base", "base", refs.base, refs)] if refs.base is not None else []
    rows += [track.score(f"lora:{task}", "lora", metrics, refs) for task, metrics in refs.loras.items()]
    for row in rows:
        if refs.outcomes.get(row["label"]):
            row[PER_EXAMPLE] = refs.outcomes[row["label"]]
    return rows


def merge_and_evaluate(track: Track, spec: dict, calibration: list | None, limit: int | None, split: str = "test",
                       label: str = "", on_iteration=None) -> tuple[object, dict, dict]:
    """Merge with one spec (merge_loras kwargs; `samples` is dropped) and evaluate the merged weights in place (W0
    restored after): (MergeResult, metrics, the run's fields for a row: samples, seconds, memory, objective...)."""
    spec = dict(spec)
    samples = spec.pop("samples", 0)
    with PeakMemory(_device(track.model)) as memory:
        result = merge_loras(track.model, _adapters(track), calibration, forward=track.forward, progress=False,
                             on_iteration=on_iteration, **{**track.merge_options, **spec})
    extra = track.after_merge(label, result)
    start = time.perf_counter()
    with weights_added(track.model, result.deltas):
        metrics, outcomes = split_outcomes(track.evaluate(split, limit, label=label))
    run = dict(calibration_samples=samples, merge_seconds=result.seconds, eval_seconds=time.perf_counter() - start,
               peak_memory_mb=memory.peak_mb, objective=[r.mean_objective() for r in result.history],
               **{k: v if samples else None for k, v in track.calibration_info.items()}, **extra,
               settings={k: v for k, v in result.settings.items() if k != "adapters"})
    if outcomes:
        run[PER_EXAMPLE] = outcomes
    return result, metrics, run


def merge_row(track: Track, label: str, spec: dict, calibration: list | None, refs: References,
              limit: int | None, split: str = "test") -> dict:
    """The result row of one merge (merge_and_evaluate, scored by the track against `refs`)."""
    _, metrics, run = merge_and_evaluate(track, spec, calibration, limit, split, label)
    row = track.score(label, spec["method"], metrics, refs)
    row.update(run)
    return row


def run_methods(track: Track, profile: Profile, labels=DEMO_METHODS, iteris: dict | None = None,
                progress: bool = True, own: dict | None = None, refs: References | None = None,
                log: Callable | None = None) -> list[dict]:
    """Rows of the result table: base, each LoRA, then every merge in `labels` (keys of method_specs, or a merge
    method's name), all on the test split. Given the references of an earlier run on the same test sets (`refs`,
    or `own`: {task: own-LoRA metric}), the base and LoRA rows are neither measured nor returned again."""
    specs = method_specs(profile, iteris)
    rows = []
    if refs is None and own is not None:
        refs = References.from_own(own)
    if refs is None:
        refs = references(track, profile.test_limit)
        rows = reference_rows(track, refs)
    calibration: dict[int, list] = {}
    bar = tqdm(labels, desc=f"{track.name}: merging", disable=_quiet(progress))
    for label in bar:
        bar.set_postfix(method=label)
        spec = specs.get(label, {"method": label})
        samples = spec.get("samples", 0)
        if samples and samples not in calibration:
            calibration[samples] = track.calibration(samples, profile.batch_size)
        row = merge_row(track, label, spec, calibration.get(samples), refs, profile.test_limit)
        rows.append(row)
        if log:
            log(f"{label}: merge {row['merge_seconds']:.0f} s, evaluation {row['eval_seconds']:.0f} s")
    return rows


def grid_points(grid: dict) -> list[dict]:
    """Every combination of a grid {setting: values}, the first setting varying slowest."""
    return [dict(zip(grid, values)) for values in itertools.product(*grid.values())]


def choose_iteris(track: Track, profile: Profile, grid: dict = ITERIS_GRID, progress: bool = True,
                  log: Callable | None = None) -> tuple[dict, list[dict]]:
    """The IterIS settings of `grid` ({setting: values}) whose merge scores best on the *validation* split, by
    track.validation (profile.test_limit examples); returns (chosen settings, one record per grid point). The test
    split is never read."""
    refs = references(track, profile.test_limit, "val", own_only=track.own_only)
    calibration = track.calibration(profile.calibration_samples, profile.batch_size)
    tried, keys = [], []
    for settings in tqdm(grid_points(grid), desc="iteris on validation", disable=_quiet(progress)):
        spec = method_specs(profile, settings)["iteris"]
        row = merge_row(track, "iteris", spec, calibration, refs, profile.test_limit, "val")
        key, fields = track.validation(row)
        tried.append({**settings, **fields})
        keys.append(key)
        if log:
            log(f"validation {settings}: {key}")
    best = max(range(len(tried)), key=keys.__getitem__)
    return {k: tried[best][k] for k in grid}, tried


# ---------------------------------------------------------------- per-example outcomes and paired comparisons


def split_outcomes(metrics: dict) -> tuple[dict, dict]:
    """(the metrics without per-example outcomes, {task: {metric: [value per example]}}) from what a track's
    `evaluate` returned, in either place the contract allows (module docstring). The metrics are not modified."""
    metrics = dict(metrics)
    outcomes = {task: dict(values) for task, values in metrics.pop(PER_EXAMPLE, {}).items()}
    for task, value in metrics.items():
        if isinstance(value, dict) and PER_EXAMPLE in value:
            metrics[task] = {k: v for k, v in value.items() if k != PER_EXAMPLE}
            outcomes.setdefault(task, {}).update(value[PER_EXAMPLE])
    return metrics, outcomes


def per_example(row: dict, task: str, metric: str) -> list:
    """The row's values of `metric` on `task`, one per test example in test-set order."""
    try:
        return row[PER_EXAMPLE][task][metric]
    except KeyError:
        stored = {t: sorted(m) for t, m in row.get(PER_EXAMPLE, {}).items()}
        raise OutcomesError(
            f"row {row.get('label')!r} has no per-example {metric!r} on task {task!r} (stored: {stored or 'none'}); "
            "re-run its benchmark with this version of the harness, which keeps every example's outcome.") from None


def paired(row_a: dict, row_b: dict, task: str, metric: str, **options) -> PairedDifference:
    """Metric of row a minus row b on one task, paired by example: mean difference with a paired bootstrap
    interval (and the exact McNemar p-value for 0/1 outcomes); options go to measure.paired_difference
    (confidence, resamples, seed)."""
    a, b = per_example(row_a, task, metric), per_example(row_b, task, metric)
    if len(a) != len(b):
        raise OutcomesError(f"rows {row_a.get('label')!r} and {row_b.get('label')!r} were measured on {len(a)} and "
                            f"{len(b)} examples of {task!r}: a paired comparison needs the same test examples.")
    return paired_difference(a, b, **options)


def paired_mean(row_a: dict, row_b: dict, metric: str, scale: dict | None = None, tasks=None,
                **options) -> PairedDifference:
    """Difference of the mean over tasks of the per-task mean metric (a − b), each task weighted equally as in
    the table's "mean" columns, paired by example. scale: {task: factor} multiplies that task's values first (1 /
    the own LoRA's metric gives the normalized score). tasks: default, every task of row a's outcomes.

    The examples of all tasks are pooled with weights N / (T · n_t) (N examples, T tasks, n_t of task t), so the
    pooled mean is the mean over tasks; the bootstrap resamples the pooled pairs, which lets the task mix vary
    between resamples and makes the interval slightly wider than a per-task (stratified) one. Weighted or scaled
    outcomes are no longer 0/1, so then there is no McNemar p-value."""
    import numpy as np

    tasks = list(tasks or row_a.get(PER_EXAMPLE, {}))
    if not tasks:
        per_example(row_a, "<any task>", metric)  # raises the error that says what is missing
    pairs = []
    for task in tasks:
        a = np.asarray(per_example(row_a, task, metric), dtype=np.float64)
        b = np.asarray(per_example(row_b, task, metric), dtype=np.float64)
        if a.shape != b.shape:
            paired(row_a, row_b, task, metric)  # raises the error that names the sizes
        factor = (scale or {}).get(task, 1.0)
        pairs.append((a * factor, b * factor))
    total = sum(a.size for a, _ in pairs)
    a = np.concatenate([a * total / (len(pairs) * a.size) for a, _ in pairs])
    b = np.concatenate([b * total / (len(pairs) * b.size) for _, b in pairs])
    return paired_difference(a, b, **options)


def mean_interval(row: dict, metric: str, scale: dict | None = None, tasks=None, **options) -> PairedDifference:
    """The row's own mean over tasks (as paired_mean weighs them) with its bootstrap interval: the paired
    difference with a row of zeros on the same examples. For error bars of one model; compare two models with
    paired_mean, whose interval is narrower because both models meet the same hard examples."""
    tasks = list(tasks or row.get(PER_EXAMPLE, {}))
    zero = {"label": "zero", PER_EXAMPLE: {t: {metric: [0.0] * len(per_example(row, t, metric))} for t in tasks}}
    return paired_mean(row, zero, metric, scale, tasks, **options)


def own_scale(rows: list[dict], metric: str = "accuracy") -> dict[str, float]:
    """{task: 1 / the metric of the task's own LoRA} from the "lora:<task>" rows, for paired_mean(scale=...) on
    normalized scores."""
    own = {r["label"].split(":", 1)[1]: r for r in rows if r.get("method") == "lora"}
    return {task: 1 / row[metric][task] for task, row in own.items() if row[metric][task] > 0}


# ---------------------------------------------------------------- rows and tables


def score_row(label: str, method: str, accuracy: dict[str, float], own: dict[str, float] | None = None) -> dict:
    """A result row: a metric per task and its mean, and with `own` (each task's own-LoRA metric) the paper's
    normalized score per task and its mean."""
    row = {"label": label, "method": method, "accuracy": accuracy,
           "mean_accuracy": sum(accuracy.values()) / len(accuracy)}
    if own is not None:
        row["normalized"] = normalized(accuracy, own)
        row["mean_normalized"] = sum(row["normalized"].values()) / len(accuracy)
    return row


def normalized(accuracy: dict, own: dict) -> dict:
    """metric / the task's own LoRA metric, per task."""
    return {t: accuracy[t] / own[t] if own[t] > 0 else float("nan") for t in accuracy}


def run_columns(unit: str = "task", zero: str = "0", memory: bool = True) -> list[Column]:
    """The columns every table ends with: calibration samples (`zero` for data-free methods), merge seconds and,
    with memory, the peak MB."""
    def samples(r):
        value = r.get("calibration_samples")
        return "-" if value is None else zero if value == 0 else str(value)

    columns = [(f"samples/{unit}", samples),
               ("merge s", lambda r: f"{r['merge_seconds']:.1f}" if "merge_seconds" in r else "-")]
    if memory:
        columns.append(("peak MB", lambda r: f"{r['peak_memory_mb']:.0f}" if "peak_memory_mb" in r else "-"))
    return columns


def task_columns(rows: list[dict]) -> list[Column]:
    """The method, accuracy per task and the mean accuracy."""
    return [("method", lambda r: r["label"]),
            *((t, lambda r, t=t: f"{r['accuracy'][t]:.3f}") for t in rows[0]["accuracy"]),
            ("mean acc", lambda r: f"{r['mean_accuracy']:.3f}")]


def accuracy_columns(rows: list[dict]) -> list[Column]:
    """task_columns, mean normalized accuracy, then run_columns()."""
    return [*task_columns(rows), ("mean norm.", lambda r: f"{r['mean_normalized']:.3f}"), *run_columns()]


def markdown_table(rows: list[dict], columns: Callable[[list[dict]], list[Column]] = accuracy_columns) -> str:
    """The rows as a markdown table; `columns(rows)` gives (header, cell) pairs."""
    cols = columns(rows)
    lines = ["| " + " | ".join(h for h, _ in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r) for _, cell in cols) + " |" for r in rows]
    return "\n".join(lines)


def to_json(out: dict, indent: int = 1) -> str:
    """The results as JSON text, each list of numbers (per-example outcomes) on one line, so that a file of a few
    thousand outcomes per row stays readable and diffs by row."""
    import json
    import re

    # A list that json.dumps broke over lines starts with "[" and a newline, which no JSON string holds unescaped,
    # so only such lists are joined and strings are never touched.
    text = json.dumps(out, indent=indent)
    return re.sub(r"\[\n[-+\d.,eE\s]+\]", lambda m: "[" + " ".join(m.group(0)[1:-1].split()) + "]", text)
