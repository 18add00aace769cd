"""The base modules being merged, seen as linear maps on rows.

Every supported layer computes y = x·Wᵀ on some view of its input:
- nn.Linear: W is the weight (out, in), rows are the last-dimension vectors of the input.
- transformers Conv1D (GPT-2, PEFT's fan_in_fan_out): the weight is stored (in, out), so W is its transpose.
- nn.Conv2d: W is the weight flattened to (out, in·kh·kw), rows are the unfolded input patches.
So one closed form serves all three.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .errors import AdapterError
from .plumbing.offload import Offload


@dataclass(frozen=True)
class LinearLayer:
    """An nn.Linear seen as y = x·Wᵀ: W is its weight (out, in), rows are the last-dimension vectors of the input.

    The other kinds below override what differs; every kind answers the same questions, so the engine never asks
    which kind it holds."""

    weight_shape: tuple[int, ...]  # the module's own weight shape
    out_features: int
    in_features: int  # flattened: in·kh·kw for Conv2d
    fan_in_fan_out: ClassVar[bool] = False  # PEFT's flag for a weight stored (in, out)
    label: ClassVar[str] = "Linear"

    def matrix_shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    def matrix(self, weight: torch.Tensor) -> torch.Tensor:
        """The module's weight as the (out, in_flat) matrix W."""
        return weight.reshape(self.out_features, -1)

    def to_weight_layout(self, delta: torch.Tensor) -> torch.Tensor:
        """ΔW (out, in_flat) -> the layout of the module's weight."""
        return delta.reshape(self.weight_shape)

    def delta_layout(self, delta: torch.Tensor) -> torch.Tensor:
        """ΔW (out, in_flat) -> the layout of MergeResult.deltas: (out, in), or (out, in, kh, kw) for Conv2d."""
        return delta.reshape(self.weight_shape)

    def fits(self, lora) -> bool:
        """Whether a LoraLayer's ΔW has this layer's shape."""
        return (lora.B.shape[0], lora.A[0].numel()) == self.matrix_shape()

    def rows(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """The layer's input as rows (n, in_flat). `keep` is a (batch, seq) bool mask of real positions."""
        if keep is not None:
            x = x[keep] if x.dim() > 2 else x[keep.reshape(-1)]
        return x.reshape(-1, self.in_features)

    @property
    def row_signature(self) -> tuple:
        """Two modules reading the same tensor share their Grams when their signatures agree."""
        return (type(self), self.in_features)

    def product(self, x: torch.Tensor, B: torch.Tensor, A: torch.Tensor | None, scale: float) -> torch.Tensor:
        """x·ΔWᵀ for ΔW = scale·B·A (two thin products, as PEFT does), or for a dense ΔW = B when A is None."""
        if A is None:
            return x @ B.T
        return scale * ((x @ A.T) @ B.T)

    def lora_layout(self, B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Factors B (out, r), A (r, in_flat) in the shapes a PEFT or diffusers LoRA stores for this layer."""
        return B, A


@dataclass(frozen=True)
class Conv1DLayer(LinearLayer):
    """transformers' Conv1D (GPT-2): a Linear whose weight is stored (in, out), so W is its transpose."""

    fan_in_fan_out: ClassVar[bool] = True
    label: ClassVar[str] = "GPT-2 Conv1D"

    def matrix(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.T

    def to_weight_layout(self, delta: torch.Tensor) -> torch.Tensor:
        return delta.T

    def delta_layout(self, delta: torch.Tensor) -> torch.Tensor:
        return delta


@dataclass(frozen=True)
class Conv2dLayer(LinearLayer):
    """nn.Conv2d: W is the weight flattened to (out, in·kh·kw), rows are the unfolded input patches. A LoRA's A is
    a conv (r, in, kh, kw) and B a 1x1 conv (out, r, 1, 1)."""

    kernel_size: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] | int = 0
    dilation: tuple[int, int] = (1, 1)
    label: ClassVar[str] = "Conv2d"

    def fits(self, lora) -> bool:
        return super().fits(lora) and tuple(lora.A.shape[1:]) == self.weight_shape[1:]

    def rows(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        # (batch, in·kh·kw, positions) -> one row per patch position
        patches = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)
        return patches.transpose(1, 2).reshape(-1, self.in_features)

    @property
    def row_signature(self) -> tuple:
        return (type(self), self.in_features, self.kernel_size, self.stride, self.padding, self.dilation)

    def product(self, x: torch.Tensor, B: torch.Tensor, A: torch.Tensor | None, scale: float) -> torch.Tensor:
        conv = dict(stride=self.stride, padding=self.padding, dilation=self.dilation)
        if A is None:  # dense
            return F.conv2d(x, B.reshape(self.weight_shape), **conv)
        B, A = self.lora_layout(B, A)
        return scale * F.conv2d(F.conv2d(x, A, **conv), B)

    def lora_layout(self, B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r = A.shape[0]
        return B.reshape(self.out_features, r, 1, 1), A.reshape((r,) + tuple(self.weight_shape[1:]))


def layer_of(name: str, module: nn.Module) -> LinearLayer:
    """The kind of layer `module` is (AdapterError for a module that cannot be merged)."""
    if hasattr(module, "base_layer") or hasattr(module, "lora_A"):
        raise AdapterError(f"module {name} already carries a PEFT adapter; pass the base model without adapters "
                           "(e.g. peft_model.unload() or a freshly loaded model).")
    shape = tuple(module.weight.shape)
    if isinstance(module, nn.Linear):
        return LinearLayer(shape, module.out_features, module.in_features)
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            raise AdapterError(f"module {name}: grouped Conv2d (groups={module.groups}) is not supported.")
        if module.padding_mode != "zeros":
            raise AdapterError(f"module {name}: Conv2d padding_mode={module.padding_mode!r} is not supported.")
        out, cin, kh, kw = shape
        return Conv2dLayer(shape, out, cin * kh * kw, tuple(module.kernel_size), tuple(module.stride),
                           _conv_padding(name, module), tuple(module.dilation))
    if type(module).__name__ == "Conv1D" and module.weight.dim() == 2:  # transformers' GPT-2 layer, weight (in, out)
        cin, out = shape
        return Conv1DLayer(shape, out, cin)
    raise AdapterError(f"module {name} is a {type(module).__name__}; only Linear, Conv2d and GPT-2 Conv1D layers "
                       "can be merged (embedding LoRAs are not supported).")


class Target:
    """A module to merge, with the view of its inputs that makes it y = x·Wᵀ.

    `model` (the root module) is only needed for weights that accelerate offloads at a block above the module
    (offload.py).
    """

    def __init__(self, name: str, module: nn.Module, model: nn.Module | None = None):
        self.name, self.module = name, module
        self.layer = layer_of(name, module)
        self.offload = Offload(name, module, model)

    def weight_matrix(self) -> torch.Tensor:
        """W0 as a float64 (out, in_flat) matrix, read from accelerate's offload store when it is not in memory."""
        w = self.module.weight
        if w.device.type == "meta":
            w = self.offload.weight()
        return self.layer.matrix(w.detach().double())

    @torch.no_grad()
    def write(self, w0: torch.Tensor, delta: torch.Tensor | None) -> None:
        """weight := W0 + ΔW, summed in float32 (ΔW (out, in_flat) or in the weight's layout; None: W0 itself).
        The one writer of W0 + ΔW: measure.weights_added and MergeResult.apply_to both write through it."""
        if delta is None:
            self.module.weight.copy_(w0)
            return
        new = w0.float() + self.layer.to_weight_layout(delta).to(w0.device, torch.float32)
        self.module.weight.copy_(new.to(w0.dtype))

    @property
    def offloaded(self) -> bool:
        """True when the weight lives outside the module (accelerate offload: the parameter is on meta)."""
        return self.offload.active

    def ensure_loaded(self) -> None:
        """Reload blocks above this module that accelerate offloaded while a paused pass stood inside them."""
        self.offload.reload_blocks()


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

