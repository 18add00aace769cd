"""The hub recipe end to end on tiny T5 / Llama folders (loaded through the same from_pretrained code as hub ids),
with a tiny GLUE-like dataset injected in place of datasets.load_dataset."""
import json
import runpy
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from iteris_lab.features import gram_pass
from iteris_lab.profiles import PROFILES
from iteris_lab.targets import Target
from iteris_lab.tracks.hub.llm import (HubConfig, calibration_batches, evaluate_hub_task, glue_loader, glue_task,
                                       hub_config, load_model, run_hub, seq2seq_batch, seq2seq_label_scores, train_lora)
from tiny import VOCAB, save_tiny

NOUNS = ["cat", "dog", "bird", "fish", "cow", "fox"]
VERBS = ["runs", "sits", "eats", "sleeps", "jumps"]
ADJ = ["red", "blue", "big", "small"]
SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]  # ids 0, 1, 2 as the tiny configs' pad / bos / eos
ROWS = {"train": 40, "validation": 14}


def _rows(name: str, split: str) -> list[dict]:
    """GLUE-shaped rows: rte (sentence1, sentence2; 0 entailment / 1 not_entailment), cola (sentence; 0/1).
    Texts are unique within a task; every fifth train row of rte has a hidden label (-1)."""
    offset = 0 if split == "train" else 1000
    rows = []
    for i in range(offset, offset + ROWS[split]):
        a, b, c = NOUNS[i % 6], VERBS[(i // 6) % 5], ADJ[(i // 30) % 4 if split == "train" else 3 - i % 4]
        if name == "rte":
            label = i % 2
            other = a if label == 0 else NOUNS[(i + 1) % 6]
            hidden = split == "train" and i % 5 == 4
            rows.append({"sentence1": f"the {c} {a} {b}", "sentence2": f"{other} {b}",
                         "label": -1 if hidden else label})
        else:
            label = int(i % 3 != 0)
            words = [c, a, b] if label else [b, a, c]
            rows.append({"sentence": " ".join(["the"] + words), "label": label})
    return rows


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models gain nothing from threads; on shared cores OpenMP syncs made T5 runs 10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def loader(name: str, split: str) -> list[dict]:
    assert split in ("train", "validation"), split
    return _rows(name, split)


def save_tokenizer(directory) -> None:
    """A word-level tokenizer over the tiny data's words; "_" and ":" split off, so "not_entailment" is 3 tokens."""
    words = ["the", "rte", "cola", "sentence", "sentence1", "sentence2", "Answer", ":", "_", "not", "entailment",
             "acceptable", "unacceptable", *NOUNS, *VERBS, *ADJ]
    vocab = {w: i for i, w in enumerate(SPECIAL + words)}
    assert len(vocab) <= VOCAB
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()])
    PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(directory)


def _saved(kind: str, tmp_path_factory) -> str:
    directory = tmp_path_factory.mktemp(kind)
    save_tiny(kind, directory)
    save_tokenizer(directory)
    return str(directory)


