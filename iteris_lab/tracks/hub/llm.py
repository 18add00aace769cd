"""Hub recipe: the paper's LLM setting — Flan-T5-base LoRAs on GLUE merged with IterIS — or any decoder-only
hub model (Llama / Qwen class) through the same code.

    config = hub_config()                      # ITERIS_PROFILE=gpu: the paper's settings (below)
    report = run_hub(config, "runs/flan-t5")   # train missing LoRAs, merge with every method, evaluate, JSON

Paper setting (official GLUE_t5 config of HKUST-LongGroup/IterIS-merging): google/flan-t5-base, one LoRA per task
(r = 8, lora_alpha = 32, modules q and v), MNLI + CoLA, 50 unlabeled calibration samples per task, 10 solves,
α = 1e-7 (the config's alpha_1 = alpha_2 = 1e-7; the paper's text only says α ≤ 1e-4), adaptive weights
"official". We add SST-2 and RTE by default. Differences from the official code, on purpose:
- label words are the GLUE class names ("entailment", "acceptable", ...); the official prompts answer yes/no/maybe;
- LoRAs train for a fixed step budget (HubConfig.train_steps), not 8 epochs at lr 1e-5;
- GLUE's test labels are hidden, so our *test* split is a seeded sample of GLUE's validation split
  (validation_matched for MNLI) and our *val* split is carved from GLUE train, disjoint from the training rows;
- an encoder–decoder is calibrated teacher-forced on the label word (every real target position is a decoder
  row); a decoder-only model on the prompt alone. The official code runs generate() and keeps one step.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Sequence

import torch

from ...io.peft import load_adapter
from ...profiles import Profile, current_profile
from .. import harness
from ..llm.tasks import Task, encode_prompts
from ..llm.training import fit, lm_training_batch, train_batches
from ..training import Training
from .glue import GLUE_DATASET, Loader, glue_loader, glue_task, seeded_order

DEFAULT_METHODS = ("linear", "task_arithmetic", "ties", "regmean", "iteris")


@dataclass(frozen=True)
class HubRun:
    """What every hub run sets (LoRA, its training, the merge, the run). Defaults: the paper's Flan-T5 GLUE
    setting; a recipe whose paper setting differs names it in a constant (e.g. hub/vlm.py BLIP_PAPER)."""

    model: str = "google/flan-t5-base"  # hub id or local folder
    # LoRA; target_modules None: the recipe's own choice
    rank: int = 8
    lora_alpha: float = 32
    target_modules: tuple[str, ...] | str | None = None
    # training (AdamW, linear warmup then linear decay to 10 %)
    train_steps: int = 1000
    lr: float = 5e-4
    train_batch_size: int = 16
    warmup_steps: int = 50
    # data: training rows per task, test rows per task (None: all)
    max_train: int = 20000
    n_test: int | None = None
    # merging
    calibration_samples: int = 50
    calibration_batch_size: int = 10
    max_iter: int = 10
    alpha: float = 1e-7
    adaptive_weights: str = "official"
    # run
    max_length: int = 256
    eval_batch_size: int = 32
    dtype: str = "float32"
    device: str | None = None  # None: CUDA when available
    seed: int = 42

    def training(self) -> Training:
        """The LoRA training: AdamW, linear warmup then linear decay to 10 %."""
        return Training(steps=self.train_steps, lr=self.lr, batch_size=self.train_batch_size,
                        warmup_steps=max(1, self.warmup_steps), seed=self.seed)

    def iteris(self) -> dict:
        """The IterIS settings, as harness.run_methods takes them."""
        return {"alpha": self.alpha, "adaptive_weights": self.adaptive_weights}

    def profile(self) -> Profile:
        """The harness's run sizes: calibration samples per task, IterIS solves, calibration batch size (the test
        sets are sized by the run itself)."""
        return Profile("hub", calibration_samples=self.calibration_samples, many_samples=self.calibration_samples,
                       max_iter=self.max_iter, test_limit=None, batch_size=self.calibration_batch_size)


@dataclass(frozen=True)
class HubConfig(HubRun):
    """One GLUE hub run. Defaults are the paper's Flan-T5 GLUE setting (see the module docstring); target_modules
    None: ("q", "v") for an encoder–decoder (T5), ("q_proj", "v_proj") for a decoder-only LM; n_val rows of GLUE
    train are the val split."""

    tasks: tuple[str, ...] = ("mnli", "cola", "sst2", "rte")
    dataset: str = GLUE_DATASET
    n_val: int = 200

    def targets(self, encoder_decoder: bool) -> tuple[str, ...]:
        if self.target_modules is not None:
            return tuple(self.target_modules)
        return ("q", "v") if encoder_decoder else ("q_proj", "v_proj")


def hub_config(profile: Profile | None = None, **overrides) -> HubConfig:
    """HubConfig sized by a profile (default: $ITERIS_PROFILE): calibration samples, solves, test size and batch
    size come from it; "gpu" gives the paper's setting. "ci" also shrinks training. `overrides` win."""
    profile = profile or current_profile()
    sizes = dict(calibration_samples=profile.calibration_samples, max_iter=profile.max_iter,
                 n_test=profile.test_limit, eval_batch_size=profile.batch_size)
    if profile.name == "ci":
        sizes.update(train_steps=20, max_train=256, n_val=16, warmup_steps=2)
    return replace(HubConfig(), **{**sizes, **overrides})


