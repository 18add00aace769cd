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
"""
from __future__ import annotations

import itertools
import os
import platform
import time
from dataclasses import dataclass
from typing import Callable

import torch
from tqdm.auto import tqdm

from ..adapters import load_adapter
from ..measure import PeakMemory, weights_added
from ..merge import merge_loras
from ..profiles import Profile

DEMO_METHODS = ("linear", "task_arithmetic", "ties", "dare_ties", "cat", "regmean", "regmean_many", "iteris",
                "iteris_sweep")
ITERIS_GRID = {"alpha": (1e-4, 1e-2), "adaptive_weights": ("official", "paper", "none")}
Column = tuple[str, Callable[[dict], str]]  # (header, row -> cell text)


@dataclass
class References:
    """Metrics of the base model (None when not measured) and, per task, of the model with that task's LoRA."""

    base: dict | None
    loras: dict[str, dict]

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
        "iteris": dict(method="iteris", samples=few, max_iter=profile.max_iter, **(iteris or {})),
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
    base = None if own_only else track.evaluate(split, limit, label="base")
    loras = {}
    for task, adapter in zip(track.adapters, _adapters(track)):
        with weights_added(track.model, adapter.layers):
            loras[task] = track.evaluate(split, limit, (task,) if own_only else None, label=f"lora:{task}")
    return References(base, loras)


def reference_rows(track: Track, refs: References) -> list[dict]:
    rows = [track.score("base", "base", refs.base, refs)] if refs.base is not None else []
    return rows + [track.score(f"lora:{task}", "lora", metrics, refs) for task, metrics in refs.loras.items()]


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
        metrics = track.evaluate(split, limit, label=label)
    run = dict(calibration_samples=samples, merge_seconds=result.seconds, eval_seconds=time.perf_counter() - start,
               peak_memory_mb=memory.peak_mb, objective=[r.mean_objective() for r in result.history],
               **{k: v if samples else None for k, v in track.calibration_info.items()}, **extra,
               settings={k: v for k, v in result.settings.items() if k != "adapters"})
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


def accuracy_columns(rows: list[dict]) -> list[Column]:
    """Accuracy per task, mean accuracy, mean normalized accuracy, then run_columns()."""
    return [("method", lambda r: r["label"]),
            *((t, lambda r, t=t: f"{r['accuracy'][t]:.3f}") for t in rows[0]["accuracy"]),
            ("mean acc", lambda r: f"{r['mean_accuracy']:.3f}"),
            ("mean norm.", lambda r: f"{r['mean_normalized']:.3f}"), *run_columns()]


def markdown_table(rows: list[dict], columns: Callable[[list[dict]], list[Column]] = accuracy_columns) -> str:
    """The rows as a markdown table; `columns(rows)` gives (header, cell) pairs."""
    cols = columns(rows)
    lines = ["| " + " | ".join(h for h, _ in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r) for _, cell in cols) + " |" for r in rows]
    return "\n".join(lines)


def environment() -> dict:
    import peft
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}


def __getattr__(name: str):
    """harness.load_track / evaluate_track / LlmTrack: the default (LLM) track, as the chapters call it."""
    if name in ("LlmTrack", "load_track", "evaluate_track"):
        from .llm import track

        return getattr(track, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
