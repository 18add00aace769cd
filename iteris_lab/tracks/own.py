"""Your own adapters on the harness (chapter 07, `iteris-lab compare`): a base model, one LoRA folder and one held-out
prompt set per task, and any number of merged adapters, each scored on every task by its fidelity to that task's
own LoRA. No labels are needed; targets, where given, add accuracy.

Per model and task, over the task's n prompts:
    agreement  (1/n) Σ_k [answer_k = own answer_k]: the greedy answer (first line of the continuation) equals the
               one the task's own LoRA gives
    kl         (1/n) Σ_k KL(p_own,k ‖ p_k), in nats: p_k is the next-token distribution after prompt k (the first
               answer token) of the model, p_own,k that of the own LoRA
    accuracy   share of the prompts with a "target" whose answer equals it; None when no prompt has one
The own LoRA scores agreement 1 and kl 0 on its task by definition; the base model and the other adapters are the
floor a merge should rise above. Per-prompt outcomes are kept, so two models are compared paired on the same
prompts (CompareResult.paired -> iteris_lab.measure.paired_difference).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..adapters import LoraAdapter

from ..io.peft import load_adapter
from ..errors import AdapterError, CalibrationError, IterisError
from ..measure import paired_difference, weights_added
from .harness import References, Track, markdown_table, references

MEASURES = ("agreement", "kl", "accuracy")


@dataclass
class OwnTrack(Track):
    """A base model, its tokenizer, {task: LoRA folder or LoraAdapter} and {task: [{"text", "target"}]} prompts."""

    name: str
    model: torch.nn.Module
    tokenizer: object
    adapters: dict
    prompts: dict[str, list[dict]]
    max_new_tokens: int = 16
    max_length: int = 128
    batch_size: int = 8
    chat_template: bool = False

    def evaluate(self, split: str, limit: int | None, tasks=None, label: str = "") -> dict:
        """{task: {"answers": [str] (n), "next_logprobs": (n, vocab) float32 CPU}} of self.model as its weights
        stand now, on the first `limit` prompts of each task (the prompt sets are the held-out split)."""
        return {task: answer(self.model, self.tokenizer, self.texts(task, limit), self.max_new_tokens,
                             self.max_length, self.batch_size)
                for task in (tasks or self.prompts)}

    def texts(self, task: str, limit: int | None = None) -> list[str]:
        """The prompts the model reads: the texts, wrapped as a user turn of the chat template when asked."""
        texts = [r["text"] for r in self.prompts[task][:limit]]
        if not self.chat_template:
            return texts
        return [self.tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                                   add_generation_prompt=True) for t in texts]

    def calibration(self, samples: int, batch_size: int) -> list[list]:
        raise IterisError("the prompt sets of a comparison are held out: calibrate a merge on other texts.")

    def score(self, label: str, method: str, metrics: dict, refs: References) -> dict:
        """{"label", "method", "tasks": {task: {agreement, kl, accuracy, outcomes}}} against each task's own LoRA."""
        own = refs.own()
        return {"label": label, "method": method,
                "tasks": {task: fidelity(m, own[task], self.prompts[task]) for task, m in metrics.items()}}

    def validation(self, row: dict) -> tuple[tuple, dict]:
        means = [t["agreement"] for t in row["tasks"].values()]
        return (sum(means) / len(means),), {"agreement": means}


@torch.no_grad()
def answer(model, tokenizer, prompts: list[str], max_new_tokens: int, max_length: int, batch_size: int) -> dict:
    """Greedy answers (first line of up to max_new_tokens new tokens, stripped) and the log-softmax of the first
    generated token's logits (n, vocab) for each prompt. One generate() call per batch gives both: its first step
    is the forward pass over the left-padded prompt."""
    if not prompts:
        raise CalibrationError("a prompt set is empty; give at least one prompt per task.")
    pad_token = tokenizer.pad_token
    if pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # restored below: the tokenizer is the caller's
    was_training = model.training
    model.eval()
    device = next(p for p in model.parameters() if p.device.type != "meta").device
    answers, logprobs = [], []
    try:
        for start in range(0, len(prompts), batch_size):
            enc = tokenizer(prompts[start:start + batch_size], padding=True, truncation=True, max_length=max_length,
                            return_tensors="pt", padding_side="left")
            out = model.generate(input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device),
                                 max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                 output_logits=True, return_dict_in_generate=True)
            encoder_decoder = getattr(model.config, "is_encoder_decoder", False)
            new = out.sequences if encoder_decoder else out.sequences[:, enc["input_ids"].shape[1]:]
            texts = tokenizer.batch_decode(new, skip_special_tokens=True)
            answers += [t.strip().split("\n")[0].strip() for t in texts]
            logprobs.append(out.logits[0].float().log_softmax(-1).cpu())
    finally:
        model.train(was_training)
        if pad_token is None:
            tokenizer.pad_token = None
    return {"answers": answers, "next_logprobs": torch.cat(logprobs)}


