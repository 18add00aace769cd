"""tracks/llm/evaluate.py on tiny random models: every kind of task scores what a brute-force, unpadded reference scores."""
import string

import pytest
import torch

from iteris_lab.tracks.llm import evaluate
from iteris_lab.tracks.llm.tasks import LM_TEMPLATE, Example, Task
from tiny import build_tiny

CHARS = string.ascii_letters + string.digits + " .,:+?!'-_@#\n"


@pytest.fixture(scope="module")
def char_tokenizer():
    """A character-level fast tokenizer whose ids (< 80) fit the tiny models' vocabulary of 100; pad 0, eos 2."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "<s>": 1, "</s>": 2, "[UNK]": 3, **{c: i + 4 for i, c in enumerate(CHARS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), "isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", eos_token="</s>",
                                   bos_token="<s>", unk_token="[UNK]", padding_side="right")


def _examples(texts, labels, names):
    return tuple(Example(text=t, answer=names[y], label=y) for t, y in zip(texts, labels))


TEXTS = ["good day", "bad news!", "meh", "flight late again", "new phone", "x", "great show at the fest", "ok"]
LABELS = [2, 0, 1, 0, 1, 1, 2, 1]


def _task(kind, labels=("neg", "neu", "pos")):
    ex = _examples(TEXTS, LABELS, labels)
    template = "{text}" if kind == "sequence_classification" else LM_TEMPLATE
    return Task("toy", kind, labels, ex, ex[:3], ex, instruction="Say it.", prompt_template=template)


def test_sequence_classification_with_a_head_that_always_says_one_label(char_tokenizer):
    model = build_tiny("bert")
    task = _task("sequence_classification")
    for forced in range(3):
        head = {"classifier.weight": torch.zeros(3, 32), "classifier.bias": torch.eye(3)[forced] * 10}
        acc = evaluate.evaluate_task(model, char_tokenizer, task, head=head, batch_size=3)
        assert acc == pytest.approx(LABELS.count(forced) / len(LABELS))


def test_head_is_saved_loaded_and_resized(char_tokenizer, tmp_path):
    from safetensors.torch import save_file

    model = build_tiny("bert")
    head = {"classifier.weight": torch.randn(5, 32), "classifier.bias": torch.randn(5),
            "bert.pooler.dense.bias": torch.randn(32)}
    save_file(head, str(tmp_path / evaluate.HEAD_FILE))
    loaded = evaluate.load_head(tmp_path)
    evaluate.apply_head(model, loaded)
    assert model.classifier.out_features == 5 and model.config.num_labels == 5
    assert torch.equal(model.bert.pooler.dense.bias, head["bert.pooler.dense.bias"])
    with pytest.raises(KeyError, match="no parameter"):
        evaluate.apply_head(model, {"nope.weight": torch.zeros(1)})
    with pytest.raises(FileNotFoundError):
        evaluate.load_head(tmp_path / "missing")


def test_head_goes_through_a_peft_model(char_tokenizer):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(build_tiny("bert"), LoraConfig(r=2, target_modules=["query", "value"]))
    head = {"classifier.weight": torch.zeros(3, 32), "classifier.bias": torch.tensor([0.0, 0.0, 5.0])}
    acc = evaluate.evaluate_task(model, char_tokenizer, _task("sequence_classification"), head=head)
    assert acc == pytest.approx(LABELS.count(2) / len(LABELS))


def _reference_label_scores(model, tokenizer, prompts, words):
    """log p(word | prompt) by one unpadded forward per (prompt, word)."""
    out = torch.zeros(len(prompts), len(words))
    for i, prompt in enumerate(prompts):
        p = tokenizer(prompt)["input_ids"]
        for j, word in enumerate(words):
            w = tokenizer(word, add_special_tokens=False)["input_ids"]
            logp = model(input_ids=torch.tensor([p + w])).logits[0].log_softmax(-1)
            out[i, j] = sum(logp[len(p) - 1 + t, tok] for t, tok in enumerate(w))
    return out


@pytest.mark.parametrize("words", [("a", "b", "c"), (" neg", " neu", " pos")], ids=["one-token", "multi-token"])
def test_label_word_scores_match_unpadded_reference(char_tokenizer, words):
    model = build_tiny("llama")
    task = _task("label_words")
    prompts = [task.prompt(ex) for ex in task.test]  # different lengths: padding is exercised
    with torch.no_grad():
        got = evaluate._label_word_scores(model, char_tokenizer, prompts, words, max_length=64)
        ref = _reference_label_scores(model, char_tokenizer, prompts, words)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_label_words_accuracy_is_the_argmax_of_the_reference(char_tokenizer):
    model = build_tiny("llama")
    task = _task("label_words")
    with torch.no_grad():
        ref = _reference_label_scores(model, char_tokenizer, [task.prompt(e) for e in task.test], task.label_words)
    expected = (ref.argmax(-1) == torch.tensor(LABELS)).float().mean().item()
    assert evaluate.evaluate_task(model, char_tokenizer, task, batch_size=3) == pytest.approx(expected)


def _greedy_reference(model, tokenizer, prompt, max_new_tokens):
    ids = tokenizer(prompt)["input_ids"]
    new = []
    for _ in range(max_new_tokens):
        nxt = int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
        if nxt == tokenizer.eos_token_id:
            break
        new.append(nxt)
    return tokenizer.decode(new, skip_special_tokens=True).strip().split("\n")[0].strip()


def test_generation_matches_unpadded_greedy_decoding(char_tokenizer):
    model = build_tiny("llama")
    model.generation_config.eos_token_id = char_tokenizer.eos_token_id
    base = _task("label_words")
    with torch.no_grad():
        answers = [_greedy_reference(model, char_tokenizer, base.prompt(ex), 4) for ex in base.test]
    # make half of the examples right by construction
    examples = tuple(Example(ex.text, answers[i] if i % 2 == 0 else "never") for i, ex in enumerate(base.test))
    task = Task("gen", "generation", (), examples, examples, examples, "Say it.", LM_TEMPLATE, max_new_tokens=4)
    with torch.no_grad():
        preds = evaluate.predict(model, char_tokenizer, task, examples)
    assert preds == answers
    assert evaluate.evaluate_task(model, char_tokenizer, task, batch_size=3) == pytest.approx(0.5)


def test_peft_lm_mode_restored_and_progress_silent(char_tokenizer, capsys, monkeypatch):
    from peft import LoraConfig, get_peft_model

    monkeypatch.setenv("TQDM_DISABLE", "1")
    model = get_peft_model(build_tiny("llama"), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    model.train()
    task = _task("label_words")
    scores = evaluate.evaluate_tasks(model, char_tokenizer, {"a": task, "b": task}, limit=4)
    assert set(scores) == {"a", "b"} and all(0.0 <= s <= 1.0 for s in scores.values())
    assert model.training
    assert capsys.readouterr().err == ""


def test_empty_split_is_an_error(char_tokenizer):
    task = _task("label_words")
    with pytest.raises(ValueError, match="no test examples"):
        evaluate.evaluate_task(build_tiny("llama"), char_tokenizer, task, limit=0)


def test_outcomes_are_per_example_in_test_set_order_although_batches_run_sorted_by_length(char_tokenizer):
    model = build_tiny("bert")
    task = _task("sequence_classification")
    head = {"classifier.weight": torch.zeros(3, 32), "classifier.bias": torch.eye(3)[1] * 10}  # always "neu"
    outcomes = evaluate.task_outcomes(model, char_tokenizer, task, head=head, batch_size=3)
    assert outcomes == [int(y == 1) for y in LABELS]  # TEXTS' lengths are not sorted: a sorted order would differ
    assert evaluate.evaluate_task(model, char_tokenizer, task, batch_size=3) == sum(outcomes) / len(outcomes)
    both = evaluate.evaluate_tasks(model, char_tokenizer, {"toy": task}, outcomes=True, limit=5)
    assert both == {"toy": outcomes[:5]}
