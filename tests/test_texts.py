"""merge_loras with texts in (issue 20.2), its keyword checks, and a model that already carries PEFT layers (18)."""
import copy
import random
import warnings

import pytest
import torch

import iteris_lab
from iteris_lab import AdapterError, CalibrationError, IterisError
from iteris_lab.io.calibration import tokenize
from tiny import WORDS, save_tokenizer


@pytest.fixture
def llama_texts(tiny_case, tmp_path):
    """A tiny llama merge case with its tokenizer and two tasks of word texts of different lengths."""
    from transformers import AutoTokenizer

    save_tokenizer(tmp_path / "tok")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "tok")
    rng = random.Random(0)
    texts = [[" ".join(rng.choices(WORDS, k=rng.randint(2, 9))) for _ in range(5)] for _ in range(2)]
    return tiny_case("llama"), tokenizer, texts


def test_texts_merge_exactly_as_the_batches_tokenize_makes_of_them(llama_texts):
    case, tokenizer, texts = llama_texts
    by_texts = iteris_lab.merge_loras(case.model, case.adapters, texts, tokenizer=tokenizer, schedule="jacobi",
                                      max_iter=2,
                                      batch_size=2, max_length=6, progress=False)
    records = [[{"text": t, "target": None} for t in task] for task in texts]
    batches = [tokenize(tokenizer, r, batch_size=2, max_length=6) for r in records]
    assert max(b["input_ids"].shape[1] for task in batches for b in task) == 6  # max_length truncated something
    by_batches = iteris_lab.merge_loras(case.model, case.adapters, batches, schedule="jacobi", max_iter=2,
                                        progress=False)
    assert all(torch.equal(by_texts.deltas[n], by_batches.deltas[n]) for n in by_batches.deltas)
    assert by_texts.settings["max_length"] == 6 and by_texts.settings["batch_size"] == 2
    assert by_texts.settings["calibration_texts"] == [5, 5]
    # a different max_length changes what the merge sees: the setting takes effect
    longer = iteris_lab.merge_loras(case.model, case.adapters, texts, tokenizer=tokenizer, schedule="jacobi",
                                    max_iter=2,
                                    batch_size=2, max_length=12, progress=False)
    assert any(not torch.allclose(longer.deltas[n], by_texts.deltas[n]) for n in longer.deltas)


def test_text_records_with_targets_are_accepted_like_strings(llama_texts):
    case, tokenizer, texts = llama_texts
    records = [[{"text": t, "target": None} for t in task] for task in texts]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the default max_length fits the tiny model's 64 positions without a word
        a = iteris_lab.merge_loras(case.model, case.adapters, records, tokenizer=tokenizer, method="regmean",
                                   progress=False)
    b = iteris_lab.merge_loras(case.model, case.adapters, texts, tokenizer=tokenizer, method="regmean",
                               progress=False)
    assert all(torch.equal(a.deltas[n], b.deltas[n]) for n in a.deltas)


def test_max_length_beyond_the_models_positions_is_clamped_with_a_warning(llama_texts):
    case, tokenizer, texts = llama_texts
    positions = case.model.config.max_position_embeddings
    with pytest.warns(UserWarning, match=f"exceeds the model's {positions} learned positions"):
        iteris_lab.merge_loras(case.model, case.adapters, texts, tokenizer=tokenizer, method="regmean",
                               max_length=positions + 1, progress=False)


def test_the_users_tokenizer_keeps_its_missing_pad_token(llama_texts):
    case, tokenizer, texts = llama_texts
    tokenizer.pad_token = None
    iteris_lab.merge_loras(case.model, case.adapters, texts, tokenizer=tokenizer, method="regmean", progress=False)
    assert tokenizer.pad_token is None


@pytest.mark.parametrize("calibration, tokenizer, match", [
    ("texts", None, "needs the base model's tokenizer: pass tokenizer="),
    ("one string", "tok", "task 0: the calibration is one string"),
    ("mixed", "tok", "tasks 0 give texts but tasks 1 give batches"),
    ("bad record", "tok", r"task 1, text 0: a text record is .* \(unknown: label\)"),
])
def test_bad_text_calibration_is_refused_before_anything_runs(llama_texts, calibration, tokenizer, match):
    case, tok, texts = llama_texts
    given = {"texts": texts, "one string": ["w3 w4", texts[1]], "mixed": [texts[0], case.calibration[1]],
             "bad record": [texts[0], [{"text": "w3", "label": "x"}]]}[calibration]
    with pytest.raises(CalibrationError, match=match):
        iteris_lab.merge_loras(case.model, case.adapters, given, tokenizer=tok if tokenizer else None,
                               progress=False)


@pytest.mark.parametrize("keyword, match", [
    ("alpah", "unknown setting 'alpah'; did you mean 'alpha'?"),
    ("tokeniser", "unknown setting 'tokeniser'; did you mean 'tokenizer'?"),
    ("max_lenght", "did you mean 'max_length'?"),
    ("zzz", r"unknown setting 'zzz'; valid settings: method, schedule"),
])
def test_an_unknown_keyword_names_the_closest_valid_one(tiny_case, keyword, match):
    case = tiny_case("mlp")
    with pytest.raises(IterisError, match=match):
        iteris_lab.merge_loras(case.model, case.adapters, case.calibration, progress=False, **{keyword: 1})


@pytest.mark.parametrize("choices, match", [({"max_length": 0}, "max_length must be a whole number >= 1"),
                                            ({"batch_size": 2.5}, "batch_size must be"),
                                            ({"chat_template": "yes"}, "chat_template must be True or False")])
def test_text_settings_are_checked(choices, match):
    with pytest.raises(IterisError, match=match):
        iteris_lab.MergeSettings(**choices)


# ---------------------------------------------------------------- a model that already carries PEFT layers (18)


def test_a_peft_model_is_refused_with_the_fix(tiny_case):
    from peft import PeftModel

    case = tiny_case("llama")
    wrapped = PeftModel.from_pretrained(copy.deepcopy(case.model), case.adapters[0])
    with pytest.raises(AdapterError, match=r"already carries a PEFT adapter \(a PeftModel; .* model.unload\(\)"):
        iteris_lab.merge_loras(wrapped, case.adapters, case.calibration, progress=False)
    wrapped.merge_adapter()
    with pytest.raises(AdapterError, match=r"unmerge_adapter\(\) first"):
        iteris_lab.merge_loras(wrapped, case.adapters, case.calibration, progress=False)


def test_lora_layers_on_modules_the_merge_does_not_touch_are_refused(tiny_case):
    """Before: a LoRA injected on k_proj shifted every feature of a q_proj/v_proj merge without a word."""
    from peft import LoraConfig, inject_adapter_in_model

    case = tiny_case("llama", targets=["q_proj", "v_proj"])
    model = inject_adapter_in_model(LoraConfig(target_modules=["k_proj"]), copy.deepcopy(case.model))
    match = r"already carries a PEFT adapter \(2 LoRA modules, .*k_proj\).*freshly loaded base"
    with pytest.raises(AdapterError, match=match):
        iteris_lab.merge_loras(model, case.adapters, case.calibration, progress=False)
