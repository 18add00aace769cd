"""Hub recipe, vision–language: the paper's BLIP captioning setting — one style LoRA per caption style on
Salesforce/blip-image-captioning-base, merged so that one model writes every style.

    config = blip_hub_config()                         # ITERIS_PROFILE=gpu: the settings below
    report = run_blip_hub(config, "runs/blip-styles")  # train missing LoRAs, merge with every method, evaluate, JSON

Setting: LoRAs of rank 32 on the text decoder's *self*-attention query / key / value only (not its cross-attention
to the image, not the vision tower), 50 unlabeled calibration samples per style, 10 solves, α = 8e-7 (the official
BLIP config), adaptive weights "official". A style is asked for with a text prompt ("a positive photo of"), as the
official code does, so the merged model knows which style to write.

Data — a stand-in for SentiCap, which is not on the hub under a stable licence: a public captioning dataset
(default jxie/flickr8k: 8,000 Flickr images, five neutral captions each) whose captions are stylised by `stylize`:
one adjective from the style's word list is put before the caption's subject ("a dog runs" -> "a lovely dog runs").
Train images are split between the styles (disjoint); every style is tested on the same test images, against its
own stylised references. Metrics per style: style accuracy (the caption uses a word of the style's list and none of
another style's, or a `judge` callable) and corpus BLEU-4 against the stylised references.
"""
from __future__ import annotations

import json
import random
import re
import time
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

import torch

from ...io.peft import load_adapter
from ...profiles import Profile, current_profile
from .. import harness
from ..llm.training import fit
from ..vlm.captions import STYLES, bleu, lexicon_style
from .llm import DEFAULT_METHODS, HubRun

CAPTION_DATASET = "jxie/flickr8k"
STYLE_WORDS = {name: style.adjectives for name, style in STYLES.items()}  # the offline VLM track's word lists
Pair = tuple  # (image: PIL.Image or HWC uint8 array, references: a caption or a list of captions)
CaptionLoader = Callable[[str, str], Sequence[Pair]]  # (style, "train" | "test") -> pairs (sliceable), in that style
Judge = Callable[[list[str]], list[str]]  # captions -> the style of each (e.g. captions.SentimentJudge().predict)


@dataclass(frozen=True)
class BlipHubConfig(HubRun):
    """One BLIP hub run; BLIP_PAPER holds the paper's setting with the Flickr8k stand-in data (module docstring).
    target_modules: a regex matched by peft against whole module names; max_train: train images per style
    (disjoint across styles)."""

    styles: tuple[str, ...] = ("positive", "negative")
    dataset: str = CAPTION_DATASET
    prompt_template: str = "a {style} photo of"
    max_new_tokens: int = 30
    num_beams: int = 3

    def prompt(self, style: str) -> str:
        return self.prompt_template.format(style=style)


BLIP_PAPER = BlipHubConfig(model="Salesforce/blip-image-captioning-base", rank=32, lora_alpha=32,
                           target_modules=r".*text_decoder\..*\.attention\.self\.(query|key|value)", train_steps=400,
                           lr=2e-4, warmup_steps=40, max_train=3000, alpha=8e-7, max_length=40)


def blip_hub_config(profile: Profile | None = None, **overrides) -> BlipHubConfig:
    """BlipHubConfig sized by a profile (default: $ITERIS_PROFILE): calibration samples, solves, test size and batch
    size come from it; "gpu" gives the paper's setting. "ci" also shrinks training and decoding. `overrides` win."""
    profile = profile or current_profile()
    sizes = dict(calibration_samples=profile.calibration_samples, max_iter=profile.max_iter,
                 n_test=profile.test_limit, eval_batch_size=profile.batch_size)
    if profile.name == "ci":
        sizes.update(train_steps=20, max_train=64, warmup_steps=2, max_new_tokens=12, num_beams=1)
    return replace(BLIP_PAPER, **{**sizes, **overrides})


# ---------------------------------------------------------------- data


