"""Features: what reaches each merged layer, as streamed Gram statistics.

For task i and layer ℓ we need X_iᵀX̃_i and X̃_iᵀX̃_i (in, in), where rows of X are tokens (or conv patches)
seen with LoRA i active and rows of X̃ the same positions seen through the merged model. They are summed batch
by batch, so memory does not grow with the number of samples. Padded positions never enter a Gram.

Modules that read the same tensor in the same forward pass (q, k, v of one attention; gate and up of one MLP)
form a *group* and share one pair of Grams.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from .errors import CalibrationError
from .rows import batch_masks, lined_up, mask_keys
from .targets import Target, TargetHooks, layer_input

Forward = Callable[[nn.Module, object], object]


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


class Capture(TargetHooks):
    """Forward pre-hooks on the targets. Each call hands `on_rows(index, group, rows)` the masked rows
    (in `dtype`, float32 by default) of each distinct input, once per group of consecutive modules reading the
    same tensor."""

    pre = True

    def __init__(self, targets: dict[str, Target], on_rows: Callable[[int, tuple, torch.Tensor], None],
                 dtype: torch.dtype = torch.float32):
        super().__init__(targets)
        self.on_rows, self.dtype = on_rows, dtype
        self.masks: dict[str, torch.Tensor] = {}
        self._pending: tuple | None = None  # (x, signature, [names], rows)
        self._index = 0

    def __exit__(self, *exc):
        self._pending = None
        return super().__exit__(*exc)

    def _hook(self, name: str, target: Target):
        def hook(module, args, kwargs):
            x = layer_input(args, kwargs)
            pending = self._pending
            if pending is not None and same_tensor(pending[0], x) and pending[1] == target.layer.row_signature:
                pending[2].append(name)
                return None
            self.flush()
            rows = target.layer.rows(x.detach(), lined_up(name, x, self.masks.get(name))).to(self.dtype)
            self._pending = (x, target.layer.row_signature, [name], rows)
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


def gram_pass(model, targets: dict[str, Target], batches, forward: Forward | None = None,
              dtype: torch.dtype = torch.float32) -> Grams:
    """Grams of the model as it is now (X̃ = X): gram[g] = cross[g] = XᵀX."""
    grams = Grams()
    capture = Capture(targets, lambda index, group, rows: grams.add(group, rows, None), dtype)
    for _ in _each_batch(model, targets, batches, forward, [(lambda: None, capture)]):
        pass
    return grams


def paired_pass(model, targets: dict[str, Target], batches, use_task: Callable[[], None],
                use_merged: Callable[[], None], forward: Forward | None = None,
                dtype: torch.dtype = torch.float32) -> Grams:
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

    merged_capture = Capture(targets, pair, dtype)
    runs = [(use_task, Capture(targets, keep, dtype)), (use_merged, merged_capture)]
    for _ in _each_batch(model, targets, batches, forward, runs):
        if len(stored) != merged_capture._index:
            raise CalibrationError("the merged model's forward pass visited fewer merged layers than the task "
                                   "model's; calibration passes must be deterministic.")
        stored.clear()
    return grams


def _each_batch(model, targets, batches, forward: Forward | None, runs: list[tuple[Callable[[], None], Capture]]):
    """Run every batch once per (use, capture) of `runs` (use() switches a ΔW on); yields after each batch."""
    device, keys = input_device(model), mask_keys(model, targets)
    with torch.no_grad():
        for batch in batches:
            batch = to_device(batch, device)
            masks = batch_masks(batch, keys)
            for use, capture in runs:
                use()
                with capture:
                    capture.start_batch(masks)
                    run_forward(model, batch, forward)
                    capture.flush()
            yield


def check_reached(targets, seen, task: int | None = None) -> None:
    """Every target ran during calibration (`seen`: the names that did)."""
    missing = [name for name in targets if name not in seen]
    if missing:
        where = "" if task is None else f"task {task}: "
        raise CalibrationError(f"{where}layer {missing[0]} (and {len(missing) - 1} more) never ran during "
                               "calibration; does the forward pass reach the adapted modules?")


def check_statistics(task: int, layer: str, rows: int, *matrices: torch.Tensor) -> None:
    """A layer's statistics come from at least one real row and are finite."""
    if rows == 0:
        raise CalibrationError(f"task {task}: no real tokens reached layer {layer}: the calibration batches are "
                               "empty or all padding.")
    if not all(bool(torch.isfinite(m).all()) for m in matrices):
        raise CalibrationError(f"task {task}: features of layer {layer} contain NaN or Inf; check the calibration "
                               "inputs and the model's dtype (fp16 overflow?).")


def check_coverage(grams: Grams, targets, task: int) -> None:
    """Every target ran and saw at least one real row, and the statistics are finite."""
    check_reached(targets, {name for group in grams.gram for name in group}, task)
    for group, rows in grams.rows.items():
        check_statistics(task, group[0], rows, grams.gram[group], grams.cross[group])
