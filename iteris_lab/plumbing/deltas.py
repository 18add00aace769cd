"""Applying ΔW through the forward pass: every target computes layer(x) + x·ΔWᵀ, by a forward hook.

The engine never writes into the base weights while it merges. So the model is unchanged whatever happens, and
weights that accelerate keeps offloaded (on the meta device, loaded for each call, possibly from disk) work like
any other. A low-rank ΔW = s·B·A is applied as two thin products, (x·Aᵀ)·Bᵀ·s, as PEFT does.

Which ΔW is active is set by `DeltaHooks.set`, per module name:
    LoraLayer          a task's LoRA, ΔW_i = s_i B_i A_i
    (B, A)             factors with scale 1 (a merged layer: B (out, R), A (R, in_flat))
    tensor             a dense ΔW (out, in_flat)
    None / absent      W0 alone
"""
from __future__ import annotations

import torch

from ..adapters import LoraLayer
from .hooks import TargetHooks, layer_input
from ..targets import Target


class DeltaHooks(TargetHooks):
    """Forward hooks that add the active ΔW to each target's output; removed on exit.

    Each ΔW is cast to the input's device and dtype once and kept while it is applied: a task's LoRA for the whole
    merge, a solved ΔW (factors or dense) until a newer one is applied to the same module, when the older is dropped.
    """

    def __init__(self, targets: dict[str, Target]):
        super().__init__(targets)
        self._active: dict = {}
        self._prepared: dict[str, dict] = {}  # name -> {(id(delta), device, dtype): (delta, tensors)}

    def __exit__(self, *exc):
        self._prepared.clear()
        return super().__exit__(*exc)

    def set(self, deltas: dict) -> None:
        """Make `deltas` ({module name: ΔW as above}) the active ones; later calls replace it."""
        self._active = deltas

    def _hook(self, name: str, target: Target):
        def hook(module, args, kwargs, output):
            delta = self._active.get(name)
            if delta is None:
                return None
            x = layer_input(args, kwargs)
            dtype = torch.promote_types(x.dtype, torch.float32)  # at least float32
            B, A, scale = self._tensors(name, delta, x.device, dtype)
            return output + target.layer.product(x.to(dtype), B, A, scale).to(device=output.device, dtype=output.dtype)
        return hook

    def _tensors(self, name: str, delta, device, dtype):
        """(B, A, scale) on `device` in `dtype`; A is None for a dense ΔW (held in B)."""
        prepared = self._prepared.setdefault(name, {})
        key = (id(delta), device, dtype)  # the entry holds `delta`, so its id cannot be reused meanwhile
        if key not in prepared:
            if isinstance(delta, LoraLayer):
                (B, A), scale = delta.factors(), delta.scale
            else:  # (B, A) with scale 1, or a dense ΔW held in B: a solve's result, replaced by the next solve
                (B, A), scale = (delta if isinstance(delta, tuple) else (delta, None)), 1.0
                for old in [k for k, (d, _) in prepared.items() if not isinstance(d, LoraLayer)]:
                    del prepared[old]
            tensors = (B.to(device=device, dtype=dtype), None if A is None else A.to(device=device, dtype=dtype), scale)
            prepared[key] = (delta, tensors)
        return prepared[key][1]
