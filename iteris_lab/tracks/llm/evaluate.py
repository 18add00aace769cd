"""Task metrics of a model: accuracy on a task split, for an encoder with a task head or a prompted causal LM.

Works on any model that takes input_ids / attention_mask: a base model, a PeftModel, or a model whose weights a
merge changed in place. The three task kinds (see tasks.py) are scored as:
- sequence_classification: argmax of the classifier logits (batch, num_labels);
- label_words: argmax over labels of log p(label word | prompt), the continuation's summed log-likelihood;
- generation: greedy decoding (left padded), first line of the output equal to the answer.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .tasks import Task, encode_prompts

HEAD_FILE = "head.safetensors"


# ---------------------------------------------------------------- task heads (MiniLM track)


def load_head(adapter_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A task's classification head: {parameter name in BertForSequenceClassification: tensor} from head.safetensors.

    The head is everything after the encoder that was trained for the task (bert.pooler.dense, classifier);
    it is kept out of the LoRA file so that the adapter folder holds only LoRA tensors.
    """
    from safetensors.torch import load_file

    path = Path(adapter_dir) / HEAD_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: this adapter folder has no task head")
    return load_file(str(path))


def head_labels(adapter_dir: str | os.PathLike) -> tuple[str, ...]:
    """Label names of a task head, in logit order, from the recipe.json next to it."""
    recipe = json.loads((Path(adapter_dir) / "recipe.json").read_text())
    return tuple(recipe["labels"])