@pytest.fixture(scope="module", params=["t5", "llama"])
def base(request, tmp_path_factory) -> tuple[str, str]:
    """(kind, folder) of a tiny model with its tokenizer, loadable like a hub id."""
    return request.param, _saved(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def t5_base(tmp_path_factory) -> str:
    return _saved("t5", tmp_path_factory)


def tiny_config(model: str, **overrides) -> HubConfig:
    settings = dict(model=model, tasks=("rte", "cola"), train_steps=12, lr=1e-2, train_batch_size=8, warmup_steps=2,
                    max_train=64, n_val=6, n_test=None, calibration_samples=12, calibration_batch_size=5, max_iter=3,
                    max_length=32, eval_batch_size=8, device="cpu")
    return HubConfig(**{**settings, **overrides})


def test_glue_tasks_are_text_to_text_with_seeded_disjoint_splits():
    task = glue_task("rte", loader, n_val=6, seed=3)
    assert task.kind == "label_words" and task.labels == ("entailment", "not_entailment")
    assert task.prompt(task.test[0]).startswith("rte sentence1: the ") and " sentence2: " in task.test[0].text
    assert all(ex.answer == task.labels[ex.label] for ex in task.train + task.val + task.test)
    assert len(task.train) + len(task.val) == 32 and len(task.test) == 14  # 8 hidden labels dropped; test = validation
    assert not {ex.text for ex in task.train} & {ex.text for ex in task.val}
    assert glue_task("rte", loader, n_val=6, seed=3) == task and glue_task("rte", loader, n_val=6, seed=4) != task
    causal = glue_task("cola", loader, causal=True, n_test=5)
    assert len(causal.test) == 5 and causal.prompt(causal.test[0]).endswith("\nAnswer:")
    assert causal.test[0].text.startswith("cola sentence: ") and causal.labels == ("unacceptable", "acceptable")


def test_missing_datasets_package_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ModuleNotFoundError, match="pip install datasets"):
        glue_loader()("cola", "train")


def test_gpu_profile_is_the_papers_setting():
    config = hub_config(PROFILES["gpu"])
    assert (config.model, config.rank, config.lora_alpha) == ("google/flan-t5-base", 8, 32)
    assert config.targets(True) == ("q", "v")
    assert {"mnli", "cola"} <= set(config.tasks) and config.targets(False) == ("q_proj", "v_proj")
    assert (config.calibration_samples, config.max_iter) == (50, 10)
    assert (config.alpha, config.adaptive_weights) == (1e-7, "official")
    assert config.n_test is None  # the whole GLUE validation split
    assert hub_config(PROFILES["ci"], alpha=1e-4).alpha == 1e-4


def test_label_scores_are_teacher_forced_log_likelihoods(t5_base):
    model, tokenizer = load_model(t5_base, device="cpu")
    task = glue_task("rte", loader)
    prompts = [task.prompt(ex) for ex in task.test[:3]]
    scores = seq2seq_label_scores(model, tokenizer, prompts, task.labels, max_length=32)
    assert scores.shape == (3, 2)
    for j, word in enumerate(task.labels):  # mean token loss of one prompt x number of target tokens
        batch = seq2seq_batch(tokenizer, prompts[:1], [word], 32)
        expected = -model(**batch).loss.item() * batch["labels"].shape[1]
        assert scores[0, j].item() == pytest.approx(expected, rel=1e-5)


def test_seq2seq_calibration_teacher_forces_every_real_label_position(t5_base):
    model, tokenizer = load_model(t5_base, device="cpu")
    task = glue_task("rte", loader, n_val=6)
    batches = calibration_batches(task, tokenizer, True, n=12, batch_size=5, max_length=32)
    assert [len(b["input_ids"]) for b in batches] == [5, 5, 2]
    labels = torch.cat([b["labels"].flatten() for b in batches])
    assert (labels == -100).any()  # "entailment </s>" is padded next to "not _ entailment </s>"
    modules = dict(model.named_modules())
    names = ["decoder.block.0.layer.0.SelfAttention.q", "decoder.block.1.layer.1.EncDecAttention.q",
             "encoder.block.0.layer.0.SelfAttention.q"]
    grams = gram_pass(model, {n: Target(n, modules[n]) for n in names}, batches)
    decoder_rows = int((labels != -100).sum())
    assert decoder_rows > 12  # more than one position per sample
    assert grams.rows[grams.group_of(names[0])] == decoder_rows == grams.rows[grams.group_of(names[1])]
    assert grams.rows[grams.group_of(names[2])] == sum(int(b["attention_mask"].sum()) for b in batches)
    prompts_only = calibration_batches(task, tokenizer, False, n=12, batch_size=5, max_length=32)
    assert set(prompts_only[0]) == {"input_ids", "attention_mask"}  # a causal LM is calibrated on prompts alone


