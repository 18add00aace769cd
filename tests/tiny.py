"""Tiny models, LoRA adapters and calibration batches for the tests.

Everything is CPU, float32, in eval mode, and a pure function of its seed (the global RNG is left as it was).

kind     model                                   reload a save_tiny folder with
"llama"  LlamaForCausalLM                        AutoModelForCausalLM
"gpt2"   GPT2LMHeadModel (Conv1D layers)         AutoModelForCausalLM   (LoRA needs fan_in_fan_out=True)
"t5"     T5ForConditionalGeneration              AutoModelForSeq2SeqLM
"bert"   BertForSequenceClassification (3)       AutoModelForSequenceClassification
"mlp"    Sequential: Linear 8->16, ReLU, Linear 16->16, ReLU, Linear 16->4       (Linear at "0", "2", "4")
"conv"   Sequential: Conv2d 3->4 (3x3), ReLU, Conv2d 4->8 (3x3, stride 2), ReLU, Flatten, Linear 128->5
                                                                   (Conv2d at "0", "2", Linear at "5")
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

VOCAB = 100
PAD_ID = 0  # id at padded positions; real tokens are drawn from [1, VOCAB)
MLP_IN = 8
CONV_INPUT = (3, 8, 8)  # (channels, height, width) of one "conv" sample
HF_KINDS = ("llama", "t5", "bert", "gpt2")
KINDS = HF_KINDS + ("mlp", "conv")
AUTO_CLASS = {
    "llama": "AutoModelForCausalLM",
    "gpt2": "AutoModelForCausalLM",
    "t5": "AutoModelForSeq2SeqLM",
    "bert": "AutoModelForSequenceClassification",
}
# Every module name a LoRA can target per kind. Bert's "dense" includes pooler.dense, whose input is
# (batch, hidden), not (batch, seq): a module the attention mask does not apply to.
TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "t5": ["q", "k", "v", "o", "wi", "wo"],
    "bert": ["query", "key", "value", "dense"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "mlp": ["0", "2", "4"],
    "conv": ["0", "2", "5"],
}


def _check_kind(kind: str, kinds: tuple[str, ...] = KINDS) -> None:
    if kind not in kinds:
        raise ValueError(f"unknown tiny kind {kind!r}; expected one of {kinds}")


def _hf_model(kind: str) -> nn.Module:
    import transformers as tf

    # initializer_range 0.1 instead of 0.02, so that layers and LoRAs visibly change the outputs.
    common = dict(vocab_size=VOCAB, pad_token_id=PAD_ID, bos_token_id=1, eos_token_id=2)
    if kind == "llama":
        config = tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.1,
                                tie_word_embeddings=False, **common)
        return tf.LlamaForCausalLM(config)
    if kind == "gpt2":
        config = tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, initializer_range=0.1, **common)
        return tf.GPT2LMHeadModel(config)
    if kind == "t5":
        config = tf.T5Config(d_model=16, d_kv=4, d_ff=32, num_layers=2, num_decoder_layers=2, num_heads=4,
                             decoder_start_token_id=PAD_ID, **common)
        return tf.T5ForConditionalGeneration(config)
    config = tf.BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           max_position_embeddings=64, initializer_range=0.1, num_labels=3, **common)
    return tf.BertForSequenceClassification(config)


def build_tiny(kind: str, seed: int = 0) -> nn.Module:
    """A tiny model of `kind` (see the module docstring), float32, eval mode, weights fixed by `seed`."""
    _check_kind(kind)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if kind == "mlp":
            model = nn.Sequential(nn.Linear(MLP_IN, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
        elif kind == "conv":
            model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 8, 3, stride=2, padding=1),
                                  nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 5))
        else:
            model = _hf_model(kind)
    return model.float().eval()


def save_tiny(kind: str, directory: str | Path, seed: int = 0) -> str:
    """Save build_tiny(kind, seed) with save_pretrained (config + weights); reload with load_tiny."""
    _check_kind(kind, HF_KINDS)
    build_tiny(kind, seed).save_pretrained(directory)
    return str(directory)


def load_tiny(kind: str, directory: str | Path) -> nn.Module:
    """Reload a save_tiny folder with the kind's Auto class (AUTO_CLASS), in eval mode."""
    import transformers

    _check_kind(kind, HF_KINDS)
    return getattr(transformers, AUTO_CLASS[kind]).from_pretrained(directory).eval()


@torch.no_grad()
def _randomize(layer, generator: torch.Generator, rel_norm: float) -> None:
    """Fill A and B with Gaussians, then rescale both so that ‖ΔW‖_F = rel_norm · ‖W0‖_F."""
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    A.copy_(torch.randn(A.shape, generator=generator))
    B.copy_(torch.randn(B.shape, generator=generator))
    ratio = rel_norm * layer.get_base_layer().weight.norm() / layer.get_delta_weight("default").norm()
    A.mul_(ratio.sqrt())  # ΔW = s·B·A is bilinear: each factor takes the square root
    B.mul_(ratio.sqrt())


