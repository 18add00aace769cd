"""The VLM track on a tiny random Llama + tiny SigLIP: assembly, shipped-weights round trip, caption metrics, and
the calibration path of a merge (the text-only mask must keep image rows out of the Grams)."""
import copy
import math

import pytest
import torch

from iteris_lab.features import gram_pass
from iteris_lab.targets import Target
from iteris_lab.tracks.vlm import benchmark as vlm_bench, captions, vlm

TINY_VISION = dict(image_size=32, patch_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                   num_attention_heads=2, num_channels=3, vision_use_head=False)


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"[UNK]", "user", "assistant", "describe", "Describe", "the", "image", "in", "a", "an", "style", "."}
    for style in captions.STYLES.values():
        words |= set(style.adjectives) | set(captions.words(style.prompt))
    for template in captions.PLAIN_TEMPLATES + captions.STYLE_TEMPLATES:
        words |= set(captions.words(template.replace("{", " ").replace("}", " ")))
    words |= set(captions.DIGIT_WORDS) | {",", "positive", "negative"}
    vocab = {w: i for i, w in enumerate(["<|endoftext|>", "<|im_start|>", "<|im_end|>", *sorted(words)])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="<|im_end|>",
                                  eos_token="<|im_end|>")
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]})
    return tok


def tiny_lm(vocab: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tiny():
    tok = tiny_tokenizer()
    lm = tiny_lm(len(tok))
    model, tok = vlm.build_vlm(copy.deepcopy(lm), tok, TINY_VISION, seed=0)
    return lm, model, tok


def images(n, seed=0):
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_text_only_logits_equal_the_language_model(tiny):
    lm, model, tok = tiny
    ids = torch.tensor([tok("<|im_start|>user\nDescribe the image .<|im_end|>", add_special_tokens=False)["input_ids"]])
    assert model.config.image_token_id not in ids
    with torch.no_grad():
        expected = lm(input_ids=ids).logits
        got = model(input_ids=ids).logits[..., :expected.shape[-1]]
    assert torch.equal(expected, got)
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def test_image_tokens_change_the_output(tiny):
    _, model, tok = tiny
    batch = vlm.caption_batch(model, tok, images(2), [captions.PLAIN_PROMPT] * 2, ["a handwritten digit one"] * 2)
    assert (batch["input_ids"] == model.config.image_token_id).sum(1).tolist() == [16, 16]
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"]).logits[:, -1]
    assert not torch.allclose(logits[0], logits[1])
    assert vlm.caption_loss(model, batch).item() > 0


def test_vision_weights_round_trip(tiny, tmp_path):
    from safetensors.torch import load_file

    lm, model, tok = tiny
    vlm.save_vision(model, tmp_path, {"note": "test"})
    other, _ = vlm.build_vlm(copy.deepcopy(lm), tok, TINY_VISION, seed=1)
    batch = vlm.caption_batch(model, tok, images(2), [captions.PLAIN_PROMPT] * 2, ["a digit one"] * 2)
    kwargs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    with torch.no_grad():
        before = other(**kwargs).logits
        vlm.load_vision_state(other, load_file(str(tmp_path / vlm.VISION_FILE)))
        assert not torch.equal(before, other(**kwargs).logits)
        assert torch.equal(model(**kwargs).logits, other(**kwargs).logits)
    with pytest.raises(ValueError, match="do not fit"):
        vlm.load_vision_state(other, {"model.vision_tower.nope": torch.zeros(1)})


def test_generation_returns_one_caption_per_image(tiny):
    _, model, tok = tiny
    texts = vlm.generate_captions(model, tok, images(3), captions.PLAIN_PROMPT, max_new_tokens=3, batch_size=2)
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)


def test_bleu_known_cases():
    assert captions.bleu(["a handwritten digit seven"], [["a handwritten digit seven"]], smooth=False) == 1.0
    # p1..p4 = 5/6, 3/5, 2/4, 1/3 and equal lengths (no brevity penalty)
    expected = (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25
    assert captions.bleu(["the cat sat on the mat"], [["the cat sat on a mat"]], smooth=False) == pytest.approx(expected)
    # add-one smoothing from n = 2 on: 5/6, 4/6, 3/5, 2/4
    smoothed = (5 / 6 * 4 / 6 * 3 / 5 * 2 / 4) ** 0.25
    assert captions.bleu(["the cat sat on the mat"], [["the cat sat on a mat"]]) == pytest.approx(smoothed)
    # every n-gram matches but the candidate is shorter: BP = exp(1 - 6 / 5)
    assert captions.bleu(["a b c d e"], [["a b c d e f"]], smooth=False) == pytest.approx(math.exp(1 - 6 / 5))
    # no 4-gram in common: 0 unsmoothed, > 0 smoothed; no word in common: 0 either way
    assert captions.bleu(["a b c x d"], [["a b c y d"]], smooth=False) == 0.0
    assert captions.bleu(["a b c x d"], [["a b c y d"]]) > 0.0
    assert captions.bleu(["one two three"], [["four five six seven"]]) == 0.0
    with pytest.raises(ValueError):
        captions.bleu(["x"], [])


def test_content_and_style_parsing():
    assert captions.content_correct("a lovely digit seven", 7)
    assert not captions.content_correct("a seven or a one", 7)
    assert not captions.content_correct("a handwritten digit", 7)
    assert captions.mentioned_digits("the number 3, a three") == {3}
    assert captions.lexicon_style("a lovely and neat seven") == "positive"
    assert captions.lexicon_style("an ugly, lovely seven") == "mixed"
    assert captions.lexicon_style("a handwritten seven") == "none"
    for style in captions.STYLES:
        texts = captions.captions_for(range(10), style, seed=3)
        assert all(captions.lexicon_style(t) == style for t in texts)
        assert all(captions.content_correct(t, y) for t, y in zip(texts, range(10)))


def _style_lora(model, out, seed):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, lora_alpha=4, target_modules=vlm.LM_QKV_REGEX,
                                                                 init_lora_weights=False))
    peft_model.save_pretrained(str(out))
    return str(out)