def _unwrap(model):
    """The transformers model inside a PeftModel (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def apply_head(model, head: dict[str, torch.Tensor]):
    """Put a task head into a sequence-classification model, in place; returns the model.

    Names are matched against the unwrapped model's parameters (a PeftModel is unwrapped first). A classifier
    with another number of labels is replaced by a Linear of the head's shape.
    """
    base = _unwrap(model)
    if "classifier.weight" in head:
        out_features, in_features = head["classifier.weight"].shape
        if base.classifier.out_features != out_features:
            ref = base.classifier.weight
            base.classifier = torch.nn.Linear(in_features, out_features, device=ref.device, dtype=ref.dtype)
            base.num_labels = base.config.num_labels = out_features
    params = dict(base.named_parameters())
    missing = [name for name in head if name not in params]
    if missing:
        raise KeyError(f"head tensors {missing} have no parameter of that name in {type(base).__name__}")
    with torch.no_grad():
        for name, tensor in head.items():
            params[name].copy_(tensor)
    return model


# ---------------------------------------------------------------- scoring


def _progress(iterable, total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    disable = not enabled or bool(os.environ.get("TQDM_DISABLE"))
    return tqdm(iterable, total=total, desc=desc, leave=False, disable=disable)


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _classify(model, tokenizer, prompts, max_length) -> torch.Tensor:
    batch = {k: v.to(_device(model)) for k, v in encode_prompts(tokenizer, prompts, max_length).items()}
    logits = model(**batch).logits
    if logits.dim() != 2:
        raise ValueError(f"a sequence_classification task needs logits (batch, labels), got {tuple(logits.shape)}")
    return logits.argmax(-1).cpu()


def _last_token_logits(model, tokenizer, prompts, max_length) -> torch.Tensor:
    """(batch, vocab) next-token logits after each prompt.

    Left padding puts every prompt's last token at the last position, so the LM head runs on that position only
    (logits_to_keep=1; the head is a quarter of SmolLM2's forward cost); position_ids count real tokens only,
    which makes the result equal to an unpadded forward.
    """
    enc = tokenizer(list(prompts), padding=True, truncation=True, max_length=max_length,
                    return_tensors="pt", padding_side="left")
    mask = enc["attention_mask"].to(_device(model))
    kwargs = {"input_ids": enc["input_ids"].to(mask.device), "attention_mask": mask,
              "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}
    try:
        logits = model(**kwargs, logits_to_keep=1).logits
    except TypeError:  # a causal LM without logits_to_keep
        logits = model(**kwargs).logits
    return logits[:, -1]


def _label_word_scores(model, tokenizer, prompts, words, max_length) -> torch.Tensor:
    """(batch, labels) summed log p(word tokens | prompt). Prompt and word are tokenized apart, as in training."""
    word_ids = [tokenizer(w, add_special_tokens=False)["input_ids"] for w in words]
    if all(len(ids) == 1 for ids in word_ids):
        # One token per label: log p(word | prompt) is read off each prompt's last position, one forward pass.
        last = _last_token_logits(model, tokenizer, prompts, max_length).float().log_softmax(-1)
        return last[:, [ids[0] for ids in word_ids]].cpu()
    enc = encode_prompts(tokenizer, prompts, max_length)
    lengths = enc["attention_mask"].sum(1)
    device = _device(model)
    scores = torch.zeros(len(prompts), len(words))
    for j, ids in enumerate(word_ids):
        seqs = [enc["input_ids"][i, :lengths[i]].tolist() + ids for i in range(len(prompts))]
        width = max(map(len, seqs))
        input_ids = torch.full((len(seqs), width), tokenizer.pad_token_id)
        mask = torch.zeros_like(input_ids)
        for i, seq in enumerate(seqs):
            input_ids[i, :len(seq)] = torch.tensor(seq)
            mask[i, :len(seq)] = 1
        logp = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits.float().log_softmax(-1)
        for i in range(len(seqs)):
            # token t of the word sits at position lengths[i] + t and is predicted from position lengths[i] + t - 1
            pos = torch.arange(len(ids), device=logp.device) + int(lengths[i]) - 1
            scores[i, j] = logp[i, pos, torch.tensor(ids, device=logp.device)].sum().cpu()
    return scores


def _generate(model, tokenizer, prompts, max_length, max_new_tokens) -> list[str]:
    """Greedy continuations of the prompts (left padded so that every prompt ends at the last position)."""
    enc = tokenizer(list(prompts), padding=True, truncation=True, max_length=max_length,
                    return_tensors="pt", padding_side="left")
    device = _device(model)
    out = model.generate(input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device),
                         max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return [t.strip().split("\n")[0].strip() for t in texts]


def predict(model, tokenizer, task: Task, examples, max_length: int = 128) -> list:
    """Predictions for one batch of examples: label indices (classification kinds) or answer strings (generation)."""
    prompts = [task.prompt(ex) for ex in examples]
    if task.kind == "sequence_classification":
        return _classify(model, tokenizer, prompts, max_length).tolist()
    if task.kind == "label_words":
        return _label_word_scores(model, tokenizer, prompts, task.label_words, max_length).argmax(-1).tolist()
    return _generate(model, tokenizer, prompts, max_length, task.max_new_tokens)


def task_outcomes(model, tokenizer, task: Task, split: str = "test", head=None, batch_size: int = 32,
                  limit: int | None = None, max_length: int = 128, progress: bool = True) -> list[int]:
    """Per example of `task.split(split)` (the first `limit` when given), in that order: 1 if `model` answers it
    right, else 0 — what a paired comparison of two models on the same examples needs (measure.paired_difference).

    head: for sequence_classification, a head state dict (load_head) or an adapter folder; it is written into
    the model in place first. The model is run in eval mode under no_grad and its train/eval mode restored.
    """
    if head is not None:
        apply_head(model, load_head(head) if isinstance(head, (str, os.PathLike)) else head)
    examples = task.split(split)[:limit]
    if not examples:
        raise ValueError(f"task {task.name!r} has no {split} examples")
    # Batches of similar length waste less compute on padding; outcomes go back to test-set order below.
    order = sorted(range(len(examples)), key=lambda i: len(task.prompt(examples[i])))
    was_training = model.training
    model.eval()
    outcomes = [0] * len(examples)
    batches = range(0, len(order), batch_size)
    try:
        with torch.no_grad():
            for start in _progress(batches, len(batches), f"{task.name}/{split}", progress):
                chunk = order[start:start + batch_size]
                preds = predict(model, tokenizer, task, [examples[i] for i in chunk], max_length)
                for i, pred in zip(chunk, preds):
                    ex = examples[i]
                    outcomes[i] = int(pred == (ex.answer if task.kind == "generation" else ex.label))
    finally:
        model.train(was_training)
    return outcomes


def evaluate_task(model, tokenizer, task: Task, split: str = "test", head=None, batch_size: int = 32,
                  limit: int | None = None, max_length: int = 128, progress: bool = True) -> float:
    """Accuracy of `model` on `task.split(split)` (the first `limit` examples when given): the mean of
    task_outcomes (same arguments)."""
    outcomes = task_outcomes(model, tokenizer, task, split, head, batch_size, limit, max_length, progress)
    return sum(outcomes) / len(outcomes)


def evaluate_tasks(model, tokenizer, tasks: dict[str, Task], heads: dict | None = None, outcomes: bool = False,
                   **kwargs) -> dict:
    """{task name: accuracy} for several tasks on one model; heads: {task name: head or adapter folder}. With
    outcomes=True: {task name: [1 right / 0 wrong per example, test-set order]} instead (task_outcomes)."""
    heads = heads or {}
    per_task = {name: task_outcomes(model, tokenizer, task, head=heads.get(name), **kwargs)
                for name, task in tasks.items()}
    return per_task if outcomes else {name: sum(o) / len(o) for name, o in per_task.items()}
