"""The VLM harness: the base VLM, each style LoRA and every merge of the two, scored per style.

A model is asked, for each test image, for a positive caption with the positive prompt and a negative caption with
the negative prompt. Per style we report content accuracy (the right digit and no other), style accuracy by the
sentiment judge and by the word lists, and BLEU-4 against k reference captions of that style. A merge's
normalized score is its metric divided by the same metric of that style's own LoRA.

Calibration (IterIS, RegMean): teacher-forced passes over image + style prompt + a caption drawn from the LoRA's
training distribution, on training images. mask="text" (default) drops the 16 image-token rows from the Grams:
the style instruction comes after the image in a causal LM, so at image positions the two tasks see the same
inputs and ask for different outputs, rows that only blur the two styles. mask="all" keeps them.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ...adapters import load_adapter
from ...measure import PeakMemory, weights_added
from ...merge import merge_loras
from ...paths import missing_data
from ...profiles import Profile
from ..harness import method_specs
from . import captions, vlm

STYLE_NAMES = ("positive", "negative")
METRICS = ("content", "style", "lexicon", "bleu")
KEEP = 4  # captions kept per style and row in the benchmark JSON
MASKS = ("text", "all")


@dataclass
class VlmTrack:
    model: torch.nn.Module
    tokenizer: object
    adapters: dict[str, str]
    splits: dict
    judge: captions.SentimentJudge


def load_vlm_track(base_dir=vlm.BASE_DIR, adapter_dir=vlm.ADAPTER_DIR) -> VlmTrack:
    """The shipped base VLM, the style LoRAs under adapter_dir/<style>, the digit splits and the judge."""
    from pathlib import Path

    adapters = {s: str(Path(adapter_dir) / s) for s in STYLE_NAMES}
    missing = [a for a in adapters.values() if not Path(a, "adapter_config.json").is_file()]
    if missing:
        raise missing_data(missing[0], "style LoRA", f"scripts/train_vlm.py lora --style {Path(missing[0]).name}")
    model, tokenizer = vlm.load_vlm(base_dir)
    return VlmTrack(model, tokenizer, adapters, captions.digit_splits(), captions.SentimentJudge())


def split_images(track: VlmTrack, split: str, limit: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    pixels, labels = track.splits[split]
    return pixels[:limit], labels[:limit]


def caption_metrics(texts: list[str], labels, style: str | None, judge=None) -> dict:
    """content, style (judge), lexicon (word lists) and bleu of captions asked in `style` (None: plain)."""
    labels = [int(y) for y in labels]
    n = len(texts)
    out = {"content": sum(captions.content_correct(t, y) for t, y in zip(texts, labels)) / n,
           "bleu": captions.bleu(texts, captions.references(labels, style))}
    if style is not None:
        out["lexicon"] = sum(captions.lexicon_style(t) == style for t in texts) / n
        if judge is not None:
            out["style"] = sum(p == style for p in judge.predict(texts)) / n
    return out


def evaluate_styles(track: VlmTrack, split: str = "test", limit: int | None = None, styles=STYLE_NAMES,
                    keep: int = 0, nll: bool = True) -> dict[str, dict]:
    """{style: metrics} of track.model as it is now (with nll: the reference captions' NLL, lower is better);
    keep > 0 adds the first `keep` captions as "samples"."""
    pixels, labels = split_images(track, split, limit)
    out = {}
    for style in styles:
        texts = vlm.generate_captions(track.model, track.tokenizer, pixels, captions.prompt_for(style))
        out[style] = caption_metrics(texts, labels, style, track.judge)
        if nll:
            out[style]["nll"] = caption_nll(track, style, split, limit)
        if keep:
            out[style]["samples"] = texts[:keep]
    return out


@torch.no_grad()
def caption_nll(track: VlmTrack, style: str, split: str = "test", limit: int | None = None,
                batch_size: int = 16) -> float:
    """Mean per-token NLL of one reference caption per image of `style` (teacher-forced, with the style prompt).
    Finer than the accuracies, which saturate: it shows how much of a LoRA's style a merge keeps."""
    pixels, labels = split_images(track, split, limit)
    texts = [refs[0] for refs in captions.references(labels, style)]
    total = tokens = 0.0
    for start in range(0, len(labels), batch_size):
        batch = vlm.caption_batch(track.model, track.tokenizer, pixels[start:start + batch_size],
                                  [captions.prompt_for(style)] * len(texts[start:start + batch_size]),
                                  texts[start:start + batch_size])
        n = int((batch["labels"][:, 1:] != -100).sum())
        total += vlm.caption_loss(track.model, batch).item() * n
        tokens += n
    return total / tokens


def calibration_batches(track: VlmTrack, style: str, n: int, batch_size: int, mask: str = "text",
                        seed: int = 0) -> list[dict]:
    """n teacher-forced samples of `style` (training images, captions drawn from the LoRA's training distribution).

    mask="text": attention_mask (which selects Gram rows) zeros the image positions and model_attention_mask
    holds the real mask the model attends with (see vlm.calibration_forward); mask="all": image rows count too.
    """
    if mask not in MASKS:
        raise ValueError(f"mask must be one of {MASKS}, got {mask!r}")
    pixels, labels = track.splits["train"]
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))[:n]
    texts = captions.captions_for(labels[order], style, seed=seed + 1)
    prompt, batches = captions.prompt_for(style), []
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        full = vlm.caption_batch(track.model, track.tokenizer, pixels[idx], [prompt] * len(idx),
                                 texts[start:start + batch_size])
        batch = {"input_ids": full["input_ids"], "pixel_values": full["pixel_values"]}
        if mask == "text":
            batch.update(attention_mask=full["text_mask"], model_attention_mask=full["attention_mask"])
        else:
            batch["attention_mask"] = full["attention_mask"]
        batches.append(batch)
    return batches


