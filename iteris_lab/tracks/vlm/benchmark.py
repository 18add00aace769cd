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
from ...profiles import Profile, current_profile
from .. import harness
from ..harness import References, Track, normalized, run_columns
from . import captions, vlm

STYLE_NAMES = ("positive", "negative")
METRICS = ("content", "style", "lexicon", "bleu")
KEEP = 4  # captions kept per style and row in the benchmark JSON
MASKS = ("text", "all")


@dataclass
class VlmTrack(Track):
    """The VLM on the harness: tasks are the caption styles; `mask` is the calibration mask (MASKS)."""

    model: torch.nn.Module
    tokenizer: object
    adapters: dict[str, str]
    splits: dict
    judge: captions.SentimentJudge
    mask: str = "text"
    name: str = "vlm"
    forward = staticmethod(vlm.calibration_forward)

    @property
    def calibration_info(self) -> dict:
        return {"mask": self.mask}

    def evaluate(self, split: str, limit: int | None, tasks=None, label: str = "") -> dict:
        """evaluate_styles; the first KEEP captions are kept on the test split."""
        return evaluate_styles(self, split, limit, styles=tasks or STYLE_NAMES, keep=KEEP if split == "test" else 0)

    def calibration(self, samples: int, batch_size: int) -> list[list]:
        return [calibration_batches(self, s, samples, batch_size, self.mask) for s in STYLE_NAMES]

    def score(self, label: str, method: str, metrics: dict, refs: References) -> dict:
        return score_row(label, method, metrics, refs.own())

    def validation(self, row: dict) -> tuple[tuple, dict]:
        """Best mean normalized style x content; accuracies saturate on this task: ties go to the lower
        reference-caption NLL."""
        score = row["mean_normalized"]["style"] * row["mean_normalized"]["content"]
        nll = sum(row["metrics"][s]["nll"] for s in STYLE_NAMES) / len(STYLE_NAMES)
        return (round(score, 6), -nll), {"val_metrics": row["metrics"], "val_score": score, "val_nll": nll}


def load_vlm_track(base_dir=vlm.BASE_DIR, adapter_dir=vlm.ADAPTER_DIR) -> VlmTrack:
    """The shipped base VLM, the style LoRAs under adapter_dir/<style>, the digit splits and the judge."""
    adapters = {s: str(Path(adapter_dir) / s) for s in STYLE_NAMES}
    missing = [a for a in adapters.values() if not Path(a, "adapter_config.json").is_file()]
    if missing:
        raise missing_data(missing[0], "style LoRA", f"scripts/train_vlm.py lora --style {Path(missing[0]).name}")
    model, tokenizer = vlm.load_vlm(base_dir)
    return VlmTrack(model, tokenizer, adapters, captions.digit_splits(), captions.SentimentJudge())