# ---------------------------------------------------------------- base model


def load_model(model_id: str, dtype: str = "float32", device: str | None = None):
    """(model, tokenizer) for a hub id or a local folder, in eval mode on `device` (None: CUDA when available).

    AutoModelForSeq2SeqLM when the config says is_encoder_decoder (T5, BART), else AutoModelForCausalLM.
    A tokenizer without a pad token pads with its eos token.
    """
    import transformers as tf

    config = tf.AutoConfig.from_pretrained(model_id)
    auto = tf.AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else tf.AutoModelForCausalLM
    model = auto.from_pretrained(model_id, dtype=getattr(torch, dtype))
    tokenizer = tf.AutoTokenizer.from_pretrained(model_id)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval(), tokenizer


def is_encoder_decoder(model) -> bool:
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def _device(model) -> torch.device:
    return next(model.parameters()).device


# ---------------------------------------------------------------- batches


def target_ids(tokenizer, text: str) -> list[int]:
    """Token ids of a decoder target: the text's tokens, then eos (as T5 tokenizers add it)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])


def seq2seq_batch(tokenizer, prompts: Sequence[str], answers: Sequence[str], max_length: int) -> dict:
    """Encoder input_ids / attention_mask (batch, seq), right padded, and labels (batch, target) = the answer's
    ids then eos, -100 at padding: decoder position t is teacher-forced to predict labels[:, t]."""
    batch = encode_prompts(tokenizer, prompts, max_length)
    ids = [target_ids(tokenizer, a) for a in answers]
    labels = torch.full((len(ids), max(map(len, ids))), -100, dtype=torch.long)
    for i, seq in enumerate(ids):
        labels[i, :len(seq)] = torch.tensor(seq)
    batch["labels"] = labels
    return batch


def training_batch(task: Task, tokenizer, examples, max_length: int, encoder_decoder: bool) -> dict:
    """Seq2seq: prompt -> label word (teacher forced). Causal: prompt + " " + answer + eos, loss on the answer."""
    if encoder_decoder:
        return seq2seq_batch(tokenizer, [task.prompt(ex) for ex in examples], [ex.answer for ex in examples],
                             max_length)
    return lm_training_batch(task, tokenizer, examples, max_length)


def calibration_batches(task: Task, tokenizer, encoder_decoder: bool, n: int = 50, batch_size: int = 10,
                        max_length: int = 256, seed: int = 0) -> list[dict]:
    """Calibration inputs of n train examples (a seeded draw, the same as tasks.calibration_batches).

    Causal LM: prompts only (input_ids, attention_mask). Encoder–decoder: plus labels = the label word (-100 at
    padding), so the merge captures decoder rows at every real target position (labels != -100).
    """
    from ..llm.tasks import calibration_batches as prompt_batches

    if not encoder_decoder:
        return prompt_batches(task, tokenizer, n=n, batch_size=batch_size, max_length=max_length, seed=seed)
    chosen = [task.train[i] for i in seeded_order(len(task.train), seed)[:n]]
    return [seq2seq_batch(tokenizer, [task.prompt(ex) for ex in chunk], [ex.answer for ex in chunk], max_length)
            for chunk in (chosen[i:i + batch_size] for i in range(0, len(chosen), batch_size))]


# ---------------------------------------------------------------- LoRA training


def train_lora(model, tokenizer, task: Task, out_dir, config: HubConfig) -> dict:
    """Train a LoRA for `task` on `model` and save it as a PEFT folder with recipe.json; returns the recipe.

    When out_dir already holds an adapter nothing is trained and its recipe (if any) is returned with
    "trained": False. The model is wrapped by peft for training and unwrapped afterwards: its base weights and
    modules are as before.
    """
    from peft import LoraConfig, get_peft_model

    out_dir = Path(out_dir)
    if (out_dir / "adapter_config.json").is_file():
        recipe_file = out_dir / "recipe.json"
        return {**(json.loads(recipe_file.read_text()) if recipe_file.is_file() else {}), "trained": False}
    seq2seq = is_encoder_decoder(model)
    lora = LoraConfig(r=config.rank, lora_alpha=config.lora_alpha, target_modules=list(config.targets(seq2seq)),
                      lora_dropout=0.0, bias="none", task_type="SEQ_2_SEQ_LM" if seq2seq else "CAUSAL_LM")
    torch.manual_seed(config.seed)  # the LoRA A init
    peft_model = get_peft_model(model, lora)
    batches = (training_batch(task, tokenizer, exs, config.max_length, seq2seq)
               for exs in train_batches(task, config.train_batch_size, config.seed))
    start = time.perf_counter()
    try:
        losses = fit(peft_model, batches, config.training(), desc=f"train {task.name}")
        peft_model.peft_config["default"].base_model_name_or_path = config.model
        peft_model.save_pretrained(str(out_dir))
    finally:
        peft_model.unload()  # takes the LoRA layers out without merging them
    (out_dir / "README.md").unlink(missing_ok=True)  # peft's empty model card
    tail = losses[-10:]
    recipe = {"base_model": config.model, "task": task.name, "labels": list(task.labels),
              "rank": config.rank, "lora_alpha": config.lora_alpha, "target_modules": list(config.targets(seq2seq)),
              "steps": config.train_steps, "lr": config.lr, "batch_size": config.train_batch_size,
              "max_length": config.max_length, "seed": config.seed, "task_sizes": task.sizes(),
              "train_time_s": round(time.perf_counter() - start, 2), "first_loss": losses[0],
              "final_loss": sum(tail) / len(tail)}
    (out_dir / "recipe.json").write_text(json.dumps(recipe, indent=2) + "\n")
    return {**recipe, "trained": True}


# ---------------------------------------------------------------- evaluation


@torch.no_grad()
def seq2seq_label_scores(model, tokenizer, prompts: Sequence[str], words: Sequence[str],
                         max_length: int = 256) -> torch.Tensor:
    """(batch, labels): log p(word ids + eos | prompt) under teacher forcing, summed over the word's tokens.
    The encoder runs once per batch; the decoder once per label word."""
    batch = {k: v.to(_device(model)) for k, v in encode_prompts(tokenizer, prompts, max_length).items()}
    encoded = model.get_encoder()(**batch)
    scores = torch.empty(len(prompts), len(words))
    for j, word in enumerate(words):
        labels = torch.tensor([target_ids(tokenizer, word)] * len(prompts), device=batch["input_ids"].device)
        logits = model(encoder_outputs=encoded, attention_mask=batch["attention_mask"], labels=labels).logits
        logp = logits.float().log_softmax(-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)  # (batch, target)
        scores[:, j] = logp.sum(-1).cpu()
    return scores


@torch.no_grad()
def evaluate_hub_task(model, tokenizer, task: Task, split: str = "test", batch_size: int = 32,
                      max_length: int = 256) -> float:
    """Accuracy on a split: argmax over the label words' log-likelihood. Encoder–decoder: seq2seq_label_scores;
    decoder-only: tracks/llm/evaluate.py (the label word as a continuation of the prompt)."""
    from ..llm.evaluate import evaluate_task

    if not is_encoder_decoder(model):
        return evaluate_task(model, tokenizer, task, split, batch_size=batch_size, max_length=max_length,
                             progress=False)
    examples = task.split(split)
    if not examples:
        raise ValueError(f"task {task.name!r} has no {split} examples")
    was_training, correct = model.training, 0
    model.eval()
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        scores = seq2seq_label_scores(model, tokenizer, [task.prompt(ex) for ex in chunk], task.labels, max_length)
        correct += sum(int(p) == ex.label for p, ex in zip(scores.argmax(-1), chunk))
    model.train(was_training)
    return correct / len(examples)


# ---------------------------------------------------------------- the run


def glue_tasks(config: HubConfig, loader: Loader | None = None, causal: bool = False) -> dict[str, Task]:
    """{name: glue_task(...)} for config.tasks, with the config's split sizes and seed."""
    loader = loader or glue_loader(config.dataset)
    return {name: glue_task(name, loader, causal=causal, n_val=config.n_val, max_train=config.max_train,
                            n_test=config.n_test, seed=config.seed) for name in config.tasks}