def stylize(caption: str, style: str, seed: int = 0) -> str:
    """The caption, lower-cased, with one adjective of STYLE_WORDS[style] before its subject (after a leading
    determiner, fixing a/an); the adjective is a seeded choice per (caption, style)."""
    words = caption.strip().rstrip(" .").lower().split()
    if not words:
        raise ValueError("cannot stylise an empty caption")
    if style not in STYLE_WORDS:
        raise ValueError(f"no word list for style {style!r}; expected one of {tuple(STYLE_WORDS)}")
    adjective = random.Random(f"{seed}|{style}|{caption}").choice(STYLE_WORDS[style])
    if words[0] in ("a", "an"):
        return " ".join(["an" if adjective[0] in "aeiou" else "a", adjective, *words[1:]])
    if words[0] in ("the", "two", "three", "four", "five", "several", "some", "many", "this", "one"):
        return " ".join([words[0], adjective, *words[1:]])
    return " ".join([adjective, *words])


def _row_captions(row) -> list[str]:
    """A dataset row's captions: columns caption_0.. (Flickr8k), or a `caption(s)` / `text` string or list."""
    numbered = sorted(k for k in row if re.fullmatch(r"captions?_\d+", k))
    if numbered:
        return [row[k] for k in numbered]
    for key in ("captions", "caption", "text", "sentences"):
        if key in row:
            return [row[key]] if isinstance(row[key], str) else list(row[key])
    raise ValueError(f"no caption column among {sorted(row)}")


class _StyledRows(Sequence):
    """Lazy (image, stylised references) pairs over rows of a `datasets` split (images decode on access)."""

    def __init__(self, rows, indices: Sequence[int], style: str, seed: int):
        self.rows, self.indices, self.style, self.seed = rows, list(indices), style, seed

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return _StyledRows(self.rows, self.indices[i], self.style, self.seed)
        row = self.rows[self.indices[i]]
        return row["image"], [stylize(c, self.style, self.seed) for c in _row_captions(row)]


def caption_loader(dataset: str = CAPTION_DATASET, styles: Sequence[str] = ("positive", "negative"),
                   seed: int = 42) -> CaptionLoader:
    """The default loader: `datasets.load_dataset(dataset, split=...)`, downloaded on first use, captions stylised.

    train: style k gets the train rows k, k + n, k + 2n, ... of a seeded order (n styles: disjoint images);
    test: every style gets every row of the test split (validation when there is no test split)."""
    cache = {}

    def split_rows(split: str):
        if split not in cache:
            try:
                import datasets
            except ImportError as err:
                raise ModuleNotFoundError("reading the caption dataset needs the `datasets` package: pip install "
                                          "datasets (or pass your own loader to run_blip_hub)") from err
            names = datasets.get_dataset_split_names(dataset)
            name = split if split in names or split == "train" else "validation"
            cache[split] = datasets.load_dataset(dataset, split=name)
        return cache[split]

    def load(style: str, split: str) -> Sequence[Pair]:
        rows = split_rows(split)
        if split == "train":
            order = list(range(len(rows)))
            random.Random(seed).shuffle(order)
            return _StyledRows(rows, order[list(styles).index(style)::len(styles)], style, seed)
        return _StyledRows(rows, range(len(rows)), style, seed)
    return load


def _references(pair: Pair) -> list[str]:
    return [pair[1]] if isinstance(pair[1], str) else list(pair[1])


# ---------------------------------------------------------------- model and batches


def load_blip(model_id: str, dtype: str = "float32", device: str | None = None):
    """(BlipForConditionalGeneration in eval mode on `device`, BlipProcessor) for a hub id or a local folder."""
    from transformers import BlipForConditionalGeneration, BlipProcessor

    model = BlipForConditionalGeneration.from_pretrained(model_id, dtype=getattr(torch, dtype))
    processor = BlipProcessor.from_pretrained(model_id)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval(), processor


def _text_ids(processor, text: str) -> list[int]:
    return processor.tokenizer(text, add_special_tokens=False)["input_ids"]


