"""The benchmark harness: base, each task LoRA and every merge of the shipped LoRAs, on the same test sets.

Scores follow the paper: a merged model's accuracy on task i divided by the accuracy of task i's own LoRA is
its normalized score; the table reports both per task and their means. MiniLM tasks keep their own
classification heads; only the encoder LoRAs are merged.
"""
from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..adapters import load_adapter
from ..measure import PeakMemory, weights_added
from ..merge import merge_loras
from ..paths import data_dir, missing_data
from ..profiles import Profile, current_profile

DATA = data_dir()
ADAPTERS = DATA / "adapters"
DEMO_METHODS = ("linear", "task_arithmetic", "ties", "dare_ties", "cat", "regmean", "regmean_many", "iteris",
                "iteris_sweep")


@dataclass
class Track:
    """One model with its tasks and shipped LoRAs (and, for MiniLM, each task's head)."""

    name: str
    model: torch.nn.Module
    tokenizer: object
    tasks: dict
    adapters: dict[str, str]
    heads: dict | None
    max_length: int


def load_track(name: str, adapter_root=None) -> Track:
    """The model `name` ("minilm" | "smollm2"), its tasks and the LoRAs under data/adapters/<name>/<task>."""
    from .llm.evaluate import load_head
    from .llm.models import load_minilm, load_smollm2
    from .llm.tasks import load_tasks

    tasks = load_tasks(name)
    root = Path(adapter_root or ADAPTERS) / name
    adapters = {t: str(root / t) for t in tasks}
    missing = [a for a in adapters.values() if not Path(a, "adapter_config.json").is_file()]
    if missing:
        raise missing_data(missing[0], "trained LoRA", f"scripts/train_loras.py --model {name}")
    recipe = json.loads(Path(next(iter(adapters.values())), "recipe.json").read_text())
    if name == "minilm":
        model, tokenizer = load_minilm(num_labels=len(next(iter(tasks.values())).labels))
        heads = {t: load_head(a) for t, a in adapters.items()}
    else:
        model, tokenizer = load_smollm2()
        heads = None
    return Track(name, model, tokenizer, tasks, adapters, heads, int(recipe.get("max_length", 128)))


def evaluate_track(track: Track, limit: int | None, progress: bool = False, split: str = "test") -> dict[str, float]:
    """{task: accuracy} of the track's model as its weights stand now (W0, or W0 + ΔW inside `weights_added`)."""
    from .llm.evaluate import evaluate_tasks

    return evaluate_tasks(track.model, track.tokenizer, track.tasks, heads=track.heads, split=split, limit=limit,
                          max_length=track.max_length, progress=progress)


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


def run_methods(track: Track, profile: Profile, labels=DEMO_METHODS, iteris: dict | None = None,
                progress: bool = True, own: dict | None = None) -> list[dict]:
    """Rows of the result table: base, each LoRA, then every merge in `labels`. Given `own` (each task's own-LoRA
    accuracy, from an earlier run on the same test sets), the base and LoRA rows are not measured again."""
    from .llm.tasks import calibration_batches

    quiet = not progress or bool(os.environ.get("TQDM_DISABLE"))
    specs = method_specs(profile, iteris)
    device = next(track.model.parameters()).device
    adapters = [load_adapter(track.adapters[t]) for t in track.tasks]
    rows = []
    if own is None:
        references = [("base", "base", evaluate_track(track, profile.test_limit))]
        for task, adapter in zip(track.tasks, adapters):
            with weights_added(track.model, adapter.layers):
                references.append((f"lora:{task}", "lora", evaluate_track(track, profile.test_limit)))
        own = {task: references[1 + i][2][task] for i, task in enumerate(track.tasks)}
        rows = [score_row(label, method, accuracy, own) for label, method, accuracy in references]
    calibration: dict[int, list] = {}
    bar = tqdm(labels, desc=f"{track.name}: merging", disable=quiet)
    for label in bar:
        bar.set_postfix(method=label)
        spec = dict(specs[label])
        samples = spec.pop("samples", 0)
        if samples and samples not in calibration:
            calibration[samples] = [calibration_batches(task, track.tokenizer, n=samples, batch_size=profile.batch_size,
                                                        max_length=track.max_length) for task in track.tasks.values()]
        with PeakMemory(device) as memory:
            result = merge_loras(track.model, adapters, calibration.get(samples), progress=False, **spec)
        with weights_added(track.model, result.deltas):
            row = score_row(label, spec["method"], evaluate_track(track, profile.test_limit), own)
        row.update(calibration_samples=samples, merge_seconds=result.seconds, peak_memory_mb=memory.peak_mb,
                   settings={k: v for k, v in result.settings.items() if k != "adapters"})
        rows.append(row)
    return rows


def score_row(label: str, method: str, accuracy: dict[str, float], own: dict[str, float] | None = None) -> dict:
    """A result row: accuracy per task and its mean, and with `own` (each task's own-LoRA accuracy) the paper's
    normalized score per task and its mean."""
    row = {"label": label, "method": method, "accuracy": accuracy,
           "mean_accuracy": sum(accuracy.values()) / len(accuracy)}
    if own is not None:
        row["normalized"] = normalized(accuracy, own)
        row["mean_normalized"] = sum(row["normalized"].values()) / len(accuracy)
    return row