@dataclass
class GlueTrack(harness.Track):
    """The hub model and its GLUE task LoRAs on the harness: accuracy per task on the test split."""

    model: torch.nn.Module
    tokenizer: object
    tasks: dict[str, Task]
    adapters: dict
    config: HubConfig

    @property
    def name(self) -> str:
        return self.config.model

    @property
    def merge_options(self) -> dict:
        return {"seed": self.config.seed}

    def evaluate(self, split: str, limit: int | None, tasks=None, label: str = "") -> dict[str, float]:
        return {name: evaluate_hub_task(self.model, self.tokenizer, task, split, self.config.eval_batch_size,
                                        self.config.max_length)
                for name, task in self.tasks.items() if not tasks or name in tasks}

    def calibration(self, samples: int, batch_size: int) -> list[list]:
        seq2seq, c = is_encoder_decoder(self.model), self.config
        return [calibration_batches(task, self.tokenizer, seq2seq, samples, batch_size, c.max_length, c.seed)
                for task in self.tasks.values()]

    def score(self, label: str, method: str, metrics: dict, refs: harness.References) -> dict:
        return harness.score_row(label, method, metrics, refs.own())

    def validation(self, row: dict) -> tuple[tuple, dict]:
        return (row["mean_normalized"],), {"val_mean_normalized": row["mean_normalized"]}


