"""Features: what reaches each merged layer, as streamed Gram statistics.

For task i and layer ℓ we need X_iᵀX̃_i and X̃_iᵀX̃_i (in, in), where rows of X are tokens (or conv patches)
seen with LoRA i active and rows of X̃ the same positions seen through the merged model. They are summed batch
by batch, so memory does not grow with the number of samples. Padded positions never enter a Gram.

Modules that read the same tensor in the same forward pass (q, k, v of one attention; gate and up of one MLP)
form a *group* and share one pair of Grams.
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from .errors import CalibrationError
from .targets import Target

Forward = Callable[[nn.Module, object], object]
_CROSS_KV = re.compile(r"(EncDecAttention\.[kv]|encoder_attn\.[kv]_proj|crossattention\.self\.(key|value)"
                       r"|attn2\.to_[kv])$")


def is_cross_kv(name: str) -> bool:
    """Cross-attention key/value layers read the encoder's (or text encoder's) tokens, not the decoder's."""
    return _CROSS_KV.search(name) is not None


def batch_masks(batch, encoder_decoder: bool) -> dict[str, torch.Tensor]:
    """Which positions are real, by role: 'input' (attention_mask), 'decoder', 'cross' (encoder_attention_mask)."""
    if not isinstance(batch, dict):
        return {}
    masks = {}
    if batch.get("attention_mask") is not None:
        masks["input"] = batch["attention_mask"].bool()
    if batch.get("decoder_attention_mask") is not None:
        masks["decoder"] = batch["decoder_attention_mask"].bool()
    elif encoder_decoder and batch.get("labels") is not None:
        masks["decoder"] = batch["labels"] != -100  # position t of the decoder predicts labels[t]
    if batch.get("encoder_attention_mask") is not None:
        masks["cross"] = batch["encoder_attention_mask"].bool()
    return masks