def test_train_lora_leaves_the_base_model_as_it_was_and_is_skipped_when_saved(base, tmp_path):
    kind, directory = base
    model, tokenizer = load_model(directory, device="cpu")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    task = glue_task("cola", loader, causal=kind == "llama", n_val=6)
    config = tiny_config(directory, train_steps=4)
    recipe = train_lora(model, tokenizer, task, tmp_path / "cola", config)
    assert recipe["trained"] and (tmp_path / "cola" / "adapter_model.safetensors").is_file()
    assert not any("lora" in name for name, _ in model.named_modules())
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    again = train_lora(model, tokenizer, task, tmp_path / "cola", config)
    assert not again["trained"] and again["train_time_s"] == recipe["train_time_s"]
    assert 0 <= evaluate_hub_task(model, tokenizer, task, "val", batch_size=4, max_length=32) <= 1


def test_run_hub_trains_merges_evaluates_and_writes_json(base, tmp_path):
    kind, directory = base
    report = run_hub(tiny_config(directory), tmp_path, methods=("ties", "regmean", "iteris"), loader=loader,
                     progress=False)
    assert report["encoder_decoder"] == (kind == "t5")
    for task in ("rte", "cola"):
        folder = tmp_path / "adapters" / task
        recipe = json.loads((folder / "recipe.json").read_text())
        assert (folder / "adapter_config.json").is_file() and recipe["final_loss"] < recipe["first_loss"]
        assert json.loads((folder / "adapter_config.json").read_text())["target_modules"]
    rows = {row["label"]: row for row in report["results"]}
    assert list(rows) == ["base", "lora:rte", "lora:cola", "ties", "regmean", "iteris"]
    assert rows["lora:rte"]["normalized"]["rte"] == 1.0 and rows["lora:cola"]["normalized"]["cola"] == 1.0
    for row in rows.values():
        assert all(0 <= a <= 1 for a in row["accuracy"].values()) and "mean_normalized" in row
    iteris = rows["iteris"]
    assert (iteris["settings"]["alpha"], iteris["settings"]["adaptive_weights"]) == (1e-7, "official")
    assert len(iteris["objective"]) == 3 and iteris["calibration_samples"] == 12 and iteris["merge_seconds"] > 0
    assert rows["ties"]["calibration_samples"] == 0 and rows["ties"]["objective"] == []
    written = json.loads((tmp_path / "hub_results.json").read_text())
    assert written["results"][-1]["accuracy"] == iteris["accuracy"] and written["config"]["tasks"] == ["rte", "cola"]
    assert "| iteris |" in (tmp_path / "hub_results.md").read_text()


def test_benchmark_script_runs_the_hub_recipe(t5_base, tmp_path, monkeypatch, capsys):
    import iteris_lab.tracks.hub.llm as hub

    main = runpy.run_path(str(Path(__file__).resolve().parents[1] / "benchmarks" / "hub_llm.py"))["main"]
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0 and "--model" in capsys.readouterr().out
    monkeypatch.setitem(sys.modules, "datasets", None)
    assert main(["--model", t5_base, "--out", str(tmp_path / "none"), "--quiet"]) == 2
    assert "pip install datasets" in capsys.readouterr().err
    monkeypatch.setattr(hub, "glue_loader", lambda dataset=hub.GLUE_DATASET: loader)
    argv = ["--model", t5_base, "--out", str(tmp_path / "run"), "--tasks", "rte", "cola", "--methods", "linear",
            "iteris", "--train-steps", "3", "--json", str(tmp_path / "report.json"), "--quiet"]
    assert main(argv) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert [r["label"] for r in report["results"]] == ["base", "lora:rte", "lora:cola", "linear", "iteris"]
    assert report["config"]["train_steps"] == 3 and report["config"]["max_iter"] == PROFILES["ci"].max_iter
    assert "| iteris |" in capsys.readouterr().out