def normalized(accuracy: dict, own: dict) -> dict:
    """accuracy / the task's own LoRA accuracy, per task."""
    return {t: accuracy[t] / own[t] if own[t] > 0 else float("nan") for t in accuracy}


def markdown_table(rows: list[dict]) -> str:
    """The result rows as a markdown table: accuracy per task, means, samples, time, memory."""
    tasks = list(rows[0]["accuracy"])
    head = ["method", *tasks, "mean acc", "mean norm.", "samples/task", "merge s", "peak MB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["label"], *(f"{r['accuracy'][t]:.3f}" for t in tasks), f"{r['mean_accuracy']:.3f}",
                 f"{r['mean_normalized']:.3f}", str(r.get("calibration_samples", "")) or "-",
                 f"{r['merge_seconds']:.1f}" if "merge_seconds" in r else "-",
                 f"{r['peak_memory_mb']:.0f}" if "peak_memory_mb" in r else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def environment() -> dict:
    import peft
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}


def report(track: Track, profile: Profile, rows: list[dict], seconds: float, **extra) -> dict:
    return {"model": track.name, "profile": profile.name, "seconds": seconds, "environment": environment(),
            "tasks": {name: {"labels": list(t.labels), "kind": t.kind, "test_size": len(t.test),
                             "evaluated": min(len(t.test), profile.test_limit or len(t.test))}
                      for name, t in track.tasks.items()},
            "results": rows, **extra}


def run_demo(json_path="results.json", quiet: bool = False, model: str = "minilm") -> dict:
    """The README's main job: every method on the embedded default track, printed and written as JSON."""
    start = time.perf_counter()
    profile = current_profile()
    track = load_track(model)
    if track.model.device.type == "cpu" and torch.cuda.is_available():
        track.model.cuda()
    rows = run_methods(track, profile, progress=not quiet)
    out = report(track, profile, rows, time.perf_counter() - start)
    Path(json_path).write_text(json.dumps(out, indent=2))
    print(f"\niteris-lab demo: {track.name}, profile {profile.name}, "
          f"{profile.calibration_samples} calibration samples per task\n")
    print(markdown_table(rows))
    print(f"\nwritten to {json_path} in {out['seconds']:.0f} s")
    return out


def run_bench(model: str = "minilm", json_path="bench.json", quiet: bool = False, grid: dict | None = None) -> dict:
    """The full benchmark of one track; IterIS settings are chosen on the validation split only, over `grid`
    (default ITERIS_GRID)."""
    start = time.perf_counter()
    profile = current_profile()
    track = load_track(model)
    if torch.cuda.is_available():
        track.model.cuda()
    chosen, tried = choose_iteris_settings(track, profile, grid or ITERIS_GRID, progress=not quiet)
    rows = run_methods(track, profile, iteris=chosen, progress=not quiet)
    out = report(track, profile, rows, time.perf_counter() - start, iteris_validation=tried, iteris_chosen=chosen)
    Path(json_path).write_text(json.dumps(out, indent=2))
    Path(json_path).with_suffix(".md").write_text(markdown_table(rows) + "\n")
    print(markdown_table(rows))
    return out


ITERIS_GRID = {"alpha": (1e-4, 1e-2), "adaptive_weights": ("official", "paper", "none")}


def choose_iteris_settings(track: Track, profile: Profile, grid: dict = ITERIS_GRID, progress: bool = True):
    """The (alpha, adaptive_weights) of best mean normalized *validation* accuracy; the test split is never read."""
    from .llm.tasks import calibration_batches

    adapters = [load_adapter(track.adapters[t]) for t in track.tasks]
    own = {}
    for task, adapter in zip(track.tasks, adapters):
        with weights_added(track.model, adapter.layers):
            own[task] = evaluate_track(track, profile.test_limit, split="val")[task]
    calibration = [calibration_batches(task, track.tokenizer, n=profile.calibration_samples,
                                       batch_size=profile.batch_size, max_length=track.max_length)
                   for task in track.tasks.values()]
    tried = []
    combos = [(a, w) for a in grid["alpha"] for w in grid["adaptive_weights"]]
    for alpha, weights in tqdm(combos, desc="iteris on validation", disable=not progress or bool(os.environ.get("TQDM_DISABLE"))):
        result = merge_loras(track.model, adapters, calibration, max_iter=profile.max_iter, alpha=alpha,
                             adaptive_weights=weights, progress=False)
        with weights_added(track.model, result.deltas):
            accuracy = evaluate_track(track, profile.test_limit, split="val")
        tried.append({"alpha": alpha, "adaptive_weights": weights, "val_accuracy": accuracy,
                      "val_mean_normalized": score_row("iteris", "iteris", accuracy, own)["mean_normalized"]})
    best = max(tried, key=lambda r: r["val_mean_normalized"])
    return {"alpha": best["alpha"], "adaptive_weights": best["adaptive_weights"]}, tried
