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

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ...adapters import load_adapter
from ...measure import PeakMemory, weights_added
from ...merge import merge_loras
from ...paths import missing_data
from ...profiles import Profile
from ..harness import method_specs
from . import diffusion as dm
from .digits import STYLES, DigitJudge, digit_images, fit_judge, ink, slant_score, split_indices

METRICS = {"ink": ink, "slant_score": slant_score}
METHODS = ("linear", "task_arithmetic", "ties", "dare_ties", "cat", "regmean", "regmean_many", "iteris",
           "iteris_sweep")


@dataclass
class DiffusionTrack:
    unet: torch.nn.Module
    encoder: dm.TextEncoder
    judge: DigitJudge
    adapters: dict[str, str]  # concept -> PEFT folder


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
    """{set: {content, ink, slant_score}} of DDIM samples (no guidance) for every prompt set."""
    sets = sets or prompt_sets(list(track.adapters))
    out = {}
    for name, concepts in sets.items():
        prompts, digits = prompts_for(concepts, n, offset=seed)
        images = dm.sample(unet, track.encoder, prompts, steps=steps, seed=seed)
        out[name] = {"content": track.judge.accuracy(images, digits),
                     **{m: float(f(images).mean()) for m, f in METRICS.items()}}
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


def references(track: DiffusionTrack, n: int, seed: int = 0) -> tuple[dict, dict]:
    """The base model's and each LoRA's metrics: (base, {concept: metrics})."""
    base = measure(track.unet, track, n, seed)
    own = {}
    for c, path in track.adapters.items():
        with weights_added(track.unet, load_adapter(path).layers):
            own[c] = measure(track.unet, track, n, seed)
    return base, own


def merge_and_measure(track: DiffusionTrack, spec: dict, calib: dict, n: int, seed: int = 0, on_iteration=None):
    """One merge (merge_loras kwargs in spec, `samples` → calibration[samples]) and its metrics."""
    spec = dict(spec)
    samples = spec.pop("samples", 0)
    adapters = [load_adapter(p) for p in track.adapters.values()]
    with PeakMemory(next(track.unet.parameters()).device) as memory:
        result = merge_loras(track.unet, adapters, calib.get(samples), progress=False, on_iteration=on_iteration,
                             **spec)
    with weights_added(track.unet, result.deltas):
        metrics = measure(track.unet, track, n, seed)
    return result, metrics, memory.peak_mb, samples


def run_methods(track: DiffusionTrack, profile: Profile, n: int, labels=METHODS, iteris: dict | None = None,
                seed: int = 0, log=print) -> list[dict]:
    """Rows for the base, each LoRA and every merge in `labels`, all measured on the same prompts and noises."""
    base, own = references(track, n, seed)
    rows = [summary_row("base", "base", base, base, own)]
    rows += [summary_row(f"lora:{c}", "lora", m, base, own) for c, m in own.items()]
    specs = method_specs(profile, iteris)
    calib = {}
    for label in labels:
        start = time.perf_counter()
        samples = specs[label].get("samples", 0)
        if samples and samples not in calib:
            calib[samples] = [calibration(track, c, samples) for c in track.adapters]
        result, metrics, peak, samples = merge_and_measure(track, specs[label], calib, n, seed)
        row = summary_row(label, specs[label]["method"], metrics, base, own)
        row.update(calibration_samples=samples, merge_seconds=result.seconds, peak_memory_mb=peak,
                   settings={k: v for k, v in result.settings.items() if k != "adapters"})
        rows.append(row)
        log(f"{label}: fidelity {row['mean_fidelity']:.2f} leakage {row['mean_leakage']:.2f} "
            f"content {row['content']:.2f} ({time.perf_counter() - start:.0f} s)")
    return rows


def markdown_table(rows: list[dict]) -> str:
    concepts = list(rows[0]["fidelity"])
    head = ["method", "content", *(f"{c} (both)" for c in concepts), *(f"{c} (alone)" for c in concepts),
            *(f"{c} leak" for c in concepts), "samples/concept", "merge s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["label"], f"{r['content']:.3f}", *(f"{r['fidelity'][c]:.2f}" for c in concepts),
                 *(f"{r['alone'][c]:.2f}" for c in concepts), *(f"{r['leakage'][c]:.2f}" for c in concepts),
                 str(r.get("calibration_samples", "")) or "-",
                 f"{r['merge_seconds']:.1f}" if "merge_seconds" in r else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


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
