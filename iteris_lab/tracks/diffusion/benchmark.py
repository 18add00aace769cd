"""The diffusion harness: the base UNet, each concept LoRA and every merge, measured on the same prompts and noises.

Prompt sets (n prompts each, digits cycled, templates varied): "both" asks for every concept, "<concept>" for
that one alone, "plain" for none. Per set and model:
    content   the share of samples the digit judge reads as the prompted digit
    ink       mean ink fraction (the thick concept's metric), slant: mean slant score (the slant concept's)
Per merged model and concept c, against the base on plain prompts (0) and c's own LoRA on c's prompts (1):
    fidelity[c]  on the "both" prompts       (the paper's multi-concept setting)
    alone[c]     on c's own prompts
    leakage[c]   the largest level of c on the sets that do not ask for it (0 is ideal)
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import torch

from ...io.destination import write_text
from ...io.peft import load_adapter
from ...measure import weights_added
from ...merge import merge_loras
from ...paths import missing_data
from ...profiles import current_profile
from .. import harness
from ..harness import References, Track, run_columns
from . import diffusion as dm
from .digits import STYLES, DigitJudge, digit_images, fit_judge, ink, slant_score, split_indices

METRICS = {"ink": ink, "slant_score": slant_score}
SEEDS = {"test": 0, "val": 1}  # start noises and prompt templates of each split
METHODS = ("linear", "task_arithmetic", "ties", "dare_ties", "cat", "regmean", "regmean_many", "iteris",
           "iteris_sweep")


@dataclass
class DiffusionTrack(Track):
    """The text-to-image track on the harness: tasks are the concepts, metrics are per prompt set; `evaluate`
    samples `limit` images per prompt set, on the test seed (0) or the validation seed (1: other noises and
    prompt templates)."""

    unet: torch.nn.Module
    encoder: dm.TextEncoder
    judge: DigitJudge
    adapters: dict[str, str]  # concept -> PEFT folder
    name: str = "diffusion"
    own_only = False  # the concept levels need the base and each LoRA on every prompt set

    @property
    def model(self) -> torch.nn.Module:
        return self.unet

    def evaluate(self, split: str, limit: int | None, tasks=None, label: str = "") -> dict:
        return measure(self.unet, self, limit, seed=SEEDS[split])

    def calibration(self, samples: int, batch_size: int) -> list[list]:
        """Per concept (batches of 50 noised images: the batch size is the track's own)."""
        return [calibration(self, c, samples) for c in self.adapters]

    def score(self, label: str, method: str, metrics: dict, refs: References) -> dict:
        return summary_row(label, method, metrics, refs.base, refs.loras)

    def validation(self, row: dict) -> tuple[tuple, dict]:
        """Best mean fidelity on "both" prompts minus mean leakage; content accuracy breaks ties."""
        score = row["mean_fidelity"] - row["mean_leakage"]
        return (round(score, 3), row["content"]), {"val_score": score, "val_content": row["content"],
                                                   "val_fidelity": row["fidelity"], "val_leakage": row["leakage"]}


def load_diffusion_track(root=None, concepts=None) -> DiffusionTrack:
    """The shipped base UNet, the MiniLM text encoder, the digit judge and one LoRA per concept."""
    root = Path(root or dm.DATA)
    concepts = list(concepts or dm.CONCEPTS)
    adapters = {c: str(root / "adapters" / c) for c in concepts}
    missing = [a for a in adapters.values() if not Path(a, "adapter_config.json").is_file()]
    if missing:
        raise missing_data(missing[0], "concept LoRA", "scripts/train_diffusion.py loras")
    return DiffusionTrack(dm.load_base(root / "base"), dm.TextEncoder(), fit_judge(16), adapters)


def prompt_sets(concepts) -> dict[str, tuple[str, ...]]:
    return {"both": tuple(concepts), **{c: (c,) for c in concepts}, "plain": ()}


def prompts_for(concepts, n: int, offset: int = 0) -> tuple[list[str], torch.Tensor]:
    """n prompts asking for `concepts`; digit i % 10, template (i // 10) shifted by offset (validation: offset 1)."""
    digits = torch.arange(n) % 10
    return [dm.prompt(int(d), i // 10 + offset, concepts) for i, d in enumerate(digits)], digits


def measure(unet, track: DiffusionTrack, n: int, seed: int = 0, steps: int = 25, sets=None) -> dict[str, dict]:
    """{set: {content, ink, slant_score, per_example}} of DDIM samples (no guidance) for every prompt set.

    per_example: {metric: [one value per sample, in prompt order]} (content 0/1: the judge reads the prompted
    digit). Sample k of every set and every model starts from the same noise and asks for the same digit, so two
    models (or two sets) compare paired by k (measure.paired_difference)."""
    sets = sets or prompt_sets(list(track.adapters))
    out = {}
    for name, concepts in sets.items():
        prompts, digits = prompts_for(concepts, n, offset=seed)
        images = dm.sample(unet, track.encoder, prompts, steps=steps, seed=seed)
        outcomes = {"content": (track.judge.predict(images) == digits).double().tolist(),
                    **{m: f(images).double().tolist() for m, f in METRICS.items()}}
        out[name] = {**{m: sum(v) / len(v) for m, v in outcomes.items()}, "per_example": outcomes}
    return out


def concept_scores(metrics: dict, base: dict, own: dict[str, dict]) -> dict:
    """Fidelity, alone and leakage per concept on the 0 (base, plain) .. 1 (own LoRA, own prompt) scale."""
    scores = {"fidelity": {}, "alone": {}, "leakage": {}}
    for c, own_metrics in own.items():
        m = dm.CONCEPTS[c].metric
        lo, hi = base["plain"][m], own_metrics[c][m]
        level = {s: (v[m] - lo) / (hi - lo) for s, v in metrics.items()}
        scores["fidelity"][c] = level.get("both")
        scores["alone"][c] = level[c]
        scores["leakage"][c] = max(v for s, v in level.items() if s not in ("both", c))
    return scores


def levels_per_example(metrics: dict, base: dict, own: dict[str, dict], prompt_set: str = "both") -> dict:
    """Per sample of `prompt_set` (metrics with "per_example", from measure): each concept's level on the
    concept_scores scale (0 base on plain prompts, 1 own LoRA on its prompts) and their mean over concepts, "mean".
    The mean over samples of levels[c] is concept_scores' fidelity[c] (for "both")."""
    levels = {}
    for c, own_metrics in own.items():
        m = dm.CONCEPTS[c].metric
        lo, hi = base["plain"][m], own_metrics[c][m]
        levels[c] = [(v - lo) / (hi - lo) for v in metrics[prompt_set]["per_example"][m]]
    levels["mean"] = [sum(values) / len(own) for values in zip(*(levels[c] for c in own))]
    return levels


def content_per_example(metrics: dict) -> list[float]:
    """Per sample index k: the share of the prompt sets whose sample k the judge reads right; its mean over k is
    summary_row's `content`."""
    columns = [v["per_example"]["content"] for v in metrics.values()]
    return [sum(values) / len(columns) for values in zip(*columns)]


def summary_row(label: str, method: str, metrics: dict, base: dict, own: dict) -> dict:
    """A result row: the metrics per prompt set, concept scores, and their means."""
    scores = concept_scores(metrics, base, own)
    concepts = list(own)
    return {"label": label, "method": method, "metrics": metrics, **scores,
            "mean_fidelity": sum(scores["fidelity"].values()) / len(concepts),
            "mean_leakage": sum(scores["leakage"].values()) / len(concepts),
            "content": sum(v["content"] for v in metrics.values()) / len(metrics)}


def calibration(track: DiffusionTrack, concept: str, n: int, batch_size: int = 50,
                timesteps=dm.CALIBRATION_TIMESTEPS, seed: int = 0) -> list[dict]:
    """Conditional-only calibration batches for one concept: n training digits in the concept's style with
    prompts asking for it, noised at `timesteps` with seeded noise (see diffusion.noisy_batches)."""
    images, labels = digit_images(16)
    train, _ = split_indices(labels, seed=0)
    pick = train[torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:n]]
    styled = dm.to_model_range(STYLES[dm.CONCEPTS[concept].style](images[pick]))
    prompts = [dm.prompt(int(d), i, (concept,)) for i, d in enumerate(labels[pick])]
    cond, mask = track.encoder(prompts)
    return dm.noisy_batches(styled, cond, mask, timesteps, batch_size, seed)


def merge_and_measure(track: DiffusionTrack, spec: dict, calib: dict, n: int, on_iteration=None):
    """One merge (merge_loras kwargs in spec, `samples` -> calib[samples]) and its metrics on the test seed:
    (MergeResult, metrics, peak MB, samples)."""
    samples = spec.get("samples", 0)
    result, metrics, run = harness.merge_and_evaluate(track, spec, calib.get(samples), n, on_iteration=on_iteration)
    for name, outcomes in run.get("per_example", {}).items():  # a harness that keeps outcomes apart: back in place
        metrics[name] = {**metrics[name], "per_example": outcomes}
    return result, metrics, run["peak_memory_mb"], samples


def concept_columns(rows: list[dict]) -> list:
    """Content, then per concept the level on "both" prompts, alone and the leakage."""
    concepts = list(rows[0]["fidelity"])
    return [("method", lambda r: r["label"]), ("content", lambda r: f"{r['content']:.3f}"),
            *((f"{c} (both)", lambda r, c=c: f"{r['fidelity'][c]:.2f}") for c in concepts),
            *((f"{c} (alone)", lambda r, c=c: f"{r['alone'][c]:.2f}") for c in concepts),
            *((f"{c} leak", lambda r, c=c: f"{r['leakage'][c]:.2f}") for c in concepts),
            *run_columns("concept", memory=False)]


markdown_table = partial(harness.markdown_table, columns=concept_columns)


def base_quality(unet, encoder: dm.TextEncoder, n: int = 200, seed: int = 0) -> dict:
    """The base model's content accuracy on plain prompts (DDIM 25, guidance 1 and 2), and the judge's own."""
    judge = fit_judge(16)
    prompts, digits = prompts_for((), n, offset=seed)
    out = {"judge_held_out": judge.held_out, "samples": n}
    for guidance in (1.0, 2.0):
        images = dm.sample(unet, encoder, prompts, guidance=guidance, seed=seed)
        out[f"content_guidance_{guidance:g}"] = judge.accuracy(images, digits)
        out[f"ink_guidance_{guidance:g}"] = float(ink(images).mean())
    return out


# ---------------------------------------------------------------- the benchmark

GRID = {"alpha": (1e-4, 1e-2), "adaptive_weights": ("official", "none")}
SAMPLES = {"ci": 40, "cpu": 200, "gpu": 500}  # images per prompt set


def run_bench(out_dir=".", samples: int | None = None, figures=None, log=print) -> dict:
    """The diffusion benchmark: IterIS settings chosen on validation prompts and noises (seed 1, half as many
    samples, at least 20), then every method on the test ones (seed 0, `samples` per prompt set, default
    SAMPLES[profile]). Writes OUT/diffusion.json and .md; given a `figures` folder, diffusion_scores.png and
    diffusion_grid.png (samples of every model for prompts asking for both concepts)."""
    start, profile = time.perf_counter(), current_profile()
    n = samples or SAMPLES[profile.name]
    track = load_diffusion_track()
    chosen, tried = harness.choose_iteris(track, replace(profile, test_limit=max(20, n // 2)), GRID, progress=False,
                                          log=log)
    rows = harness.run_methods(track, replace(profile, test_limit=n), METHODS, chosen, progress=False, log=log)
    out = {"model": "diffusion", "profile": profile.name, "samples_per_prompt_set": n, "sampler": "DDIM 25, guidance 1",
           "calibration_timesteps": list(dm.CALIBRATION_TIMESTEPS), "judge_held_out": track.judge.held_out,
           "base_recipe": dm.recipe(dm.DATA / "base"), "iteris_chosen": chosen, "iteris_validation": tried,
           "environment": harness.environment(), "results": rows, "seconds": time.perf_counter() - start}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text(out_dir / "diffusion.json", json.dumps(out, indent=2, default=str))  # the destination rule
    write_text(out_dir / "diffusion.md", markdown_table(rows) + "\n")
    if figures is not None:
        score_plot(rows, Path(figures) / "diffusion_scores.png")
        grid_figure(track, profile, chosen, Path(figures) / "diffusion_grid.png")
    print(markdown_table(rows))
    return out


def grid_figure(track: DiffusionTrack, profile, chosen: dict, path: Path) -> None:
    from ...viz.plots import plot_image_grid

    prompts, digits = prompts_for(tuple(track.adapters), 10)
    rows = {"base": dm.sample(track.unet, track.encoder, prompts)}
    for c, p in track.adapters.items():
        with weights_added(track.unet, load_adapter(p).layers):
            rows[f"LoRA {c}"] = dm.sample(track.unet, track.encoder, prompts)
    calib = track.calibration(profile.calibration_samples, profile.batch_size)
    for label, spec in (("linear", {"method": "linear"}), ("task arithmetic", {"method": "task_arithmetic"}),
                        ("regmean", {"method": "regmean"}),
                        ("iteris", {"method": "iteris", "schedule": "jacobi", "max_iter": profile.max_iter, **chosen})):
        result = merge_loras(track.unet, list(track.adapters.values()), calib, progress=False, **spec)
        with weights_added(track.unet, result.deltas):
            rows[label] = dm.sample(track.unet, track.encoder, prompts)
    figure = plot_image_grid(rows, columns=digits.tolist(), title="prompt asks for both concepts (thick + slant)")
    figure.savefig(path, dpi=120, bbox_inches="tight")


def score_plot(rows: list[dict], path: Path) -> None:
    from ...viz.plots import plot_bars

    table = [{"method": r["label"], "measure": f"{c} {kind}", "level": r[kind][c]}
             for r in rows if r["method"] != "lora" for kind in ("fidelity", "leakage") for c in r["fidelity"]]
    figure = plot_bars(table, x="measure", y="level", hue="method", reference=1.0,
                       title="concept level (0 = base, 1 = own LoRA): asked for both, and leaked where not asked")
    figure.savefig(path, dpi=120, bbox_inches="tight")
