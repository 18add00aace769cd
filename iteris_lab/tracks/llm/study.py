"""Chapter 06's study: how a merge's accuracy depends on calibration samples, α, solves, λ and the task count.

Every measurement here is one merge of shipped LoRAs (merge_loras) followed by the benchmarks' evaluation
(tracks.llm.evaluate: label-word likelihood or greedy exact match), on the same test splits:

- samples:  accuracy against unlabeled calibration samples per task (RegMean and the IterIS sweep), several seeded
            draws of the samples per size;
- alpha:    IterIS (sweep) against α of α‖M‖_F·I;
- solves:   the paper's Jacobi loop, solve 1..K, against the sweep (its fixed point): relative Frobenius distance
            ‖ΔW_t − ΔW*‖ / ‖ΔW*‖ over all layers, and accuracy after each solve;
- weights:  the λ variants "official", "paper" and "none";
- tasks:    the number of merged tasks, 2 → N, on nested subsets of a fixed task order.

Accuracies are on the test split, limited to the first `limit` examples per task; the study compares settings, it
selects none (the benchmark chose its IterIS settings on validation). Normalized = merged / the task's own LoRA.
"""
from __future__ import annotations

import dataclasses
import time

import torch

from ...io.peft import load_adapter
from ...measure import weights_added
from ...merge import merge_loras
from ...measure import PairedDifference, mcnemar_p
from ..harness import PER_EXAMPLE, mean_interval, paired_mean, score_row, split_outcomes
from .tasks import calibration_batches
from .track import LlmTrack, load_track


def study_track(model: str, names=None, adapter_root=None) -> LlmTrack:
    """The benchmark's track (tracks.llm.track): `model` ("minilm" | "smollm2") with its benchmark tasks, or with the tasks `names` (which may include the
    extra SmolLM2 tasks of tasks.smollm2_more_tasks), and their LoRAs from data/adapters/<model>/<task>."""
    return load_track(model, adapter_root, names)


def subset(track: LlmTrack, names) -> LlmTrack:
    """The same model with only the tasks `names` (in that order)."""
    names = list(names)
    heads = {t: track.heads[t] for t in names} if track.heads else None
    return dataclasses.replace(track, tasks={t: track.tasks[t] for t in names},
                               adapters={t: track.adapters[t] for t in names}, heads=heads)


def own_accuracy(track: LlmTrack, limit: int | None) -> dict[str, float]:
    """Each task's accuracy under its own LoRA (the normalizer), and the base model's, on the test split."""
    own = {}
    for task, path in track.adapters.items():
        with weights_added(track.model, load_adapter(path).layers):
            own[task] = split_outcomes(track.evaluate("test", limit, tasks=[task]))[0][task]
    return own


def calibration(track: LlmTrack, samples: int, seed: int = 0, batch_size: int = 16) -> list[list[dict]]:
    """Per task, `samples` unlabeled prompts of its train split (seeded draw), in batches."""
    return [calibration_batches(task, track.tokenizer, n=samples, batch_size=batch_size, max_length=track.max_length,
                                seed=seed) for task in track.tasks.values()]


def score(track: LlmTrack, deltas: dict, limit: int | None, own: dict[str, float]) -> dict:
    """Accuracy per task of W0 + deltas, its mean, normalized per task and mean normalized, evaluation seconds, and
    the per-example outcomes ({task: {"correct": [1/0 per test example]}}: harness.paired compares two rows)."""
    start = time.perf_counter()
    with weights_added(track.model, deltas):
        accuracy, outcomes = split_outcomes(track.evaluate("test", limit))
    row = score_row("", "", accuracy, own)
    return {key: row[key] for key in ("accuracy", "mean_accuracy", "normalized", "mean_normalized")} | {
        "eval_seconds": round(time.perf_counter() - start, 2), PER_EXAMPLE: outcomes}


def merge_row(track: LlmTrack, method: str, own: dict, limit: int | None, samples: int = 0, seed: int = 0,
              batch_size: int = 16, **settings) -> dict:
    """One merge of the track's LoRAs, scored: settings, merge seconds and the score() fields."""
    batches = calibration(track, samples, seed, batch_size) if samples else None
    result = merge_loras(track.model, list(track.adapters.values()), batches, method=method, progress=False,
                         **settings)
    return {"method": method, "samples": samples, "seed": seed, "tasks": list(track.tasks), **settings,
            "merge_seconds": round(result.seconds, 2), **score(track, result.deltas, limit, own)}


