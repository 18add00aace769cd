"""The LLM tracks on the harness: MiniLM (encoder + a head per task) and SmolLM2 (prompted causal LM), their
shipped task LoRAs and accuracy per task. MiniLM tasks keep their own classification heads; only the encoder LoRAs
are merged."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ...io.destination import write_text
from ...paths import data_dir, missing_data
from ...profiles import Profile, current_profile
from ..harness import (ITERIS_GRID, PER_EXAMPLE, References, Track, choose_iteris, environment, reference_rows,
                       references, run_methods, score_row, split_outcomes, to_json)
from ..intervals import results_tables, with_intervals


@dataclass
class LlmTrack(Track):
    """One model with its tasks and shipped LoRAs (and, for MiniLM, each task's head)."""

    name: str
    model: torch.nn.Module
    tokenizer: object
    tasks: dict
    adapters: dict[str, str]
    heads: dict | None
    max_length: int

    def evaluate(self, split: str, limit: int | None, tasks=None, label: str = "", progress: bool = False) -> dict:
        """{task: accuracy (only `tasks` when given), "per_example": {task: {"correct": [1 or 0 per example, in
        test-set order]}}} (the harness's per-example contract; harness.split_outcomes separates the two)."""
        from .evaluate import evaluate_tasks

        chosen = {t: self.tasks[t] for t in tasks} if tasks else self.tasks
        outcomes = evaluate_tasks(self.model, self.tokenizer, chosen, heads=self.heads, split=split, limit=limit,
                                  max_length=self.max_length, progress=progress, outcomes=True)
        return {**{t: sum(o) / len(o) for t, o in outcomes.items()},
                PER_EXAMPLE: {t: {"correct": o} for t, o in outcomes.items()}}

    def calibration(self, samples: int, batch_size: int) -> list[list]:
        from .tasks import calibration_batches

        return [calibration_batches(task, self.tokenizer, n=samples, batch_size=batch_size,
                                    max_length=self.max_length) for task in self.tasks.values()]

    def score(self, label: str, method: str, metrics: dict, refs: References) -> dict:
        return score_row(label, method, metrics, refs.own())

    def validation(self, row: dict) -> tuple[tuple, dict]:
        fields = {"val_accuracy": row["accuracy"], "val_mean_normalized": row["mean_normalized"]}
        return (row["mean_normalized"],), fields


def shipped_adapters() -> Path:
    """Where the shipped task LoRAs are: <data>/adapters/<model>/<task>."""
    return data_dir() / "adapters"


def load_track(name: str, adapter_root=None, names=None) -> LlmTrack:
    """The model `name` ("minilm" | "smollm2"), its benchmark tasks (or the tasks `names`, see tasks.load_tasks) and
    their LoRAs under data/adapters/<name>/<task>."""
    from .evaluate import load_head
    from .models import load_minilm, load_smollm2
    from .tasks import load_tasks

    tasks = load_tasks(name, names)
    root = Path(adapter_root or shipped_adapters()) / name
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
    return LlmTrack(name, model, tokenizer, tasks, adapters, heads, int(recipe.get("max_length", 128)))


def evaluate_track(track: LlmTrack, limit: int | None, progress: bool = False, split: str = "test") -> dict:
    """{task: accuracy} of the track's model as its weights stand now (W0, or W0 + ΔW inside `weights_added`)."""
    return split_outcomes(track.evaluate(split, limit, progress=progress))[0]


# ---------------------------------------------------------------- the demo and the benchmark

# SmolLM2 merges cost ~40 forward passes per solve on CPU: its validation grid is the two published λ variants at
# the paper's α = 1e-4.
GRIDS = {"minilm": ITERIS_GRID, "smollm2": {"alpha": (1e-4,), "adaptive_weights": ("official", "paper")}}


def report(track: LlmTrack, profile: Profile, rows: list[dict], seconds: float, **extra) -> dict:
    """The benchmark JSON of an LLM track; its rows carry their 95 % intervals (intervals.with_intervals)."""
    return {"model": track.name, "profile": profile.name, "seconds": seconds, "environment": environment(),
            "tasks": {name: {"labels": list(t.labels), "kind": t.kind, "test_size": len(t.test),
                             "evaluated": min(len(t.test), profile.test_limit or len(t.test))}
                      for name, t in track.tasks.items()},
            "results": with_intervals(rows), **extra}


def _on_gpu(track: LlmTrack) -> LlmTrack:
    if torch.cuda.is_available():
        track.model.cuda()
    return track


def run_demo(json_path="results.json", quiet: bool = False, model: str = "minilm") -> dict:
    """The README's main job: every method on the embedded default track, printed and written as JSON."""
    start = time.perf_counter()
    profile = current_profile()
    say = (lambda line: None) if quiet else (lambda line: print(f"iteris-lab demo: {line}", flush=True))
    say(f"profile {profile.name} (ITERIS_PROFILE); loading the {model} model and its task LoRAs ...")
    track = _on_gpu(load_track(model))
    # the references (base model and each LoRA on the test split) take a while before the merge bar appears
    say(f"scoring the base model and each of the {len(track.adapters)} LoRAs on the test split "
        f"({profile.test_limit or 'all'} examples per task) ...")
    refs = references(track, profile.test_limit)
    say(f"references done at {time.perf_counter() - start:.0f} s; merging with every method ...")
    rows = reference_rows(track, refs) + run_methods(track, profile, progress=not quiet, refs=refs, log=say)
    out = report(track, profile, rows, time.perf_counter() - start)

    write_text(json_path, to_json(out))
    print(f"\niteris-lab demo: {track.name}, profile {profile.name}, "
          f"{profile.calibration_samples} calibration samples per task\n")
    print(results_tables(out["results"]))
    print(f"\nwritten to {json_path} in {out['seconds']:.0f} s")
    return out


def run_bench(model: str = "minilm", out_dir=".", figures=None, quiet: bool = False, grid: dict | None = None) -> dict:
    """The full benchmark of one LLM track: IterIS settings chosen on the validation split over `grid` (default
    GRIDS[model]), then every method on the test split; writes OUT/<model>.json and .md (and, given a `figures`
    folder, <model>_scores.png)."""
    start = time.perf_counter()
    profile = current_profile()
    track = _on_gpu(load_track(model))
    chosen, tried = choose_iteris(track, profile, grid or GRIDS[model], progress=not quiet)
    rows = run_methods(track, profile, iteris=chosen, progress=not quiet)
    out = report(track, profile, rows, time.perf_counter() - start, iteris_validation=tried, iteris_chosen=chosen)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text(out_dir / f"{model}.json", to_json(out))  # the destination rule, as demo --json
    write_text(out_dir / f"{model}.md", results_tables(out["results"]) + "\n")
    if figures is not None:
        score_plot(out, Path(figures) / f"{model}_scores.png")
    print(results_tables(out["results"]))
    return out


def score_plot(out: dict, path: Path, reference: str = "iteris") -> None:
    """The benchmark's figure. With per-example outcomes: each merge's mean normalized accuracy with its 95 %
    bootstrap interval (left) and its paired difference from `reference` (right). Without (an older JSON): the
    normalized accuracy per task as bars, no error bars."""
    rows = [r for r in out["results"] if r["method"] != "lora" and r["label"] != "base"]
    if not all("per_example" in r for r in rows) or reference not in {r["label"] for r in rows}:
        from ...viz.plots import plot_scores

        table = [{"method": r["label"], "task": t, "normalized": v} for r in rows for t, v in r["normalized"].items()]
        figure = plot_scores(table, title=f"{out['model']}: normalized accuracy (merged / own LoRA)")
    else:
        figure = interval_figure(out, reference)
    figure.savefig(path, dpi=120, bbox_inches="tight")


def interval_figure(out: dict, reference: str = "iteris"):
    """Left: every merge's mean normalized accuracy with its bootstrap interval; right: its paired difference from
    `reference` (harness.paired_mean, 95 %, seeded), blue ahead / red behind / grey within noise."""
    from matplotlib.figure import Figure

    from ...viz.study import plot_intervals
    from ..harness import mean_interval, own_scale, paired_mean

    scale = own_scale(out["results"])
    rows = {r["label"]: r for r in out["results"] if r["method"] != "lora" and r["label"] != "base"}
    fig = Figure(figsize=(11, 1.2 + 0.35 * len(rows)), layout="constrained")
    left, right = fig.subplots(1, 2)
    plot_intervals({k: mean_interval(r, "correct", scale) for k, r in rows.items()},
                   "mean normalized accuracy, 95 % bootstrap interval", "normalized accuracy (mean over tasks)",
                   reference=None, ax=left)
    others = {k: r for k, r in rows.items() if k != reference}
    diffs = {k: paired_mean(r, rows[reference], "correct", scale) for k, r in others.items()}
    plot_intervals(diffs, f"paired difference from {reference}, 95 % interval",
                   f"mean normalized: method − {reference}", ax=right)
    where = out.get("subtitle") or f"{out['profile']} profile"
    fig.suptitle(f"{out['model']} ({where}): merges of {len(scale)} task LoRAs")
    return fig