def test_text_only_mask_drops_image_rows_from_the_grams(tiny, tmp_path):
    _, model, tok = tiny
    adapters = {s: _style_lora(model, tmp_path / s, i) for i, s in enumerate(vlm_bench.STYLE_NAMES)}
    from safetensors.torch import load_file
    keys = load_file(str(tmp_path / "positive" / "adapter_model.safetensors"))
    assert keys and all("language_model" in k for k in keys)  # the regex keeps LoRA off SigLIP's q/k/v
    track = vlm_bench.VlmTrack(model, tok, adapters, captions.digit_splits(), judge=None)
    text = vlm_bench.calibration_batches(track, "positive", n=6, batch_size=4, mask="text")
    full = vlm_bench.calibration_batches(track, "positive", n=6, batch_size=4, mask="all")
    modules = dict(model.named_modules())
    targets = {n: Target(n, modules[n]) for n in modules if n.endswith("language_model.layers.0.self_attn.q_proj")}
    rows = {m: gram_pass(model, targets, b, forward=vlm.calibration_forward).rows for m, b in
            (("text", text), ("all", full))}
    real = sum(int(b["attention_mask"].sum()) for b in full)
    assert list(rows["all"].values()) == [real]
    assert list(rows["text"].values()) == [real - 6 * 16]
    merged = {m: vlm_bench.merge(track, [b, b], method="iteris", schedule="jacobi", max_iter=2) for m, b in (("text",
                                 text), ("all", full))}
    name = next(iter(merged["text"].deltas))
    assert len(merged["text"].history) == 2
    assert not torch.allclose(merged["text"].deltas[name], merged["all"].deltas[name])


def test_per_caption_losses_do_not_depend_on_the_batch(tiny):
    _, model, tok = tiny
    texts = ["a handwritten digit one", "a lovely and neat digit seven , so tidy"]  # unequal lengths: padding
    batch = vlm.caption_batch(model, tok, images(2), [captions.PLAIN_PROMPT] * 2, texts)
    with torch.no_grad():
        total, count = vlm.caption_token_losses(model, batch)
        assert float(total.sum() / count.sum()) == pytest.approx(vlm.caption_loss(model, batch).item(), rel=1e-5)
        for i in range(2):
            alone = vlm.caption_batch(model, tok, images(2)[i:i + 1], [captions.PLAIN_PROMPT], texts[i:i + 1])
            assert count[i] == int((alone["labels"][:, 1:] != -100).sum())
            assert float(total[i] / count[i]) == pytest.approx(vlm.caption_loss(model, alone).item(), rel=1e-4)


def test_evaluate_returns_per_example_outcomes_that_average_to_the_metrics(tiny):
    _, model, tok = tiny
    track = vlm_bench.VlmTrack(model, tok, {}, captions.digit_splits(), judge=None)
    out = vlm_bench.evaluate_styles(track, "test", limit=3)
    for style in vlm_bench.STYLE_NAMES:
        metrics, per = out[style], out[style]["per_example"]
        assert set(per) == {"content", "lexicon", "bleu", "nll"} and all(len(v) == 3 for v in per.values())
        for m in ("content", "lexicon"):
            assert set(per[m]) <= {0.0, 1.0} and sum(per[m]) / 3 == pytest.approx(metrics[m])
        # the aggregate NLL weights captions by their token counts, the per-example one does not: both from one pass
        assert min(per["nll"]) <= metrics["nll"] <= max(per["nll"])
        assert vlm_bench.caption_nll(track, style, "test", 3) == pytest.approx(metrics["nll"])
    texts = ["a lovely digit seven", "an ugly digit one", "a digit"]
    outcomes = vlm_bench.caption_outcomes(texts, [7, 2, 3], "positive")
    assert outcomes["content"] == [1.0, 0.0, 0.0] and outcomes["lexicon"] == [1.0, 0.0, 0.0]
    refs = captions.references([7, 2, 3], "positive")
    assert outcomes["bleu"] == [captions.bleu([t], [r]) for t, r in zip(texts, refs)]