def merge(track: VlmTrack, calibration: list | None = None, **kwargs):
    """merge_loras on the VLM's style LoRAs, with the VLM calibration forward."""
    adapters = [load_adapter(track.adapters[s]) for s in STYLE_NAMES]
    return merge_loras(track.model, adapters, calibration, forward=vlm.calibration_forward, progress=False, **kwargs)


def score_row(label: str, method: str, metrics: dict, own: dict | None) -> dict:
    """A row: metrics per style; with `own` ({style: metrics of that style's LoRA}) the normalized score per metric
    and style, and its mean over styles."""
    row = {"label": label, "method": method, "metrics": metrics}
    if own is not None:
        row["normalized"] = {m: {s: metrics[s][m] / own[s][m] if own[s][m] > 0 else float("nan") for s in metrics}
                             for m in METRICS}
        row["mean_normalized"] = {m: sum(v.values()) / len(v) for m, v in row["normalized"].items()}
    return row


def references(track: VlmTrack, profile: Profile, split: str = "test") -> tuple[list[dict], dict]:
    """Rows of the base model and of each style LoRA alone, and {style: own LoRA metrics}."""
    rows = [score_row("base", "base", evaluate_styles(track, split, profile.test_limit, keep=KEEP), None)]
    own = {}
    for style in STYLE_NAMES:
        with weights_added(track.model, load_adapter(track.adapters[style]).layers):
            metrics = evaluate_styles(track, split, profile.test_limit, keep=KEEP)
        own[style] = metrics[style]
        rows.append(score_row(f"lora:{style}", "lora", metrics, None))
    for row in rows:
        row.update(score_row(row["label"], row["method"], row["metrics"], own))
    return rows, own


def run_methods(track: VlmTrack, profile: Profile, labels, own: dict, iteris: dict | None = None,
                mask: str = "text", split: str = "test", log=print) -> list[dict]:
    """One row per merge method of harness.method_specs, evaluated on `split`."""
    specs, calibration, rows = method_specs(profile, iteris), {}, []
    for label in labels:
        spec = dict(specs[label])
        samples = spec.pop("samples", 0)
        if samples and samples not in calibration:
            calibration[samples] = [calibration_batches(track, s, samples, profile.batch_size, mask)
                                    for s in STYLE_NAMES]
        with PeakMemory(torch.device("cpu")) as memory:
            result = merge(track, calibration.get(samples), **spec)
        start = time.perf_counter()
        with weights_added(track.model, result.deltas):
            row = score_row(label, spec["method"], evaluate_styles(track, split, profile.test_limit, keep=KEEP), own)
        row.update(calibration_samples=samples, merge_seconds=result.seconds, eval_seconds=time.perf_counter() - start,
                   peak_memory_mb=memory.peak_mb, mask=mask if samples else None,
                   settings={k: v for k, v in result.settings.items() if k != "adapters"})
        log(f"{label}: merge {result.seconds:.0f}s " + _summary(row))
        rows.append(row)
    return rows


