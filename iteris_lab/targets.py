"""The base modules being merged, seen as linear maps on rows.

Every supported layer computes y = x·Wᵀ on some view of its input:
- nn.Linear: W is the weight (out, in), rows are the last-dimension vectors of the input.
- transformers Conv1D (GPT-2, PEFT's fan_in_fan_out): the weight is stored (in, out), so W is its transpose.
- nn.Conv2d: W is the weight flattened to (out, in·kh·kw), rows are the unfolded input patches.
So one closed form serves all three.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import AdapterError


@dataclass(frozen=True)
class LayerInfo:
    """What export and apply need to know about a merged layer."""

    kind: str  # "linear" | "conv1d" | "conv2d"
    weight_shape: tuple[int, ...]  # the module's own weight shape
    out_features: int
    in_features: int  # flattened: in·kh·kw for conv2d

    def to_weight_layout(self, delta: torch.Tensor) -> torch.Tensor:
        """(out, in_flat) -> the layout of the module's weight."""
        if self.kind == "conv1d":
            return delta.T
        return delta.reshape(self.weight_shape)

    def matrix_shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)


class Target:
    """A module to merge, with the view of its inputs that makes it y = x·Wᵀ.

    `model` (the root module) is only needed for weights that accelerate offloads at a block above the module.
    """

    def __init__(self, name: str, module: nn.Module, model: nn.Module | None = None):
        self.name, self.module = name, module
        self.info = _layer_info(name, module)
        if self.info.kind == "conv2d":
            self._unfold = dict(kernel_size=module.kernel_size, dilation=module.dilation,
                                padding=_conv_padding(name, module), stride=module.stride)
        # The module itself, then its ancestors from the nearest: (its name relative to the owner + ".", owner).
        self._owners = [("", module)]
        if model is not None:
            parts = name.split(".")
            for k in range(len(parts) - 1, -1, -1):
                owner = model.get_submodule(".".join(parts[:k]))
                self._owners.append((".".join(parts[k:]) + ".", owner))
        if module.weight.device.type == "meta" and not any(self._weight_stores()):
            raise self._no_store_error()

    @property
    def conv_arguments(self) -> dict:
        """stride, padding, dilation of a Conv2d target (for F.conv2d)."""
        return {k: v for k, v in self._unfold.items() if k != "kernel_size"}

    def weight_matrix(self) -> torch.Tensor:
        """W0 as a float64 (out, in_flat) matrix, read from accelerate's offload store when it is not in memory."""
        w = self.module.weight
        if w.device.type == "meta":
            w = self._offloaded_weight()
        w = w.detach().double()
        return w.T if self.info.kind == "conv1d" else w.reshape(self.info.out_features, -1)

    def _weight_stores(self):
        """(key of this module's weight, accelerate weights_map) for every offload store above or on the module."""
        for prefix, owner in self._owners:
            for hook in _accelerate_hooks(owner):
                weights = getattr(hook, "weights_map", None)
                if weights is not None:
                    yield prefix + "weight", weights

    def _offloaded_weight(self) -> torch.Tensor:
        for key, weights in self._weight_stores():
            try:
                return weights[key]
            except KeyError:
                continue
        raise self._no_store_error()

    def _no_store_error(self) -> AdapterError:
        return AdapterError(f"module {self.name}: its weight is on the meta device and no accelerate offload hook "
                            "holds it; load the model with real weights, or with device_map=... (and "
                            "offload_folder) so that accelerate can load them.")

    @property
    def offloaded(self) -> bool:
        """True when the weight lives outside the module (accelerate offload: the parameter is on meta)."""
        return self.module.weight.device.type == "meta" or any(
            getattr(hook, "offload", False) for _, owner in self._owners for hook in _accelerate_hooks(owner))

    def ensure_loaded(self) -> None:
        """Reload the weights of blocks above this module that accelerate offloaded while a paused pass was inside
        them (another pass left the block in the meantime); the module's own hook reloads by itself."""
        for _, owner in self._owners[1:]:
            for hook in _accelerate_hooks(owner):
                if getattr(hook, "offload", False) and any(p.device.type == "meta" for p in owner.parameters()):
                    hook.pre_forward(owner)

    @property
    def row_signature(self) -> tuple:
        """Two modules reading the same tensor share their Grams when their signatures agree."""
        return (self.info.kind, self.info.in_features, tuple(sorted(getattr(self, "_unfold", {}).items())))

    def rows(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """The layer's input as rows (n, in_flat). `keep` is a (batch, seq) bool mask of real positions."""
        if self.info.kind == "conv2d":
            patches = F.unfold(x, **self._unfold)  # (batch, in·kh·kw, positions)
            return patches.transpose(1, 2).reshape(-1, self.info.in_features)
        if keep is not None:
            x = x[keep] if x.dim() > 2 else x[keep.reshape(-1)]
        return x.reshape(-1, self.info.in_features)


def _accelerate_hooks(module: nn.Module) -> list:
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return []
    return list(getattr(hook, "hooks", [hook]))  # a SequentialHook holds several


def _layer_info(name: str, module: nn.Module) -> LayerInfo:
    if hasattr(module, "base_layer") or hasattr(module, "lora_A"):
        raise AdapterError(f"module {name} already carries a PEFT adapter; pass the base model without adapters "
                           "(e.g. peft_model.unload() or a freshly loaded model).")
    if isinstance(module, nn.Linear):
        return LayerInfo("linear", tuple(module.weight.shape), module.out_features, module.in_features)
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            raise AdapterError(f"module {name}: grouped Conv2d (groups={module.groups}) is not supported.")
        if module.padding_mode != "zeros":
            raise AdapterError(f"module {name}: Conv2d padding_mode={module.padding_mode!r} is not supported.")
        out, cin, kh, kw = module.weight.shape
        return LayerInfo("conv2d", tuple(module.weight.shape), out, cin * kh * kw)
    if type(module).__name__ == "Conv1D" and module.weight.dim() == 2:  # transformers' GPT-2 layer, weight (in, out)
        cin, out = module.weight.shape
        return LayerInfo("conv1d", tuple(module.weight.shape), out, cin)
    raise AdapterError(f"module {name} is a {type(module).__name__}; only Linear, Conv2d and GPT-2 Conv1D layers "
                       "can be merged (embedding LoRAs are not supported).")


def _conv_padding(name: str, module: nn.Conv2d):
    if module.padding == "valid":
        return 0
    if module.padding == "same":
        pads = [d * (k - 1) for k, d in zip(module.kernel_size, module.dilation)]
        if any(p % 2 for p in pads):
            raise AdapterError(f"module {name}: padding='same' with an even kernel is not supported.")
        return tuple(p // 2 for p in pads)
    return module.padding


def resolve_names(model: nn.Module, names) -> dict[str, str]:
    """Map adapter module names to names in `model.named_modules()`.

    Exact names win; otherwise a unique model name that ends with the adapter name (the adapter was trained on
    a wrapper, e.g. BertForSequenceClassification vs BertModel), or the adapter name with leading parts removed.
    """
    modules = dict(model.named_modules())
    resolved = {}
    for name in names:
        if name in modules:
            resolved[name] = name
            continue
        candidates = [m for m in modules if m.endswith("." + name)]
        parts = name.split(".")
        for k in range(1, len(parts)):
            if not candidates and ".".join(parts[k:]) in modules:
                candidates = [".".join(parts[k:])]
        if len(candidates) != 1:
            found = "no module" if not candidates else f"{len(candidates)} modules ({', '.join(candidates[:3])})"
            raise AdapterError(f"adapter module {name!r} matches {found} of the base model "
                               f"{type(model).__name__}; is this adapter for this model?")
        resolved[name] = candidates[0]
    return resolved


class WeightWriter:
    """Writes W0 + ΔW into the targets' weights in place, and restores W0 exactly on exit.

    For evaluating a merge on an in-memory model at full speed; the merge itself applies ΔW through hooks
    (deltas.DeltaHooks) and never writes weights."""

    def __init__(self, targets: dict[str, Target]):
        self.targets = targets
        self.originals = {n: t.module.weight.detach().clone() for n, t in targets.items()}

    def set(self, deltas: dict) -> None:
        """deltas: {name: (out, in_flat) tensor, or a LoraLayer, or None for W0}."""
        with torch.no_grad():
            for name, target in self.targets.items():
                w0, delta = self.originals[name], deltas.get(name)
                if hasattr(delta, "delta"):  # a LoraLayer: build its ΔW only while writing it
                    delta = delta.delta()
                if delta is None:
                    target.module.weight.copy_(w0)
                else:
                    new = w0.float() + target.info.to_weight_layout(delta).to(w0.device, torch.float32)
                    target.module.weight.copy_(new.to(w0.dtype))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        with torch.no_grad():
            for name, target in self.targets.items():
                target.module.weight.copy_(self.originals[name])
        return False