def fidelity(metrics: dict, own: dict, records: list[dict]) -> dict:
    """Agreement, KL and accuracy of one model on one task (means, and per prompt in "outcomes")."""
    n = len(metrics["answers"])
    agreement = [float(a == b) for a, b in zip(metrics["answers"], own["answers"])]
    p_own = own["next_logprobs"][:n].double()
    kl = (p_own.exp() * (p_own - metrics["next_logprobs"].double())).sum(-1).clamp_min(0).tolist()
    correct = [float(a == r["target"].strip()) for a, r in zip(metrics["answers"], records) if r.get("target")
               is not None]
    return {"agreement": sum(agreement) / n, "kl": sum(kl) / n,
            "accuracy": sum(correct) / len(correct) if correct else None,
            "outcomes": {"agreement": agreement, "kl": kl, "correct": correct}}


@dataclass
class CompareResult:
    """rows: {"model", "task", "agreement", "kl", "accuracy" (None without targets)} per model and task.
    outcomes: {(model, task): {"agreement": [0/1] (n), "kl": [nats] (n), "correct": [0/1] (prompts with a target)}}.
    answers: {(model, task): the greedy answers (n)}."""

    rows: list[dict]
    outcomes: dict[tuple[str, str], dict[str, list[float]]]
    answers: dict[tuple[str, str], list[str]] = field(default_factory=dict)
    settings: dict = field(default_factory=dict)

    @property
    def models(self) -> list[str]:
        return list(dict.fromkeys(r["model"] for r in self.rows))

    @property
    def tasks(self) -> list[str]:
        return list(dict.fromkeys(r["task"] for r in self.rows))

    def paired(self, a: str, b: str, task: str, measure: str = "agreement", **options):
        """paired_difference of models a and b on one task's prompts: per-prompt agreement (higher is better), kl
        (lower is better: "ahead" then means a drifts further from the own LoRA) or correct."""
        if measure not in ("agreement", "kl", "correct"):
            raise IterisError(f"measure must be agreement, kl or correct, got {measure!r}.")
        for model in (a, b):
            if (model, task) not in self.outcomes:
                raise IterisError(f"no outcomes for model {model!r} on task {task!r}; models: "
                                  f"{', '.join(self.models)}; tasks: {', '.join(self.tasks)}.")
        first, second = self.outcomes[(a, task)][measure], self.outcomes[(b, task)][measure]
        if not first:
            raise IterisError(f"task {task!r} has no prompt with a target, so no per-prompt accuracy.")
        return paired_difference(first, second, **options)

    def table(self) -> str:
        """The rows as a markdown table."""
        def number(key, digits):
            return lambda r: "-" if r[key] is None else f"{r[key]:.{digits}f}"

        return markdown_table(self.rows, lambda rows: [("model", lambda r: r["model"]), ("task", lambda r: r["task"]),
                                                       ("agreement", number("agreement", 3)), ("KL", number("kl", 4)),
                                                       ("accuracy", number("accuracy", 3))])

    def frame(self):
        """The rows as a pandas DataFrame."""
        import pandas as pd

        return pd.DataFrame(self.rows)

    def to_json(self) -> dict:
        """{"rows": [...], "outcomes": [{"model", "task", "agreement", "kl", "correct"}], "settings": {...}}."""
        outcomes = [{"model": m, "task": t, **o} for (m, t), o in self.outcomes.items()]
        return {"rows": self.rows, "outcomes": outcomes, "settings": self.settings}


