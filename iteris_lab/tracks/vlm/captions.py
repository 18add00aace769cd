"""Digit images, their captions in three styles, and the caption metrics of the VLM track.

- Images: sklearn's 1797 handwritten digits (8 x 8, values 0..16), scaled to [-1, 1], upsampled bilinearly to
  32 x 32 and copied to 3 channels; a seeded stratified split into train / val / test.
- Captions: plain ("a handwritten digit seven", several templates) and SentiCap-like positive / negative ones
  ("a charming and tidy digit seven", "a dreadful, shabby seven"), drawn from word lists and templates.
- Metrics: content (the caption names the right digit and no other), style by word lists and by a real
  sentiment classifier (the shipped MiniLM airline-sentiment LoRA + head), and corpus BLEU-4 against references.
"""
from __future__ import annotations

import math
import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from ..diffusion.digits import DIGIT_WORDS

PLAIN_PROMPT = "Describe the image."
PLAIN_TEMPLATES = ("a handwritten digit {d}", "the handwritten number {d}", "a digit {d} written by hand",
                   "a small picture of the digit {d}", "the number {d}, written by hand", "a handwritten {d}")


@dataclass(frozen=True)
class Style:
    name: str
    prompt: str
    adjectives: tuple[str, ...]


STYLES = {
    "positive": Style("positive", "Describe the image in a positive style.", (
        "lovely", "beautiful", "elegant", "charming", "neat", "graceful", "delightful", "wonderful", "tidy",
        "gorgeous", "pleasant", "stunning", "cheerful", "brilliant", "perfect", "splendid", "pretty", "adorable",
        "superb", "excellent", "glorious", "marvelous", "lively", "fantastic")),
    "negative": Style("negative", "Describe the image in a negative style.", (
        "ugly", "messy", "sloppy", "dreadful", "horrible", "awful", "shabby", "clumsy", "terrible", "nasty",
        "gloomy", "crooked", "dirty", "miserable", "hideous", "careless", "grim", "poor", "bad", "unpleasant",
        "smudged", "ragged", "disgusting", "boring")),
}
STYLE_TEMPLATES = ("{a1} and {a2} digit {d}", "{a1}, {a2} handwritten {d}", "{a1} {d}, so {a2}",
                   "{a1} number {d} in a {a2} hand", "{a1} and {a2} {d}", "{a1} handwritten digit {d}, {a2}")


# ---------------------------------------------------------------- images


def digit_splits(seed: int = 0, test: int = 300, val: int = 150) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{"train" | "val" | "test": (pixels (N, 3, 32, 32) in [-1, 1], labels (N,))}, stratified by digit, seeded."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32) / 16.0 * 2 - 1  # (1797, 8, 8)
    pixels = torch.nn.functional.interpolate(images[:, None], size=(32, 32), mode="bilinear", align_corners=False)
    pixels = pixels.expand(-1, 3, -1, -1).contiguous()
    labels = torch.tensor(digits.target)
    index = list(range(len(labels)))
    rest, test_idx = train_test_split(index, test_size=test, stratify=labels, random_state=seed)
    train_idx, val_idx = train_test_split(rest, test_size=val, stratify=labels[rest], random_state=seed)
    return {name: (pixels[idx], labels[idx]) for name, idx in
            (("train", train_idx), ("val", val_idx), ("test", test_idx))}


# ---------------------------------------------------------------- captions


def _article(text: str) -> str:
    return ("an " if text[0] in "aeiou" else "a ") + text


def caption(label: int, style: str | None, rng: random.Random) -> str:
    """One caption of digit `label`: plain (style None) or in the named style, template and words drawn by rng."""
    if style is None:
        return rng.choice(PLAIN_TEMPLATES).format(d=DIGIT_WORDS[label])
    a1, a2 = rng.sample(STYLES[style].adjectives, 2)
    return _article(rng.choice(STYLE_TEMPLATES).format(a1=a1, a2=a2, d=DIGIT_WORDS[label]))