def make_lora(model: nn.Module, directory: str | Path, target_modules, r: int = 4, lora_alpha: float = 8,
              use_rslora: bool = False, seed: int = 0, fan_in_fan_out: bool = False, task_type=None,
              **kwargs) -> str:
    """Save a PEFT LoRA for `model` to `directory` and return the path; `model` itself is not touched.

    A and B are random and non-zero (fixed by `seed`), scaled so that each adapted layer has
    ‖ΔW‖_F = 0.1·‖W0‖_F. Works for Linear, Conv2d and GPT-2 Conv1D (pass fan_in_fan_out=True).
    Extra kwargs go to peft.LoraConfig (e.g. rank_pattern, alpha_pattern, modules_to_save).
    """
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    if not isinstance(target_modules, str):
        target_modules = list(target_modules)
    config = LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=target_modules, use_rslora=use_rslora,
                        fan_in_fan_out=fan_in_fan_out, task_type=task_type, **kwargs)
    with torch.random.fork_rng(devices=[]):  # peft's own init draws from the global RNG
        peft_model = get_peft_model(copy.deepcopy(model), config)
    generator = torch.Generator().manual_seed(seed)
    for module in peft_model.modules():
        if isinstance(module, LoraLayer) and "default" in module.lora_A:
            _randomize(module, generator, rel_norm=0.1)
    peft_model.save_pretrained(directory)
    return str(directory)


def _row_lengths(batch_size: int, seq_len: int, pad: bool, generator: torch.Generator) -> torch.Tensor:
    if not pad:
        return torch.full((batch_size,), seq_len)
    if seq_len < 2:
        raise ValueError("padding needs seq_len >= 2")
    # One full row keeps the padded width real; the others are shorter and differ while there is room.
    lengths = seq_len - torch.arange(batch_size) % seq_len
    if batch_size == 1:
        lengths = torch.tensor([seq_len - 1])
    return lengths[torch.randperm(batch_size, generator=generator)]


def _padded_ids(batch_size: int, seq_len: int, pad: bool, generator: torch.Generator) -> dict:
    lengths = _row_lengths(batch_size, seq_len, pad, generator)
    mask = (torch.arange(seq_len) < lengths[:, None]).long()
    ids = torch.randint(PAD_ID + 1, VOCAB, (batch_size, seq_len), generator=generator)
    return {"input_ids": ids.masked_fill(mask == 0, PAD_ID), "attention_mask": mask}


def token_batches(kind: str, n_batches: int = 2, batch_size: int = 3, seq_len: int = 7, pad: bool = True,
                  seed: int = 0) -> list:
    """Calibration batches for a tiny model of `kind`, fixed by `seed`.

    HF kinds: dicts with input_ids and attention_mask, both (batch_size, seq_len), right padded. Row
    lengths differ and, with pad=True, at least one row is padded; padded ids are PAD_ID.
    "t5" also gets labels (batch_size, seq_len + 2), right padded with -100.
    "mlp": tensors (batch_size, MLP_IN); "conv": tensors (batch_size, *CONV_INPUT).
    """
    _check_kind(kind)
    generator = torch.Generator().manual_seed(seed)
    if kind in ("mlp", "conv"):
        shape = (MLP_IN,) if kind == "mlp" else CONV_INPUT
        return [torch.randn(batch_size, *shape, generator=generator) for _ in range(n_batches)]
    batches = []
    for _ in range(n_batches):
        batch = _padded_ids(batch_size, seq_len, pad, generator)
        if kind == "t5":
            target = _padded_ids(batch_size, seq_len + 2, pad, generator)
            batch["labels"] = target["input_ids"].masked_fill(target["attention_mask"] == 0, -100)
        batches.append(batch)
    return batches


@torch.no_grad()
def outputs(model: nn.Module, batch) -> torch.Tensor:
    """The model's main output on one batch: logits for HF models (also wrapped in a PeftModel), else the tensor."""
    out = model(**batch) if isinstance(batch, dict) else model(batch)
    return out if isinstance(out, torch.Tensor) else out.logits


@dataclass
class MergeCase:
    """A ready merge problem: a base model, one adapter folder and calibration batches per task."""

    model: nn.Module
    adapters: list[str]
    calibration: list[list]


def merge_case(kind: str, directory: str | Path, n_tasks: int = 2, targets=None, seed: int = 0,
               **lora_kwargs) -> MergeCase:
    """n_tasks LoRAs on build_tiny(kind, seed), all on `targets` (default TARGETS[kind]).

    Task i's adapter uses seed + i + 1, its calibration batches seed + 100 + i.
    """
    model = build_tiny(kind, seed)
    lora_kwargs.setdefault("fan_in_fan_out", kind == "gpt2")
    adapters = [make_lora(model, Path(directory) / f"task_{i}", targets or TARGETS[kind], seed=seed + i + 1,
                          **lora_kwargs) for i in range(n_tasks)]
    calibration = [token_batches(kind, seed=seed + 100 + i) for i in range(n_tasks)]
    return MergeCase(model, adapters, calibration)


WORDS = [f"w{i}" for i in range(3, 100)]


def save_tokenizer(directory) -> None:
    """A word-level tokenizer over VOCAB ids (<pad>=0, <s>=1, </s>=2, then WORDS), saved for AutoTokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{w: i for i, w in enumerate(WORDS, start=3)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="</s>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="</s>", bos_token="<s>").save_pretrained(directory)


def saved_model(kind: str, directory: str | Path) -> tuple[str, nn.Module]:
    """A base-model folder as users hand one to the CLI (save_tiny(kind) + save_tokenizer in `directory`), and the
    model reloaded from it (load_tiny), whose module names LoRAs made with make_lora then match: (folder, model)."""
    base = save_tiny(kind, directory)
    save_tokenizer(base)
    return base, load_tiny(kind, base)


ALL_LLAMA = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def relative_distance(a: dict, b: dict) -> float:
    """max over the layers of b: ‖a − b‖_F / ‖b‖_F, in float64."""
    return max(float((a[n].double() - b[n].double()).norm() / b[n].double().norm()) for n in b)
