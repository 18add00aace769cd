"""The LoRAs being merged: {module name: LoraLayer(A, B, scale)} per task, and what the adapters of one merge must
agree on (finite tensors, one base model, the heads they carry). Reading them from files: io/peft.py (PEFT folders)
and lora_formats/ (diffusers and kohya files).

A LoRA on a layer with weight W0 (out, in) adds ΔW = s·B·A, with A (r, in), B (out, r) and
s = lora_alpha / r (rslora: lora_alpha / sqrt(r)). For a Conv2d LoRA, A is a conv (r, in, kh, kw) and
B a 1x1 conv (out, r, 1, 1), so ΔW = s·B·A acts on unfolded patches of length in·kh·kw.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch

from .errors import AdapterError
from .targets import resolve_names

@dataclass(frozen=True)
class LoraLayer:
    """One adapted module: ΔW = scale · B @ A.

    A: (r, in) or (r, in, kh, kw) for Conv2d; B: (out, r) or (out, r, 1, 1).
    """

    A: torch.Tensor
    B: torch.Tensor
    scale: float

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B (out, r), A (r, in_flat)) as float64 matrices, the scale left out."""
        return self.B.reshape(self.B.shape[0], -1).double(), self.A.reshape(self.rank, -1).double()

    def delta(self) -> torch.Tensor:
        """ΔW = s·B·A as a float64 (out, in_flat) matrix."""
        B, A = self.factors()
        return self.scale * (B @ A)


@dataclass
class LoraAdapter:
    """A PEFT LoRA folder read into memory. `layers` maps module names (as in the adapter file,
    prefix `base_model.model.` removed) to LoraLayer; `extra` holds non-LoRA tensors (e.g. a head)."""

    path: str
    config: dict
    layers: dict[str, LoraLayer]
    extra: dict[str, torch.Tensor] = field(default_factory=dict)


def check_finite(adapter: LoraAdapter) -> None:
    """Refuse NaN/Inf in an adapter's tensors, naming the module (a merge would spread them silently)."""
    for module, layer in adapter.layers.items():
        for which, tensor in (("lora_A", layer.A), ("lora_B", layer.B)):
            if not bool(torch.isfinite(tensor).all()):
                raise AdapterError(f"{adapter.path}: module {module}: {which} contains NaN or Inf; the adapter is "
                                   "damaged (or its training diverged). Retrain or re-export it.")
        if not math.isfinite(layer.scale):
            raise AdapterError(f"{adapter.path}: module {module}: the LoRA scale {layer.scale} is not finite.")
    for key, tensor in adapter.extra.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise AdapterError(f"{adapter.path}: tensor {key} contains NaN or Inf; the adapter is damaged.")


# -- what the adapters of one merge must agree on ---------------------------------------------------------------

def check_adapters(model, loras: list[LoraAdapter]) -> dict:
    """Check the adapters of one merge against each other and the base model, before any work.

    - NaN/Inf in any tensor: AdapterError naming the module.
    - base_model_name_or_path differing: a warning naming both (adapters of one architecture may still fit).
    - task_type: the one they agree on (None when none is set or they disagree; a warning when they disagree).
    - modules_to_save (a trained head, `extra`): carried into the merge unchanged when every adapter holds the
      same tensors; different heads are refused (IterIS merges LoRA deltas; averaging two classifiers trained for
      different label sets has no meaning). Carried modules must come after every adapted module: the features are
      captured without them.
    Returns {"task_type", "modules_to_save", "_carried": {model key: tensor}} for the merge's settings.
    """
    for adapter in loras:
        check_finite(adapter)
    bases = {a.config.get("base_model_name_or_path") for a in loras} - {None}
    if len(bases) > 1:
        warnings.warn("the adapters were trained on different base models: " + " and ".join(
            f"{a.path} on {a.config.get('base_model_name_or_path')!r}" for a in loras) + "; merging them is only "
            "meaningful when those are the same weights.", stacklevel=3)
    types = {a.config.get("task_type") for a in loras} - {None}
    if len(types) > 1:
        warnings.warn(f"the adapters disagree on task_type ({', '.join(sorted(map(str, types)))}); the merged "
                      "adapter is written with task_type None.", stacklevel=3)
    carried = _shared_extra(loras, [_without_base_copies(model, a) for a in loras])
    return {"task_type": types.pop() if len(types) == 1 else None,
            "modules_to_save": sorted({k.rsplit(".", 1)[0] for k in carried}),
            "_carried": _resolve_carried(model, loras, carried)}


def _without_base_copies(model, adapter: LoraAdapter) -> dict[str, torch.Tensor]:
    """adapter.extra less the copies of base weights PEFT saves next to an embedding or lm_head LoRA
    (save_embedding_layers: `<module>.base_layer.weight`); a copy that differs from the model's is refused."""
    extra = {}
    for key, tensor in adapter.extra.items():
        module, _, attr = key.rpartition(".base_layer.")
        if not module:
            extra[key] = tensor
            continue
        name = f"{resolve_names(model, [module])[module]}.{attr}"
        param = dict(model.named_parameters(remove_duplicate=False)).get(name)
        if param is None or param.device.type == "meta":
            continue  # offloaded: nothing to compare in memory
        if param.shape != tensor.shape or not torch.equal(tensor.to(param.device, param.dtype), param):
            raise AdapterError(f"{adapter.path}: the adapter saves its own base weight {key} (e.g. a resized "
                               f"vocabulary), which differs from the base model's {name}; load the base model "
                               "the adapter was trained on (with the same vocabulary size).")
    return extra


def _shared_extra(loras: list[LoraAdapter], extras: list[dict]) -> dict[str, torch.Tensor]:
    first, head = loras[0], extras[0]
    for other, extra in zip(loras[1:], extras[1:]):
        keys = set(head) ^ set(extra)
        differ = sorted(keys or {k for k in head if not torch.equal(head[k], extra[k])})
        if differ:
            raise AdapterError(
                f"{first.path} and {other.path} carry different trained modules (modules_to_save) at {differ[0]}: "
                "IterIS merges LoRA deltas, and different heads cannot be merged into one without losing one. "
                "Use adapters that share the head, or merge the LoRA parts only by passing LoraAdapter objects "
                "with .extra emptied (iteris_lab.load_adapter(path), then adapter.extra.clear()).")
    return dict(head)


def _resolve_carried(model, loras, carried: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{key in the model's state dict: tensor}; refuses a carried module that precedes an adapted one."""
    if not carried:
        return {}
    modules = resolve_names(model, sorted({k.rsplit(".", 1)[0] for k in carried}))
    adapted = {m for a in loras for m in resolve_names(model, a.layers).values()}
    order = {name: k for k, name in enumerate(dict(model.named_modules()))}
    last = max(order[m] for m in adapted)
    for module, name in modules.items():
        if name in adapted or order[name] < last:
            raise AdapterError(f"module {name} is saved whole by the adapters (modules_to_save) but comes before or "
                               "is one of the LoRA-adapted modules: the merge captures features without it, so the "
                               "result would not match. Only heads after every adapted module can be carried.")
    params = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers())
    out = {}
    for key, tensor in carried.items():
        module, param = key.rsplit(".", 1)
        name = f"{modules[module]}.{param}"
        if name not in params or tuple(params[name].shape) != tuple(tensor.shape):
            raise AdapterError(f"{loras[0].path}: saved module tensor {key} {tuple(tensor.shape)} does not fit the "
                               f"base model ({name}: {tuple(params[name].shape) if name in params else 'missing'}); "
                               "was this adapter trained on another base model?")
        out[name] = tensor
    return out