def relative_distance(deltas: dict, reference: dict) -> float:
    """‖ΔW − ΔW*‖_F / ‖ΔW*‖_F over all layers together."""
    num = sum(float((deltas[k].double() - reference[k].double()).pow(2).sum()) for k in reference)
    den = sum(float(reference[k].double().pow(2).sum()) for k in reference)
    return (num / den) ** 0.5


def solves_rows(track: LlmTrack, own: dict, limit: int | None, samples: int, max_iter: int, seed: int = 0,
                batch_size: int = 16, **settings) -> dict:
    """The Jacobi loop's solves 1..max_iter next to the sweep: distance to the sweep's ΔW and accuracy per solve."""
    batches = calibration(track, samples, seed, batch_size)
    adapters = list(track.adapters.values())
    sweep = merge_loras(track.model, adapters, batches, method="iteris", schedule="sweep", progress=False, **settings)
    per_solve = []
    jacobi = merge_loras(track.model, adapters, batches, method="iteris", schedule="jacobi", max_iter=max_iter,
                         progress=False, on_iteration=lambda rec, d: per_solve.append({k: v.clone() for k, v in d.items()}),
                         **settings)
    rows = []
    for t, (deltas, record) in enumerate(zip(per_solve, jacobi.history), start=1):
        rows.append({"solve": t, "distance_to_fixed_point": relative_distance(deltas, sweep.deltas),
                     "max_change": max(record.change.values()), "mean_objective": record.mean_objective(),
                     **score(track, deltas, limit, own)})
    return {"samples": samples, "seed": seed, **settings, "jacobi_seconds": round(jacobi.seconds, 2),
            "sweep_seconds": round(sweep.seconds, 2), "per_solve": rows,
            "sweep": score(track, sweep.deltas, limit, own)}


def nested_subsets(order, smallest: int = 2) -> list[list[str]]:
    """[order[:2], order[:3], ..., order]: each subset adds one task to the previous one."""
    return [list(order[:k]) for k in range(smallest, len(order) + 1)]


# ---------------------------------------------------------------- how sure: intervals for the study's rows


def pooled_outcomes(row: dict, tasks) -> list:
    """A row's right (1) / wrong (0) outcomes on `tasks`' test examples, one list in task order: what the exact
    McNemar test of two rows pairs (measure.paired_difference gives its p-value for 0/1 outcomes)."""
    return [v for t in tasks for v in row[PER_EXAMPLE][t]["correct"]]


def normalized_difference(row_a: dict, row_b: dict, own: dict, **options) -> PairedDifference:
    """Mean normalized accuracy of row a minus row b (rows of merge_row, same test examples), paired by example,
    with its 95 % paired bootstrap interval (harness.paired_mean with scale 1 / own accuracy)."""
    return paired_mean(row_a, row_b, "correct", {t: 1 / own[t] for t in own}, **options)


def normalized_interval(row: dict, own: dict, **options) -> PairedDifference:
    """One row's mean normalized accuracy with its bootstrap interval (harness.mean_interval), for error bars."""
    return mean_interval(row, "correct", {t: 1 / own[t] for t in own}, **options)


def smallest_p(row_a: dict, row_b: dict, limit) -> tuple[int, float]:
    """For rows stored without per-example outcomes: (d, p) with d the net number of test examples row a gets
    right more than row b over all tasks (`limit` examples per task: a number, or {task: number}) and p the
    smallest exact McNemar p-value any per-example outcomes with those totals could give (every discordant
    example favouring one side: mcnemar_p(|d|, 0) = 2^(1−|d|)). When even p > 0.05 the difference is within
    noise whatever the outcomes were; when p ≤ 0.05 it may or may not be: only the outcomes can tell."""
    sizes = limit if isinstance(limit, dict) else {t: limit for t in row_a["accuracy"]}
    d = sum(round((row_a["accuracy"][t] - row_b["accuracy"][t]) * sizes[t]) for t in row_a["accuracy"])
    return d, mcnemar_p(abs(d), 0)