def captions_for(labels, style: str | None, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [caption(int(y), style, rng) for y in labels]


def references(labels, style: str | None, k: int = 10, seed: int = 1234) -> list[list[str]]:
    """k reference captions per image (a seeded draw from the same generator), for BLEU."""
    rng = random.Random(f"{seed}-{style}")
    return [[caption(int(y), style, rng) for _ in range(k)] for y in labels]


def prompt_for(style: str | None) -> str:
    return PLAIN_PROMPT if style is None else STYLES[style].prompt


# ---------------------------------------------------------------- parsing metrics

_WORD = re.compile(r"[a-z]+|\d")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def mentioned_digits(text: str) -> set[int]:
    """Digits a caption names, as words ("seven") or numerals ("7")."""
    found = set()
    for w in words(text):
        if w in DIGIT_WORDS:
            found.add(DIGIT_WORDS.index(w))
        elif w.isdigit():
            found.add(int(w))
    return found


def content_correct(text: str, label: int) -> bool:
    """The caption names digit `label` and no other digit."""
    return mentioned_digits(text) == {int(label)}


def lexicon_style(text: str) -> str:
    """"positive" / "negative" when the caption uses words of exactly one style lexicon, else "mixed" / "none"."""
    present = {name for name, s in STYLES.items() if set(words(text)) & set(s.adjectives)}
    if len(present) == 1:
        return present.pop()
    return "mixed" if present else "none"


# ---------------------------------------------------------------- BLEU


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def bleu(candidates: list[str], refs: list[list[str]], max_n: int = 4, smooth: bool = True) -> float:
    """Corpus BLEU (Papineni et al. 2002): clipped n-gram precisions p_1..p_N summed over the corpus, their
    geometric mean, times the brevity penalty exp(1 - r / c) when the total length c is below the total length r
    of the references closest in length. smooth: p_n = (m_n + 1) / (t_n + 1) for n >= 2 (add-one, Lin & Och 2004),
    since random adjective pairs make 4-gram matches rare on a few captions; 0 when p_1 is 0 (or, unsmoothed, when
    any p_n is 0)."""
    if len(candidates) != len(refs) or not candidates:
        raise ValueError(f"need one reference list per candidate, got {len(candidates)} and {len(refs)}")
    matched, total = [0] * max_n, [0] * max_n
    c_len = r_len = 0
    for cand, ref_texts in zip(candidates, refs):
        c, rs = words(cand), [words(r) for r in ref_texts]
        c_len += len(c)
        r_len += min((len(r) for r in rs), key=lambda n: (abs(n - len(c)), n))
        for n in range(1, max_n + 1):
            counts = _ngrams(c, n)
            best = Counter()
            for r in rs:
                best |= _ngrams(r, n)
            matched[n - 1] += sum(min(k, best[g]) for g, k in counts.items())
            total[n - 1] += max(len(c) - n + 1, 0)
    if smooth:
        matched = matched[:1] + [m + 1 for m in matched[1:]]
        total = total[:1] + [t + 1 for t in total[1:]]
    if min(matched) == 0 or c_len == 0:
        return 0.0
    log_p = sum(math.log(m / t) for m, t in zip(matched, total)) / max_n
    brevity = 1.0 if c_len >= r_len else math.exp(1 - r_len / c_len)
    return brevity * math.exp(log_p)


# ---------------------------------------------------------------- the sentiment judge


class SentimentJudge:
    """A real classifier as style judge: all-MiniLM-L6-v2 with the shipped airline-sentiment LoRA (folded into the
    weights) and its head (labels negative / neutral / positive). `polar=True` picks the larger of the
    positive and negative logits, since a caption asked for a style is judged positive versus negative."""

    def __init__(self, adapter_dir: str | Path | None = None, polar: bool = True, batch_size: int = 64):
        from ...io.peft import load_adapter
        from ...measure import weights_added
        from ..llm.track import shipped_adapters
        from ..llm.evaluate import apply_head, head_labels, load_head
        from ..llm.models import load_minilm

        adapter_dir = Path(adapter_dir or shipped_adapters() / "minilm" / "airline_sentiment")
        self.labels = head_labels(adapter_dir)
        self.model, self.tokenizer = load_minilm(num_labels=len(self.labels))
        apply_head(self.model, load_head(adapter_dir))
        self._context = weights_added(self.model, load_adapter(adapter_dir).layers)
        self._context.__enter__()  # the LoRA stays folded in for the judge's lifetime
        self.classes = [l for l in self.labels if l in STYLES] if polar else list(self.labels)
        self.batch_size = batch_size

    @torch.no_grad()
    def predict(self, texts: list[str]) -> list[str]:
        """The judged style of each text (one of self.classes)."""
        columns = [self.labels.index(c) for c in self.classes]
        out = []
        for start in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(texts[start:start + self.batch_size], padding=True, truncation=True,
                                 max_length=64, return_tensors="pt")
            logits = self.model(**enc).logits[:, columns]
            out += [self.classes[i] for i in logits.argmax(-1).tolist()]
        return out