def split_images(track: VlmTrack, split: str, limit: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    pixels, labels = track.splits[split]
    return pixels[:limit], labels[:limit]


def caption_outcomes(texts: list[str], labels, style: str | None, judge=None) -> dict[str, list[float]]:
    """Per caption, in image order: content (1: the right digit and no other), bleu (sentence BLEU-4 against the
    image's references, the same smoothing as the corpus BLEU), and for a style: lexicon (1: that style's words
    only) and, with a judge, style (1: judged that style)."""
    labels = [int(y) for y in labels]
    refs = captions.references(labels, style)
    out = {"content": [float(captions.content_correct(t, y)) for t, y in zip(texts, labels)],
           "bleu": [captions.bleu([t], [r]) for t, r in zip(texts, refs)]}
    if style is not None:
        out["lexicon"] = [float(captions.lexicon_style(t) == style) for t in texts]
        if judge is not None:
            out["style"] = [float(p == style) for p in judge.predict(texts)]
    return out


def caption_metrics(texts: list[str], labels, style: str | None, judge=None, per_example: bool = False) -> dict:
    """content, style (judge), lexicon (word lists): shares of the captions; bleu: corpus BLEU-4 of captions asked in
    `style` (None: plain). per_example adds caption_outcomes as "per_example" (its "bleu" is each caption's sentence
    BLEU, whose mean is not the corpus BLEU: compare two models by it, paired, not against the corpus figure)."""
    outcomes = caption_outcomes(texts, labels, style, judge)
    out = {m: sum(v) / len(v) for m, v in outcomes.items() if m != "bleu"}
    out["bleu"] = captions.bleu(texts, captions.references([int(y) for y in labels], style))
    if per_example:
        out["per_example"] = outcomes
    return out


def evaluate_styles(track: VlmTrack, split: str = "test", limit: int | None = None, styles=STYLE_NAMES,
                    keep: int = 0, nll: bool = True) -> dict[str, dict]:
    """{style: metrics} of track.model as it is now (with nll: the reference captions' NLL, lower is better);
    keep > 0 adds the first `keep` captions as "samples". Every style's metrics hold "per_example": {metric: [one
    value per test image, in split order]} (content, style, lexicon: 0/1; bleu: sentence BLEU; nll: that image's
    reference caption's mean per-token NLL), so two models on the same images compare paired
    (measure.paired_difference)."""
    pixels, labels = split_images(track, split, limit)
    out = {}
    for style in styles:
        texts = vlm.generate_captions(track.model, track.tokenizer, pixels, captions.prompt_for(style))
        out[style] = caption_metrics(texts, labels, style, track.judge, per_example=True)
        if nll:
            out[style]["nll"], out[style]["per_example"]["nll"] = caption_nll(track, style, split, limit,
                                                                               per_example=True)
        if keep:
            out[style]["samples"] = texts[:keep]
    return out


@torch.no_grad()
def caption_nll(track: VlmTrack, style: str, split: str = "test", limit: int | None = None,
                batch_size: int = 16, per_example: bool = False):
    """Mean per-token NLL of one reference caption per image of `style` (teacher-forced, with the style prompt).
    Finer than the accuracies, which saturate: it shows how much of a LoRA's style a merge keeps.
    per_example: (that mean, [each caption's own mean per-token NLL, in image order])."""
    pixels, labels = split_images(track, split, limit)
    texts = [refs[0] for refs in captions.references(labels, style)]
    sums, counts = [], []
    for start in range(0, len(labels), batch_size):
        batch = vlm.caption_batch(track.model, track.tokenizer, pixels[start:start + batch_size],
                                  [captions.prompt_for(style)] * len(texts[start:start + batch_size]),
                                  texts[start:start + batch_size])
        total, tokens = vlm.caption_token_losses(track.model, batch)
        sums.append(total.double())
        counts.append(tokens)
    sums, counts = torch.cat(sums), torch.cat(counts)
    mean = float(sums.sum() / counts.sum())
    return (mean, (sums / counts).tolist()) if per_example else mean


def calibration_batches(track: VlmTrack, style: str, n: int, batch_size: int, mask: str = "text",
                        seed: int = 0) -> list[dict]:
    """n teacher-forced samples of `style` (training images, captions drawn from the LoRA's training distribution).

    mask="text": text_mask (which selects Gram rows, vlm.TEXT_ROWS) zeros the image positions; attention_mask is the
    real mask the model attends with; mask="all": no text_mask, image rows count too.
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
            batch.update(attention_mask=full["attention_mask"], text_mask=full["text_mask"])
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
        row["normalized"] = {m: normalized({s: metrics[s][m] for s in metrics}, {s: own[s][m] for s in metrics})
                             for m in METRICS}
        row["mean_normalized"] = {m: sum(v.values()) / len(v) for m, v in row["normalized"].items()}
    return row


def run_methods(track: VlmTrack, profile: Profile, labels, own: dict, iteris: dict | None = None,
                mask: str = "text", log=print) -> list[dict]:
    """One row per merge method of harness.method_specs on the test split, calibrated with `mask`."""
    return harness.run_methods(replace(track, mask=mask), profile, labels, iteris, progress=False, own=own, log=log)


def caption_columns(rows: list[dict]) -> list:
    """Per style: content / style (judge) / lexicon / BLEU / reference-caption NLL; then the mean normalized
    content, style and BLEU."""
    cells = [("method", lambda r: r["label"])]
    cells += [(f"{s[:3]} {m}", lambda r, s=s, m=m: f"{r['metrics'][s].get(m, float('nan')):.3f}")
              for s in STYLE_NAMES for m in METRICS + ("nll",)]
    cells += [(f"norm. {m}", lambda r, m=m: f"{r['mean_normalized'][m]:.3f}") for m in ("content", "style", "bleu")]
    return cells + run_columns(zero="-", memory=False)


markdown_table = partial(harness.markdown_table, columns=caption_columns)


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


# ---------------------------------------------------------------- the benchmark

GRID = {"alpha": (1e-4,), "adaptive_weights": ("official", "paper")}


def run_bench(out_dir=".", mask: str = "text", test_images: int | None = None, val_images: int = 100,
              mask_ablation: bool = False, base_dir=vlm.BASE_DIR, adapter_dir=vlm.ADAPTER_DIR, log=print) -> dict:
    """The VLM benchmark: IterIS's λ variant chosen on validation images, then every method on the test images
    (default: the profile's test_limit, else 200); mask_ablation adds IterIS calibrated with the other mask.
    Writes OUT/vlm.json (every number, settings, timings, sample captions) and OUT/vlm.md (the table)."""
    profile, start, timings = current_profile(), time.perf_counter(), {}
    profile = replace(profile, test_limit=test_images or profile.test_limit or 200)
    val_profile = replace(profile, test_limit=min(val_images, profile.test_limit))
    track = replace(load_vlm_track(base_dir, adapter_dir), mask=mask)
    timings["load_s"] = time.perf_counter() - start

    t = time.perf_counter()
    chosen, tried = harness.choose_iteris(track, val_profile, GRID, progress=False, log=log)
    timings["validation_s"] = time.perf_counter() - t
    log(f"chosen on validation: {chosen}")

    t = time.perf_counter()
    refs = harness.references(track, profile.test_limit)
    rows = harness.reference_rows(track, refs)
    pixels, labels = split_images(track, "test", profile.test_limit)
    plain = vlm.generate_captions(track.model, track.tokenizer, pixels, captions.PLAIN_PROMPT)
    base_plain = caption_metrics(plain, labels, None)
    timings["references_s"] = time.perf_counter() - t
    log(f"base (plain prompt): {base_plain}")

    t = time.perf_counter()
    rows += harness.run_methods(track, profile, harness.DEMO_METHODS, chosen, progress=False, refs=refs, log=log)
    if mask_ablation:
        other = next(m for m in MASKS if m != mask)
        extra = harness.run_methods(replace(track, mask=other), profile, ["iteris"], chosen, progress=False,
                                    refs=refs, log=log)
        extra[0]["label"] = f"iteris (mask={other})"
        rows += extra
    timings["methods_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - start

    out = {"track": "vlm", "profile": profile.name, "seconds": timings["total_s"], "timings": timings,
           "environment": harness.environment(),
           "settings": {"test_images": len(labels), "val_images": val_profile.test_limit,
                        "calibration_samples": profile.calibration_samples, "many_samples": profile.many_samples,
                        "max_iter": profile.max_iter, "calibration_mask": mask, "iteris_grid": GRID,
                        "judge": "MiniLM airline_sentiment LoRA + head, positive vs negative logit",
                        "bleu": "corpus BLEU-4, add-one smoothing for n >= 2, against 10 reference captions per "
                                "image and style",
                        "prompts": {s: captions.prompt_for(s) for s in STYLE_NAMES},
                        "decoding": "greedy, 16 new tokens"},
           "base_plain_prompt": base_plain, "own_lora": refs.own(), "iteris_chosen": chosen,
           "iteris_validation": tried, "results": rows}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text(out_dir / "vlm.json", json.dumps(out, indent=2) + "\n")  # the destination rule
    table = markdown_table(rows)
    note = (f"Profile {profile.name}: {len(labels)} test images, {profile.calibration_samples} calibration samples "
            f"per style (regmean_many: {profile.many_samples}), IterIS max_iter {profile.max_iter}, chosen on "
            f"validation: {chosen}, calibration mask {mask!r}. Base with the plain prompt: content "
            f"{base_plain['content']:.3f}. Run time {timings['total_s']:.0f} s, {torch.get_num_threads()} torch "
            "thread(s).")
    write_text(out_dir / "vlm.md", f"# VLM style-merge benchmark\n\n{note}\n\n{table}\n")
    print(table)
    return out