def pixel_values(model, processor, images) -> torch.Tensor:
    """(batch, 3, H, W) in the model's dtype."""
    rgb = [im.convert("RGB") if hasattr(im, "convert") else im for im in images]  # Flickr has grey images
    values = processor.image_processor(images=rgb, return_tensors="pt")["pixel_values"]
    return values.to(next(model.parameters()).dtype)


def caption_batch(model, processor, images, prompt: str, captions: Sequence[str], max_length: int) -> dict:
    """Teacher-forced batch: pixel_values (batch, 3, H, W); input_ids / attention_mask (batch, seq) =
    [DEC] prompt caption [SEP], right padded; labels (batch, seq) = input_ids on caption and [SEP], -100 on [DEC],
    the prompt and padding. BLIP's loss shifts labels itself, and generate() also starts from [DEC] (bos)."""
    text = model.config.text_config
    head = [text.bos_token_id] + _text_ids(processor, prompt)
    seqs = [head + _text_ids(processor, c)[:max(1, max_length - len(head) - 1)] + [text.sep_token_id]
            for c in captions]
    width = max(map(len, seqs))
    input_ids = torch.full((len(seqs), width), text.pad_token_id)
    attention = torch.zeros((len(seqs), width), dtype=torch.long)
    labels = torch.full((len(seqs), width), -100)
    for i, seq in enumerate(seqs):
        input_ids[i, :len(seq)] = torch.tensor(seq)
        attention[i, :len(seq)] = 1
        labels[i, len(head):len(seq)] = torch.tensor(seq[len(head):])
    return {"pixel_values": pixel_values(model, processor, images), "input_ids": input_ids,
            "attention_mask": attention, "labels": labels}


def calibration_batches(model, processor, pairs: Sequence[Pair], prompt: str, n: int = 50, batch_size: int = 10,
                        max_length: int = 40, seed: int = 0) -> list[dict]:
    """Teacher-forced caption_batch()es of n seeded train pairs (first reference each): the merge's masks keep
    every real position (prompt and caption) of the text decoder and drop the padding."""
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    chosen = [pairs[i] for i in order[:n]]
    chunks = [chosen[i:i + batch_size] for i in range(0, len(chosen), batch_size)]
    return [caption_batch(model, processor, [p[0] for p in chunk], prompt, [_references(p)[0] for p in chunk],
                          max_length) for chunk in chunks]


# ---------------------------------------------------------------- LoRA training


def _training_batches(model, processor, pairs: Sequence[Pair], prompt: str, config: BlipHubConfig):
    """Endless seeded epochs of caption_batch()es; each visit of a pair draws one of its references."""
    rng, order = random.Random(config.seed), list(range(len(pairs)))
    size = min(config.train_batch_size, len(order))
    while True:
        rng.shuffle(order)
        for start in range(0, len(order) - size + 1, size):
            chunk = [pairs[i] for i in order[start:start + size]]
            yield caption_batch(model, processor, [p[0] for p in chunk], prompt,
                                [rng.choice(_references(p)) for p in chunk], config.max_length)


