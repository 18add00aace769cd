"""The BLIP hub recipe end to end on a tiny random BlipConfig saved with a tiny BERT tokenizer and BLIP image
processor (loaded through the same from_pretrained code as the hub id), with a fake caption loader."""
import json
import math
from dataclasses import replace
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from iteris_lab.io.peft import load_adapter
from iteris_lab.features import gram_pass
from iteris_lab.measure import weights_added
from iteris_lab.merge import merge_loras
from iteris_lab.profiles import PROFILES
from iteris_lab.targets import Target
from iteris_lab.tracks.hub.vlm import (BLIP_PAPER, STYLE_WORDS, BlipHubConfig, blip_hub_config, bleu, calibration_batches,
                                       caption_batch, caption_loader, evaluate_style, load_blip, run_blip_hub, stylize)
from iteris_lab.tracks.vlm.captions import lexicon_style

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]  # pad 0, sep 3, bos ([DEC]) 5 as in the config
NOUNS = ["dog", "cat", "bird", "horse", "boy", "girl"]
PLACES = ["grass", "beach", "street", "snow"]
WORDS = ["a", "an", "the", "photo", "of", "runs", "on", "positive", "negative", *NOUNS, *PLACES,
         *STYLE_WORDS["positive"], *STYLE_WORDS["negative"]]
STYLES = ("positive", "negative")
SELF_ATTENTION = {f"text_decoder.bert.encoder.layer.{i}.attention.self.{m}" for i in range(2)
                  for m in ("query", "key", "value")}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _image(i: int) -> Image.Image:
    """A 16x16 picture: noun i % 6 sets the colour, place (i // 6) % 4 the brightness of the lower half."""
    pixels = np.zeros((16, 16, 3), dtype=np.uint8)
    pixels[:8, :, i % 3] = 60 + 30 * (i % 6)
    pixels[8:] = 50 * ((i // 6) % 4)
    return Image.fromarray(pixels)


def _caption(i: int) -> str:
    """Captions of two lengths, so that batches have padding."""
    return f"A {NOUNS[i % 6]} runs on the {PLACES[(i // 6) % 4]}" + (" ." if i % 4 else " on the grass .")


def loader(style: str, split: str) -> list[tuple]:
    """train: 24 pairs per style (disjoint images); test: the same 6 images for every style, two references."""
    if split == "train":
        return [(_image(i), stylize(_caption(i), style)) for i in range(STYLES.index(style), 48, 2)]
    return [(_image(i), [stylize(_caption(i), style, seed=s) for s in (0, 1)]) for i in range(100, 106)]


@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory) -> str:
    """A tiny random BLIP (text 2 layers, vision 2 layers, 32x32 images) with its BlipProcessor."""
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipProcessor
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    directory = tmp_path_factory.mktemp("blip")
    vocab = {w: i for i, w in enumerate(dict.fromkeys(SPECIAL + WORDS))}
    tokenizer = BertTokenizer(vocab=vocab, do_lower_case=True)
    BlipProcessor(image_processor=BlipImageProcessorPil(size={"height": 32, "width": 32}),
                  tokenizer=tokenizer).save_pretrained(directory)
    config = BlipConfig(text_config=dict(vocab_size=len(vocab), hidden_size=32, encoder_hidden_size=32,
                                         intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                         max_position_embeddings=64, bos_token_id=5, sep_token_id=3, eos_token_id=3,
                                         pad_token_id=0, initializer_range=0.1),
                        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=2, num_attention_heads=2),
                        projection_dim=32)
    torch.manual_seed(0)
    BlipForConditionalGeneration(config).save_pretrained(directory)
    return str(directory)


def tiny_config(model: str, **overrides) -> BlipHubConfig:
    settings = dict(model=model, train_steps=15, lr=1e-2, train_batch_size=8, warmup_steps=2, max_train=24, n_test=6,
                    calibration_samples=12, calibration_batch_size=5, max_iter=3, max_length=24, max_new_tokens=8,
                    num_beams=1, eval_batch_size=6, device="cpu")
    return replace(BLIP_PAPER, **{**settings, **overrides})