def compare(model, tokenizer, adapters, prompts, merged=None, *, limit: int | None = None, max_new_tokens: int = 16,
            max_length: int = 128, batch_size: int = 8, chat_template: bool = False,
            progress: bool = True) -> CompareResult:
    """Score the base model, each task's LoRA and every merged adapter on every task (module docstring).

    adapters: {task: LoRA folder or LoraAdapter}, or a list of folders (task = the folder's name).
    prompts:  per task (same order, or {task: ...}): a .txt/.jsonl file (read_inputs) or a list of texts /
              {"text", "target"} records.
    merged:   {name: merged adapter folder, MergeResult or {module: ΔW}}, or a list of folders (name = the folder's
              name). The model's weights are W0 again on return.
    """
    tasks = _named(adapters, "adapter")
    records = _prompts(prompts, list(tasks))
    candidates = {name: _deltas(m) for name, m in _named(merged or {}, "merged adapter").items()}
    clash = sorted(({"base"} | set(tasks)) & set(candidates))
    if clash:
        raise IterisError(f"a merged adapter is named {clash[0]!r} like the base or a task; give it another name.")
    if not callable(getattr(model, "generate", None)) or not model.can_generate():
        raise IterisError(f"compare scores greedy generations, and a {type(model).__name__} cannot generate; load the "
                          "base as a causal LM (AutoModelForCausalLM) or an encoder-decoder (AutoModelForSeq2SeqLM).")
    loras = {task: _whole(a if isinstance(a, LoraAdapter) else load_adapter(a)) for task, a in tasks.items()}
    track = OwnTrack("own", model, tokenizer, loras, records, max_new_tokens, max_length, batch_size, chat_template)
    refs = references(track, limit, own_only=True)  # each LoRA's answers on its own task: the references
    models = [("base", "base", {})] + [(t, "lora", a.layers) for t, a in loras.items()] + \
        [(name, "merged", deltas) for name, deltas in candidates.items()]
    result = CompareResult([], {}, settings=dict(limit=limit, max_new_tokens=max_new_tokens, max_length=max_length,
                                                 batch_size=batch_size, chat_template=chat_template))
    quiet = not progress or bool(os.environ.get("TQDM_DISABLE"))
    for label, method, deltas in tqdm(models, desc="compare: models", disable=quiet):
        others = [t for t in tasks if not (method == "lora" and t == label)]
        with weights_added(model, deltas):
            metrics = track.evaluate("test", limit, others, label=label) if others else {}
        if method == "lora":
            metrics[label] = refs.loras[label][label]
        row = track.score(label, method, {t: metrics[t] for t in tasks}, refs)
        for task, scored in row["tasks"].items():
            result.rows.append({"model": label, "task": task, **{k: scored[k] for k in MEASURES}})
            result.outcomes[(label, task)] = scored["outcomes"]
            result.answers[(label, task)] = metrics[task]["answers"]
    return result


def _named(items, what: str) -> dict:
    """{name: item} from a dict, or from a list of folders named by their last part (names must differ)."""
    if isinstance(items, dict):
        return dict(items)
    if isinstance(items, (str, os.PathLike)):
        items = [items]
    named = {}
    for item in items:
        name = Path(getattr(item, "path", item)).resolve().name
        if name in named:
            raise IterisError(f"two {what} folders are named {name!r} ({getattr(named[name], 'path', named[name])} "
                              f"and {getattr(item, 'path', item)}); the name labels the results, so rename one.")
        named[name] = item
    return named


def _prompts(prompts, tasks: list[str]) -> dict[str, list[dict]]:
    """{task: [{"text", "target"}]} from files or lists, one per task."""
    from ..io.calibration import read_inputs

    if not isinstance(prompts, dict):
        prompts = list(prompts)
        if len(prompts) != len(tasks):
            raise IterisError(f"got {len(prompts)} prompt sets for {len(tasks)} adapters; give one per adapter, in "
                              "the same order.")
        prompts = dict(zip(tasks, prompts))
    missing = [t for t in tasks if t not in prompts]
    if missing:
        raise IterisError(f"no prompts for task {missing[0]!r}; prompts are given for {', '.join(prompts)}.")
    out = {}
    for task in tasks:
        given = prompts[task]
        items = read_inputs(given) if isinstance(given, (str, os.PathLike)) else list(given)
        records = [{"text": r, "target": None} if isinstance(r, str) else dict(r) for r in items]
        for k, record in enumerate(records):
            if not isinstance(record.get("text"), str) or not isinstance(record.get("target"), (str, type(None))):
                raise CalibrationError(f"task {task!r}, prompt {k + 1}: expected a text (str) and an optional target "
                                       f"(str), got {record!r}.")
        if not records:
            raise CalibrationError(f"task {task!r}: the prompt set is empty.")
        out[task] = records
    return out


def _deltas(merged) -> dict:
    """{module: ΔW or LoraLayer} of a merged adapter given as a folder, a LoraAdapter, a MergeResult or a dict."""
    if hasattr(merged, "deltas"):
        return merged.deltas
    if isinstance(merged, dict):
        return merged
    return _whole(merged if isinstance(merged, LoraAdapter) else load_adapter(merged)).layers


def _whole(adapter: LoraAdapter) -> LoraAdapter:
    """The adapter, when its LoRA layers are all of it: compare applies LoRA deltas only."""
    if adapter.extra:
        raise AdapterError(f"{adapter.path}: the adapter also saves whole modules ({next(iter(adapter.extra))}, ...); "
                           "compare applies LoRA deltas only, so it would score a different model.")
    return adapter
