"""Weights that accelerate keeps outside the model (device_map=... with CPU or disk offload).

Such a module's weight is a parameter on the meta device; the real tensor sits in the `weights_map` of an
accelerate hook on the module or on a block above it, and is loaded for each call. The merge reads W0 from there
(for λ) and, while a paused pass of the sweep stands inside a block another pass has left, reloads the block.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import AdapterError


class Offload:
    """Where accelerate may keep the weight of module `name`: hooks on the module or its ancestors."""

    def __init__(self, name: str, module: nn.Module, model: nn.Module | None = None):
        self.name, self.module = name, module
        # The module itself, then its ancestors from the nearest: (its name relative to the owner + ".", owner).
        self.owners = [("", module)]
        if model is not None:
            parts = name.split(".")
            for k in range(len(parts) - 1, -1, -1):
                owner = model.get_submodule(".".join(parts[:k]))
                self.owners.append((".".join(parts[k:]) + ".", owner))
        if module.weight.device.type == "meta" and not any(self._stores()):
            raise self._no_store_error()

    @property
    def active(self) -> bool:
        """True when the weight lives outside the module (the parameter is on meta, or a hook offloads it)."""
        return self.module.weight.device.type == "meta" or any(
            getattr(hook, "offload", False) for _, owner in self.owners for hook in accelerate_hooks(owner))

    def weight(self) -> torch.Tensor:
        """The module's weight from accelerate's store (the parameter itself is on meta)."""
        for key, weights in self._stores():
            try:
                return weights[key]
            except KeyError:
                continue
        raise self._no_store_error()

    def reload_blocks(self) -> None:
        """Reload the weights of blocks above the module that accelerate offloaded while a paused pass was inside
        them (another pass left the block in the meantime); the module's own hook reloads by itself."""
        for _, owner in self.owners[1:]:
            for hook in accelerate_hooks(owner):
                if getattr(hook, "offload", False) and any(p.device.type == "meta" for p in owner.parameters()):
                    hook.pre_forward(owner)

    def _stores(self):
        """(key of the module's weight, accelerate weights_map) for every offload store above or on the module."""
        for prefix, owner in self.owners:
            for hook in accelerate_hooks(owner):
                weights = getattr(hook, "weights_map", None)
                if weights is not None:
                    yield prefix + "weight", weights

    def _no_store_error(self) -> AdapterError:
        return AdapterError(f"module {self.name}: its weight is on the meta device and no accelerate offload hook "
                            "holds it; load the model with real weights, or with device_map=... (and "
                            "offload_folder) so that accelerate can load them.")


def accelerate_hooks(module: nn.Module) -> list:
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return []
    return list(getattr(hook, "hooks", [hook]))  # a SequentialHook holds several