def run_hub(config: HubConfig, out_dir, methods: Sequence[str] = DEFAULT_METHODS, loader: Loader | None = None,
            progress: bool = True) -> dict:
    """Load config.model, train the LoRAs missing under out_dir/adapters/<task>, merge them with every method,
    evaluate base, each LoRA and each merge on every task's test split; write out_dir/hub_results.json (and a
    markdown table, hub_results.md). Returns that report; its "results" rows hold per-task accuracy, normalized
    accuracy, merge seconds and peak memory (MB; CUDA allocator on GPU), as harness.run_methods's rows."""
    start, out_dir = time.perf_counter(), Path(out_dir)
    model, tokenizer = load_model(config.model, config.dtype, config.device)
    seq2seq = is_encoder_decoder(model)
    tasks = glue_tasks(config, loader, causal=not seq2seq)
    loaded = time.perf_counter()
    recipes = {name: train_lora(model, tokenizer, task, out_dir / "adapters" / name, config)
               for name, task in tasks.items()}
    trained = time.perf_counter()
    train_peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    track = GlueTrack(model, tokenizer, tasks, {name: load_adapter(out_dir / "adapters" / name) for name in tasks},
                      config)
    rows = harness.run_methods(track, config.profile(), methods, iteris=config.iteris(), progress=progress)
    report = {"model": config.model, "encoder_decoder": seq2seq, "config": asdict(config),
              "environment": harness.environment(), "adapters": recipes, "results": rows,
              "tasks": {n: {"labels": list(t.labels), **t.sizes()} for n, t in tasks.items()},
              "timings": {"load_s": loaded - start, "train_s": trained - loaded,
                          "total_s": time.perf_counter() - start},
              "train_peak_gpu_mb": train_peak}  # loading + training; each merge row has its own peak
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "hub_results.json").write_text(json.dumps(report, indent=2))
    (out_dir / "hub_results.md").write_text(harness.markdown_table(rows) + "\n")
    return report