def train_style_lora(model, processor, style: str, pairs: Sequence[Pair], out_dir, config: BlipHubConfig) -> dict:
    """Train the LoRA of `style` on (image, caption) pairs and save it as a PEFT folder with recipe.json.

    An adapter already in out_dir is reused ("trained": False). The model is unwrapped afterwards: its base
    weights and modules are as before."""
    from peft import LoraConfig, get_peft_model

    out_dir = Path(out_dir)
    if (out_dir / "adapter_config.json").is_file():
        recipe_file = out_dir / "recipe.json"
        return {**(json.loads(recipe_file.read_text()) if recipe_file.is_file() else {}), "trained": False}
    lora = LoraConfig(r=config.rank, lora_alpha=config.lora_alpha, target_modules=config.target_modules,
                      lora_dropout=0.0, bias="none")
    torch.manual_seed(config.seed)  # the LoRA A init
    peft_model = get_peft_model(model, lora)
    start = time.perf_counter()
    try:
        batches = _training_batches(model, processor, pairs, config.prompt(style), config)
        losses = fit(peft_model, batches, config.training(), desc=f"train {style}")
        peft_model.peft_config["default"].base_model_name_or_path = config.model
        peft_model.save_pretrained(str(out_dir))
    finally:
        peft_model.unload()  # takes the LoRA layers out without merging them
    (out_dir / "README.md").unlink(missing_ok=True)
    tail = losses[-10:]
    recipe = {"base_model": config.model, "style": style, "prompt": config.prompt(style), "rank": config.rank,
              "lora_alpha": config.lora_alpha, "target_modules": config.target_modules, "steps": config.train_steps,
              "lr": config.lr, "batch_size": config.train_batch_size, "train_pairs": len(pairs), "seed": config.seed,
              "train_time_s": round(time.perf_counter() - start, 2), "first_loss": losses[0],
              "final_loss": sum(tail) / len(tail)}
    (out_dir / "recipe.json").write_text(json.dumps(recipe, indent=2) + "\n")
    return {**recipe, "trained": True}


# ---------------------------------------------------------------- metrics


@torch.no_grad()
def generate_captions(model, processor, images, prompt: str, max_new_tokens: int = 30, num_beams: int = 1,
                      batch_size: int = 32) -> list[str]:
    """The caption written after `prompt` for each image (the prompt itself left out)."""
    text = model.config.text_config
    head = [text.bos_token_id] + _text_ids(processor, prompt)
    out = []
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        ids = torch.tensor([head + [text.sep_token_id]] * len(chunk), device=model.device)
        generated = model.generate(pixel_values=pixel_values(model, processor, chunk).to(model.device),
                                   input_ids=ids, max_new_tokens=max_new_tokens, num_beams=num_beams)
        out += processor.tokenizer.batch_decode(generated[:, len(head):], skip_special_tokens=True)
    return [c.strip() for c in out]


def evaluate_style(model, processor, style: str, pairs: Sequence[Pair], config: BlipHubConfig,
                   judge: Judge | None = None) -> dict:
    """Caption the test pairs with the style's prompt: {"style_accuracy", "bleu4", "samples": first 3 captions}."""
    was_training = model.training
    model.eval()
    captions = generate_captions(model, processor, [p[0] for p in pairs], config.prompt(style), config.max_new_tokens,
                                 config.num_beams, config.eval_batch_size)
    model.train(was_training)
    judged = judge(captions) if judge else [lexicon_style(c) for c in captions]
    return {"style_accuracy": sum(j == style for j in judged) / len(captions),
            "bleu4": bleu(captions, [_references(p) for p in pairs]), "samples": captions[:3]}


# ---------------------------------------------------------------- the run


def _row(label: str, method: str, scores: dict, own: dict) -> dict:
    """harness.score_row on style accuracy, plus BLEU-4 per style, its mean and its normalized form."""
    row = harness.score_row(label, method, {s: v["style_accuracy"] for s, v in scores.items()}, own["style"])
    row["bleu4"] = {s: v["bleu4"] for s, v in scores.items()}
    row["mean_bleu4"] = sum(row["bleu4"].values()) / len(scores)
    row["normalized_bleu4"] = harness.normalized(row["bleu4"], own["bleu4"])
    row["samples"] = {s: v["samples"] for s, v in scores.items()}
    return row


