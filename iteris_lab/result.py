"""MergeResult: what merge_loras returns — the merged ΔW per layer, its history, and ways to use it."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .errors import AdapterError, ExportError
from .export import ExportReport, lora_factors, write_adapter
from .targets import LayerInfo, Target, resolve_names


@dataclass
class MergeResult:
    """deltas:  {module name: ΔW float32 CPU}: (out, in) for Linear and GPT-2 Conv1D, (out, in, kh, kw) for Conv2d.
    factors: {module name: (B (out, R), A (R, in_flat))} when ΔW is exactly B @ A (iteris, regmean, linear,
             task_arithmetic, cat: R = Σ r_i).
    history: one IterationRecord per solve (empty for data-free methods).
    """

    method: str
    deltas: dict[str, torch.Tensor]
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    history: list
    layers: dict[str, LayerInfo]
    settings: dict
    seconds: float
    base_model: str | None = None
    extra: dict = field(default_factory=dict)

    def apply_to(self, model: nn.Module) -> nn.Module:
        """Add ΔW to the matching weights of `model` in place (a dense merge); returns the model.

        A model whose weights accelerate offloads (device_map with "cpu"/"disk", weights on the meta device) is
        refused: its weights are reloaded from the offload store at every call, so a write would not last. Save
        an adapter instead (save_adapter) and load it with PEFT."""
        names = resolve_names(model, self.deltas)
        modules = dict(model.named_modules())
        targets = {name: Target(names[name], modules[names[name]], model) for name in self.deltas}
        for name, target in targets.items():  # check everything before changing anything
            if target.offloaded:
                raise ExportError(f"module {names[name]} is offloaded by accelerate (device_map with cpu/disk "
                                  "offload): apply_to cannot write into offloaded weights. Use "
                                  "result.save_adapter(folder) and PeftModel.from_pretrained(model, folder), or "
                                  "load the model without offloading.")
            if target.info.weight_shape != self.layers[name].weight_shape:
                raise AdapterError(f"module {names[name]} has weight {target.info.weight_shape}, the merge "
                                   f"expects {self.layers[name].weight_shape}.")
        with torch.no_grad():
            for name, target in targets.items():
                w = target.module.weight
                update = target.info.to_weight_layout(self.deltas[name].to(w.device, torch.float32))
                w.copy_((w.float() + update).to(w.dtype))
        return model

    def save_adapter(self, directory, rank: int | None = None, overwrite: bool = False) -> ExportReport:
        """Write a PEFT LoRA folder. rank=None: the exact factors (rank Σ r_i) when the merge has them, else the
        SVD at numerical rank; an int: truncated SVD at that rank (see ExportReport.relative_error)."""
        if rank is not None and rank < 1:
            raise ValueError(f"rank must be a positive integer or None, got {rank!r}.")
        factors = lora_factors(self.deltas, self.factors, self.layers, rank)
        return write_adapter(directory, factors, self.layers, self.base_model, overwrite)

    def report(self) -> dict:
        """A JSON-ready summary: settings, timings, and per iteration the mean objective, λ and change."""
        return {
            "method": self.method,
            "settings": self.settings,
            "seconds": self.seconds,
            "layers": len(self.deltas),
            "iterations": [{
                "iteration": r.iteration, "seconds": r.seconds, "mean_objective": r.mean_objective(),
                "max_change": max(r.change.values(), default=None), "weights": r.weights, "objective": r.objective,
            } for r in self.history],
        }

    def save_report(self, path) -> None:
        Path(path).write_text(json.dumps(self.report(), indent=2))