def _summary(row: dict) -> str:
    m = row["metrics"]
    return " ".join(f"{s}: content {m[s]['content']:.2f} style {m[s]['style']:.2f} bleu {m[s]['bleu']:.2f}"
                    for s in STYLE_NAMES)


def markdown_table(rows: list[dict]) -> str:
    """Per style: content / style (judge) / lexicon / BLEU / reference-caption NLL; then the mean normalized content,
    style and BLEU."""
    head = ["method"] + [f"{s[:3]} {m}" for s in STYLE_NAMES for m in METRICS + ("nll",)] + \
           ["norm. content", "norm. style", "norm. bleu", "samples/task", "merge s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["label"]] + [f"{r['metrics'][s].get(m, float('nan')):.3f}" for s in STYLE_NAMES
                                for m in METRICS + ("nll",)]
        cells += [f"{r['mean_normalized'][m]:.3f}" for m in ("content", "style", "bleu")]
        cells += [str(r.get("calibration_samples") or "-"),
                  f"{r['merge_seconds']:.1f}" if "merge_seconds" in r else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def choose_iteris(track: VlmTrack, profile: Profile, grid: list[dict], mask: str = "text", log=print):
    """The IterIS settings (from `grid`, a list of merge kwargs) of best mean normalized style x content on the
    *validation* split, ties broken by the lower caption NLL; returns (chosen kwargs, tried rows). The test split
    is never read."""
    own = {}
    for style in STYLE_NAMES:
        with weights_added(track.model, load_adapter(track.adapters[style]).layers):
            own[style] = evaluate_styles(track, "val", profile.test_limit, styles=(style,))[style]
    calibration = [calibration_batches(track, s, profile.calibration_samples, profile.batch_size, mask)
                   for s in STYLE_NAMES]
    tried = []
    for settings in grid:
        result = merge(track, calibration, method="iteris", max_iter=profile.max_iter, **settings)
        with weights_added(track.model, result.deltas):
            row = score_row("iteris", "iteris", evaluate_styles(track, "val", profile.test_limit), own)
        score = row["mean_normalized"]["style"] * row["mean_normalized"]["content"]
        nll = sum(row["metrics"][s]["nll"] for s in STYLE_NAMES) / len(STYLE_NAMES)
        tried.append({**settings, "val_metrics": row["metrics"], "val_score": score, "val_nll": nll})
        log(f"validation {settings}: score {score:.3f} nll {nll:.4f} " + _summary(row))
    # accuracies saturate on this task: ties go to the lower reference-caption NLL
    best = max(tried, key=lambda r: (round(r["val_score"], 6), -r["val_nll"]))
    return {k: best[k] for k in grid[0]}, tried


def own_metrics(track: VlmTrack, split: str = "test", limit: int | None = None, keep: int = 0) -> dict[str, dict]:
    """{style: metrics of that style's own LoRA, asked in that style} (the denominators of normalized scores)."""
    own = {}
    for style in STYLE_NAMES:
        with weights_added(track.model, load_adapter(track.adapters[style]).layers):
            own[style] = evaluate_styles(track, split, limit, styles=(style,), keep=keep)[style]
    return own


def caption_grid(pixels: torch.Tensor, columns: dict[str, list[str]], labels=None):
    """A figure: one row per image (pixels (N, 3, 32, 32) in [-1, 1]), the image, then one text cell per column
    {name: captions of these images}."""
    from matplotlib.figure import Figure

    n, names = len(pixels), list(columns)
    fig = Figure(figsize=(2.2 + 2.6 * len(names), 1.5 * n), layout="constrained")
    axes = fig.subplots(n, 1 + len(names), squeeze=False)
    for i in range(n):
        axes[i, 0].imshow((pixels[i, 0] + 1) / 2, cmap="gray", vmin=0, vmax=1)
        axes[i, 0].set_title("" if labels is None else f"digit {int(labels[i])}", fontsize=8)
        for j, name in enumerate(names, start=1):
            axes[i, j].text(0.0, 0.5, "\n".join(_wrap(columns[name][i])), fontsize=7, va="center")
            if i == 0:
                axes[i, j].set_title(name, fontsize=8)
        for ax in axes[i]:
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_frame_on(False)
    return fig


def _wrap(text: str, width: int = 28) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width) or [""]
