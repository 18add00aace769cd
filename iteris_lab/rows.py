"""Which rows of a layer's input are real: declared rules, not names inside the engine.

Only real tokens enter a Gram (padding never does). A batch marks real positions with (batch, seq) masks; which
mask holds for which module is a model's business, so it is declared here as a list of RowRule, searched in
order: the first rule whose pattern matches a module's name decides, and the first of its masks the batch holds
is used (none: every row is real). A track or a user extends ROW_RULES, e.g. a VLM whose language model counts
text tokens only:

    ROW_RULES.insert(0, RowRule(r"(^|\\.)language_model\\.", ("text_mask", "attention_mask")))
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn


def is_encoder_decoder(model: nn.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


@dataclass(frozen=True)
class RowRule:
    """Modules whose name matches `modules` (a regex, searched; "" matches every module) take their real rows from
    the first of `masks` (batch keys) the batch holds: nonzero entries are real, for "labels" entries != -100.
    `only_if(model)`, when given, limits the rule to some models."""

    modules: str
    masks: tuple[str, ...]
    only_if: Callable[[nn.Module], bool] | None = None


CROSS_ATTENTION_KV = r"(EncDecAttention\.[kv]|encoder_attn\.[kv]_proj|crossattention\.self\.(key|value)|attn2\.to_[kv])$"
DECODER = r"(^|\.)decoder(\.|$)"
ROW_RULES: list[RowRule] = [
    # cross-attention keys and values read the encoder's (or text encoder's) tokens: T5, BART, BERT, diffusers
    RowRule(CROSS_ATTENTION_KV, ("encoder_attention_mask", "attention_mask")),
    # position t of an encoder–decoder's decoder predicts labels[t]
    RowRule(DECODER, ("decoder_attention_mask", "labels", "attention_mask"), only_if=is_encoder_decoder),
    RowRule(DECODER, ("decoder_attention_mask", "attention_mask")),
    RowRule("", ("attention_mask",)),
]


def mask_keys(model: nn.Module, names) -> dict[str, tuple[str, ...]]:
    """{module name: the batch keys that mark its real rows, in order}, by the first ROW_RULES entry that holds."""
    rules = [r for r in ROW_RULES if r.only_if is None or r.only_if(model)]
    return {name: next((r.masks for r in rules if re.search(r.modules, name)), ()) for name in names}


def batch_masks(batch, keys: dict[str, tuple[str, ...]]) -> dict[str, torch.Tensor]:
    """{module name: (batch, seq) bool mask of real positions} for the modules whose masks the batch holds."""
    if not isinstance(batch, dict):
        return {}
    found: dict[str, torch.Tensor] = {}
    masks = {}
    for name, wanted in keys.items():
        key = next((k for k in wanted if batch.get(k) is not None), None)
        if key is not None:
            if key not in found:
                found[key] = batch[key] != -100 if key == "labels" else batch[key].bool()
            masks[name] = found[key]
    return masks


def lined_up(name: str, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
    """`mask` when it lines up with the rows of `x`, the input of module `name`; None when every row is real."""
    if mask is None:
        return None
    mask = mask.to(x.device)
    if x.dim() > 2 and tuple(x.shape[:2]) == tuple(mask.shape):
        return mask
    if x.dim() == 2 and x.shape[0] == mask.numel():
        return mask
    if x.dim() == 2 and x.shape[0] == mask.shape[0]:  # one row per example (e.g. a pooler): nothing padded
        return None
    warnings.warn(f"{name}: input of shape {tuple(x.shape)} does not line up with a mask of shape "
                  f"{tuple(mask.shape)}; all its rows are used.", stacklevel=3)
    return None