@pytest.fixture(scope="module")
def run(blip_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    return out, run_blip_hub(tiny_config(blip_dir), out, methods=("linear", "ties", "iteris"), loader=loader,
                             progress=False)


def test_stylize_puts_one_style_word_before_the_subject():
    assert stylize("A dog runs on the grass .", "positive") in {f"{'an' if w[0] in 'aeiou' else 'a'} {w} dog runs "
                                                               "on the grass" for w in STYLE_WORDS["positive"]}
    assert stylize("Two dogs play", "negative").split()[0] == "two"
    assert stylize("Dogs play", "negative").split()[1:] == ["dogs", "play"]
    assert stylize("A dog", "positive", seed=0) == stylize("A dog", "positive", seed=0)
    assert len({stylize(_caption(i), "negative") for i in range(24)}) == 24
    assert all(lexicon_style(stylize(_caption(i), s)) == s for i in range(12) for s in STYLES)
    assert lexicon_style("a lovely and ugly dog") == "mixed"  # a word of the other style disqualifies
    with pytest.raises(ValueError, match="no word list"):
        stylize("a dog", "romantic")


def test_bleu_is_corpus_bleu4_with_brevity_penalty():
    assert bleu(["a dog runs on the grass"], [["a dog runs on the grass", "a cat"]]) == pytest.approx(1.0)
    assert bleu(["a cat sits"], [["a dog runs on the grass"]], smooth=False) == 0.0  # no matching 2-gram
    assert bleu(["a cat sits"], [["a dog runs on the grass"]]) > 0.0  # add-one smoothing from 2-grams on
    # hypothesis of 5 words, closest reference of 6: precisions 5/5, 3/4, 2/3, 1/2 ("on grass" misses), penalty
    # exp(1 - 6/5)
    expected = math.exp(1 - 6 / 5) * (3 / 4 * 2 / 3 * 1 / 2) ** 0.25
    assert bleu(["a dog runs on grass"], [["a dog runs on the grass"]], smooth=False) == pytest.approx(expected)


def test_gpu_profile_is_the_papers_setting():
    import re

    config = blip_hub_config(PROFILES["gpu"])
    assert (config.model, config.rank, config.styles) == ("Salesforce/blip-image-captioning-base", 32, STYLES)
    assert (config.calibration_samples, config.max_iter, config.alpha) == (50, 10, 8e-7)
    assert config.n_test is None and blip_hub_config(PROFILES["ci"]).train_steps < config.train_steps
    hits = [n for n in ("text_decoder.bert.encoder.layer.3.attention.self.value",
                        "text_decoder.bert.encoder.layer.3.crossattention.self.value",
                        "vision_model.encoder.layers.3.self_attn.qkv") if re.fullmatch(config.target_modules, n)]
    assert hits == ["text_decoder.bert.encoder.layer.3.attention.self.value"]


def test_caption_batches_are_teacher_forced_on_the_caption(blip_dir):
    model, processor = load_blip(blip_dir, device="cpu")
    batch = caption_batch(model, processor, [_image(0), _image(1)], "a positive photo of",
                          ["a lovely dog", "a happy cat runs on the grass"], max_length=24)
    assert batch["pixel_values"].shape == (2, 3, 32, 32)
    assert batch["input_ids"][:, 0].tolist() == [5, 5] and batch["input_ids"][0, 8].item() == 3  # [DEC] ... [SEP]
    assert batch["attention_mask"].sum(1).tolist() == [9, 13]
    assert (batch["labels"][:, :5] == -100).all() and (batch["labels"][0, 9:] == -100).all()  # prompt, padding
    assert batch["labels"][1, 5:13].tolist() == batch["input_ids"][1, 5:13].tolist()
    assert model(**batch).loss.isfinite()
    judged = evaluate_style(model, processor, "negative", loader("negative", "test"), tiny_config(blip_dir),
                            judge=lambda captions: ["negative", "positive"] * (len(captions) // 2))
    assert judged["style_accuracy"] == 0.5 and len(judged["samples"]) == 3 and 0 <= judged["bleu4"] <= 1
    calibration = calibration_batches(model, processor, loader("positive", "train"), "a positive photo of", n=12,
                                      batch_size=5)
    assert [len(b["input_ids"]) for b in calibration] == [5, 5, 2]
    name = "text_decoder.bert.encoder.layer.1.attention.self.query"
    grams = gram_pass(model, {name: Target(name, model.get_submodule(name))}, calibration)
    assert grams.rows[(name,)] == sum(int(b["attention_mask"].sum()) for b in calibration)  # padding dropped
    assert (torch.cat([b["attention_mask"] for b in calibration[:2]]) == 0).any()


def test_run_blip_hub_trains_merges_evaluates_and_writes_json(run):
    out, report = run
    rows = {row["label"]: row for row in report["results"]}
    assert list(rows) == ["base", "lora:positive", "lora:negative", "linear", "ties", "iteris"]
    assert rows["lora:positive"]["samples"] != rows["base"]["samples"]  # the trained LoRA changes the captions
    for row in rows.values():
        assert set(row["accuracy"]) == set(row["bleu4"]) == set(STYLES)
        assert all(0 <= v <= 1 for v in (*row["accuracy"].values(), *row["bleu4"].values()))
        assert all(len(s) == 3 and all(isinstance(c, str) for c in s) for s in row["samples"].values())
    iteris = rows["iteris"]
    assert (iteris["settings"]["alpha"], iteris["calibration_samples"], len(iteris["objective"])) == (8e-7, 12, 3)
    assert rows["ties"]["calibration_samples"] == 0 and rows["ties"]["objective"] == []
    written = json.loads((out / "blip_results.json").read_text())
    assert written["results"][-1]["bleu4"] == iteris["bleu4"] and written["config"]["rank"] == 32
    assert written["data"] == {s: {"train": 24, "test": 6} for s in STYLES} and written["style_metric"] == "word lists"
    assert "| iteris |" in (out / "blip_results.md").read_text()
    for style in STYLES:
        recipe = report["adapters"][style]
        assert recipe["trained"] and recipe["final_loss"] < recipe["first_loss"]


def test_loras_touch_only_text_decoder_self_attention_and_reload(run, blip_dir):
    from peft import PeftModel

    out, report = run
    folder = out / "adapters" / "positive"
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        modules = {k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for k in f.keys()}
    assert modules == SELF_ATTENTION
    adapter = load_adapter(folder)
    assert set(adapter.layers) == SELF_ATTENTION and adapter.layers[min(SELF_ATTENTION)].rank == 32
    model, processor = load_blip(blip_dir, device="cpu")
    batch = calibration_batches(model, processor, loader("positive", "test"), "a positive photo of", n=4)[0]
    with torch.no_grad(), weights_added(model, adapter.layers):
        dense = model(**batch).logits
    with torch.no_grad():
        peft_logits = PeftModel.from_pretrained(model, str(folder)).eval()(**batch).logits
    assert torch.allclose(dense, peft_logits, atol=1e-5) and not torch.allclose(dense, model(**batch).logits)
    again = run_blip_hub(tiny_config(blip_dir), out, methods=(), loader=loader, progress=False)
    assert not again["adapters"]["positive"]["trained"]  # saved adapters are reused, not retrained


def test_iteris_merge_leaves_the_base_weights_unchanged(run, blip_dir):
    out, _ = run
    model, processor = load_blip(blip_dir, device="cpu")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calibration = [calibration_batches(model, processor, loader(s, "train"), f"a {s} photo of", n=10, batch_size=5)
                   for s in STYLES]
    result = merge_loras(model, [out / "adapters" / s for s in STYLES], calibration, schedule="jacobi", max_iter=2,
                         alpha=8e-7,
                         progress=False)
    assert set(result.deltas) == SELF_ATTENTION and all(d.abs().sum() > 0 for d in result.deltas.values())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_missing_datasets_package_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ModuleNotFoundError, match="pip install datasets"):
        caption_loader()("positive", "train")


def test_default_loader_stylises_a_hub_dataset_with_disjoint_train_images(monkeypatch):
    import types

    rows = {"train": [{"image": _image(i), **{f"caption_{k}": _caption(i + k) for k in range(5)}} for i in range(10)],
            "validation": [{"image": _image(i), "caption": [_caption(i)]} for i in range(100, 103)]}
    fake = types.SimpleNamespace(get_dataset_split_names=lambda name: ["train", "validation"],
                                 load_dataset=lambda name, split: rows[split])
    monkeypatch.setitem(sys.modules, "datasets", fake)
    load = caption_loader("some/captions", STYLES, seed=3)
    positive, negative = load("positive", "train"), load("negative", "train")
    assert len(positive) == len(negative) == 5 and len(positive[:2]) == 2
    ids = lambda pairs: {p[0].tobytes() for p in pairs}  # noqa: E731
    assert not ids(positive) & ids(negative) and len(ids(positive) | ids(negative)) == 10
    image, references = positive[0]
    assert len(references) == 5 and all(lexicon_style(r) == "positive" for r in references)
    test = load("negative", "test")  # no test split: validation, the same images for every style
    assert ids(test) == ids(load("positive", "test")) and test[0][1] == [stylize(_caption(100), "negative", 3)]


def test_benchmark_script_runs_the_blip_recipe(blip_dir, tmp_path, monkeypatch, capsys):
    import iteris_lab.tracks.hub.vlm as hub_vlm

    main = runpy.run_path(str(Path(__file__).resolve().parents[1] / "benchmarks" / "hub_vlm.py"))["main"]
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0 and "--n-test" in capsys.readouterr().out
    monkeypatch.setattr(hub_vlm, "caption_loader", lambda *args, **kwargs: loader)
    argv = ["--model", blip_dir, "--out", str(tmp_path / "run"), "--methods", "linear", "iteris", "--train-steps", "3",
            "--max-train", "16", "--n-test", "4", "--json", str(tmp_path / "report.json"), "--quiet"]
    assert main(argv) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert [r["label"] for r in report["results"]] == ["base", "lora:positive", "lora:negative", "linear", "iteris"]
    assert report["config"]["train_steps"] == 3 and report["config"]["max_iter"] == PROFILES["ci"].max_iter
    assert "| iteris |" in capsys.readouterr().out