@dataclass
class BlipTrack(harness.Track):
    """BLIP and its style LoRAs on the harness: style accuracy and BLEU-4 per style on the test pairs."""

    model: torch.nn.Module
    processor: object
    data: dict  # style -> (train pairs, test pairs)
    adapters: dict
    config: BlipHubConfig
    judge: Judge | None = None
    name: str = "blip"

    @property
    def merge_options(self) -> dict:
        return {"seed": self.config.seed}

    def evaluate(self, split: str, limit: int | None, tasks=None, label: str = "") -> dict:
        return {s: evaluate_style(self.model, self.processor, s, test, self.config, self.judge)
                for s, (_, test) in self.data.items() if not tasks or s in tasks}

    def calibration(self, samples: int, batch_size: int) -> list[list]:
        c = self.config
        return [calibration_batches(self.model, self.processor, self.data[s][0], c.prompt(s), samples, batch_size,
                                    c.max_length, c.seed) for s in c.styles]

    def score(self, label: str, method: str, metrics: dict, refs: harness.References) -> dict:
        own = {key: {s: m[field] for s, m in refs.own().items()}
               for key, field in (("style", "style_accuracy"), ("bleu4", "bleu4"))}
        return _row(label, method, metrics, own)

    def validation(self, row: dict) -> tuple[tuple, dict]:
        return (row["mean_normalized"],), {"val_mean_normalized": row["mean_normalized"]}


def _style_columns(rows: list[dict]) -> list:
    """Style accuracy and BLEU-4 per style, the means, normalized style accuracy, samples, time."""
    styles = list(rows[0]["accuracy"])
    return [("method", lambda r: r["label"]),
            *((f"{s} {m}", lambda r, s=s, k=k: f"{r[k][s]:.3f}") for s in styles
              for m, k in (("style", "accuracy"), ("BLEU-4", "bleu4"))),
            ("mean style", lambda r: f"{r['mean_accuracy']:.3f}"), ("mean BLEU-4", lambda r: f"{r['mean_bleu4']:.3f}"),
            ("mean norm.", lambda r: f"{r['mean_normalized']:.3f}"), *harness.run_columns("style", memory=False)]


markdown_table = partial(harness.markdown_table, columns=_style_columns)


def style_data(config: BlipHubConfig, loader: CaptionLoader | None = None) -> dict[str, tuple[Sequence, Sequence]]:
    """{style: (train pairs, test pairs)}: the first max_train / n_test (None: all) of what the loader gives."""
    loader = loader or caption_loader(config.dataset, config.styles, config.seed)
    data = {}
    for style in config.styles:
        train, test = loader(style, "train"), loader(style, "test")
        if not len(train) or not len(test):
            raise ValueError(f"style {style!r}: the loader gave {len(train)} train and {len(test)} test pairs")
        data[style] = (train[:config.max_train], test[:config.n_test])
    return data


def run_blip_hub(config: BlipHubConfig, out_dir, methods: Sequence[str] = DEFAULT_METHODS,
                 loader: CaptionLoader | None = None, judge: Judge | None = None, progress: bool = True) -> dict:
    """Load config.model, train the style LoRAs missing under out_dir/adapters/<style>, merge them with every
    method, caption every style's test images with base, each LoRA and each merge; write out_dir/blip_results.json
    and blip_results.md. Returns the report; its "results" rows hold per-style style accuracy ("accuracy"),
    normalized style accuracy, BLEU-4, sample captions, merge seconds and peak memory (MB)."""
    start, out_dir = time.perf_counter(), Path(out_dir)
    model, processor = load_blip(config.model, config.dtype, config.device)
    data = style_data(config, loader)
    loaded = time.perf_counter()
    recipes = {s: train_style_lora(model, processor, s, train, out_dir / "adapters" / s, config)
               for s, (train, _) in data.items()}
    trained = time.perf_counter()
    track = BlipTrack(model, processor, data, {s: load_adapter(out_dir / "adapters" / s) for s in config.styles},
                      config, judge)
    rows = harness.run_methods(track, config.profile(), methods, iteris=config.iteris(), progress=progress)
    report = {"model": config.model, "config": asdict(config), "environment": harness.environment(),
              "style_metric": "judge" if judge else "word lists", "style_words": STYLE_WORDS,
              "adapters": recipes, "results": rows,
              "data": {s: {"train": len(tr), "test": len(te)} for s, (tr, te) in data.items()},
              "timings": {"load_s": loaded - start, "train_s": trained - loaded,
                          "total_s": time.perf_counter() - start}}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "blip_results.json").write_text(json.dumps(report, indent=2))
    (out_dir / "blip_results.md").write_text(markdown_table(rows) + "\n")
    return report