def mask_for(name: str, x: torch.Tensor, masks: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The mask of real positions for the input `x` of module `name`, or None when every row is real."""
    if is_cross_kv(name):
        mask = masks.get("cross", masks.get("input"))
    elif "decoder" in masks and "decoder" in name.split("."):
        mask = masks["decoder"]
    else:
        mask = masks.get("input")
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


def to_device(batch, device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


def input_device(model: nn.Module) -> torch.device:
    """Where calibration batches go: the model's device, or for a model dispatched by accelerate (device_map) its
    first execution device (offloaded parts execute there too)."""
    device_map = getattr(model, "hf_device_map", None)
    if device_map:
        for device in device_map.values():
            if device not in ("cpu", "disk", "meta"):
                return torch.device(f"cuda:{device}" if isinstance(device, int) else device)
        return torch.device("cpu")
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def run_forward(model: nn.Module, batch, forward: Forward | None):
    if forward is not None:
        return forward(model, batch)
    if isinstance(batch, dict):
        return model(**batch)
    return model(batch)


@dataclass
class Grams:
    """One task's statistics at one iteration, per group (a tuple of module names sharing an input).

    cross[g] = XᵀX̃, gram[g] = X̃ᵀX̃ (float32, on the model's device); rows[g] = number of rows.
    At the first iteration X̃ = X and `cross` is `gram` (the same tensors).
    """

    cross: dict[tuple, torch.Tensor] = field(default_factory=dict)
    gram: dict[tuple, torch.Tensor] = field(default_factory=dict)
    rows: dict[tuple, int] = field(default_factory=dict)

    def group_of(self, name: str) -> tuple:
        for group in self.gram:
            if name in group:
                return group
        raise KeyError(name)

    def add(self, group: tuple, x: torch.Tensor, x_tilde: torch.Tensor | None) -> None:
        xt = x if x_tilde is None else x_tilde
        g = xt.T @ xt
        if group in self.gram:
            self.gram[group] += g
            if x_tilde is not None:
                self.cross[group] += x.T @ xt
            self.rows[group] += xt.shape[0]
        else:
            self.gram[group] = g
            self.cross[group] = g if x_tilde is None else x.T @ xt
            self.rows[group] = xt.shape[0]


class Capture:
    """Forward pre-hooks on the targets. Each call hands `on_rows(index, group, rows)` the masked rows
    (in `dtype`, float32 by default) of each distinct input, once per group of consecutive modules reading the
    same tensor."""

    def __init__(self, targets: dict[str, Target], on_rows: Callable[[int, tuple, torch.Tensor], None],
                 dtype: torch.dtype = torch.float32):
        self.targets, self.on_rows, self.dtype = targets, on_rows, dtype
        self.masks: dict[str, torch.Tensor] = {}
        self._pending: tuple | None = None  # (x, signature, [names], rows)
        self._index = 0
        self._handles = []

    def __enter__(self):
        for name, target in self.targets.items():
            hook = self._hook(name, target)
            self._handles.append(target.module.register_forward_pre_hook(hook, with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._pending = None
        return False

    def _hook(self, name: str, target: Target):
        def hook(module, args, kwargs):
            x = args[0] if args else next(v for v in kwargs.values() if isinstance(v, torch.Tensor))
            pending = self._pending
            if pending is not None and same_tensor(pending[0], x) and pending[1] == target.row_signature:
                pending[2].append(name)
                return None
            self.flush()
            rows = target.rows(x.detach(), mask_for(name, x, self.masks)).to(self.dtype)
            self._pending = (x, target.row_signature, [name], rows)
            return None
        return hook

    def flush(self) -> None:
        """Hand over the input waiting for possible sharers; call after each forward pass."""
        if self._pending is not None:
            _, _, names, rows = self._pending
            self._pending = None
            self.on_rows(self._index, tuple(names), rows)
            self._index += 1

    def start_batch(self, masks: dict[str, torch.Tensor]) -> None:
        self.masks, self._index = masks, 0


def same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    # `a` is still referenced, so its memory cannot have been reused: equal pointers mean the same data.
    return a is b or (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
                      and a.dtype == b.dtype)


def check_finite(grams: Grams, task: int) -> None:
    for group, g in grams.gram.items():
        if not torch.isfinite(g).all() or not torch.isfinite(grams.cross[group]).all():
            raise CalibrationError(f"task {task}: features of layer {group[0]} contain NaN or Inf; check the "
                                   "calibration inputs and the model's dtype (fp16 overflow?).")


def gram_pass(model, targets: dict[str, Target], batches, forward: Forward | None = None,
              encoder_decoder: bool = False, dtype: torch.dtype = torch.float32) -> Grams:
    """Grams of the model as it is now (X̃ = X): gram[g] = cross[g] = XᵀX."""
    grams = Grams()
    capture = Capture(targets, lambda index, group, rows: grams.add(group, rows, None), dtype)
    device = input_device(model)
    with capture, torch.no_grad():
        for batch in batches:
            batch = to_device(batch, device)
            capture.start_batch(batch_masks(batch, encoder_decoder))
            run_forward(model, batch, forward)
            capture.flush()
    return grams


def paired_pass(model, targets: dict[str, Target], batches, use_task: Callable[[], None],
                use_merged: Callable[[], None], forward: Forward | None = None,
                encoder_decoder: bool = False, dtype: torch.dtype = torch.float32) -> Grams:
    """XᵀX̃ and X̃ᵀX̃: each batch runs once with the task's LoRA (X) and once through the merged model (X̃)."""
    grams, stored = Grams(), []

    def keep(index, group, rows):
        stored.append((group, rows))

    def pair(index, group, rows):
        if index >= len(stored) or stored[index][0] != group or stored[index][1].shape != rows.shape:
            raise CalibrationError(f"layer {group[0]}: the merged model's forward pass does not visit the same "
                                   "layers and positions as the task model's; calibration must be deterministic "
                                   "teacher-forced passes (not sampling or generate()).")
        grams.add(group, stored[index][1], rows)

    task_capture, merged_capture = Capture(targets, keep, dtype), Capture(targets, pair, dtype)
    device = input_device(model)
    with torch.no_grad():
        for batch in batches:
            batch = to_device(batch, device)
            masks = batch_masks(batch, encoder_decoder)
            stored.clear()
            for use, capture in ((use_task, task_capture), (use_merged, merged_capture)):
                use()
                with capture:
                    capture.start_batch(masks)
                    run_forward(model, batch, forward)
                    capture.flush()
            if len(stored) != merged_capture._index:
                raise CalibrationError("the merged model's forward pass visited fewer merged layers than the task "
                                       "model's; calibration passes must be deterministic.")
    return grams


def check_coverage(grams: Grams, targets, task: int) -> None:
    """Every target ran and saw at least one real row."""
    seen = {name for group in grams.gram for name in group}
    missing = [name for name in targets if name not in seen]
    if missing:
        raise CalibrationError(f"task {task}: layer {missing[0]} (and {len(missing) - 1} more) never ran during "
                               "calibration; does the forward pass reach the adapted modules?")
    for group, n in grams.rows.items():
        if n == 0:
            raise CalibrationError(f"task {task}: no real tokens reached layer {group[0]}: the calibration batches "
                                   "are empty or all padding.")
    check_finite(grams, task)
