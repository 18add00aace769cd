"""Hook plumbing: one kind of hook installed on every target, removed on exit.

DeltaHooks (deltas.py: add the active ΔW to each output) and Passes (passes.py: stop the running pass at each
input) are the two kinds.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ..targets import Target


class TargetHooks:
    """Hooks made by `_hook(name, target)` on every target: forward hooks, or forward pre-hooks when `pre`; removed
    on exit."""

    pre = False

    def __init__(self, targets: dict[str, Target]):
        self.targets, self._handles = targets, []

    def __enter__(self):
        for name, target in self.targets.items():
            register = target.module.register_forward_pre_hook if self.pre else target.module.register_forward_hook
            self._handles.append(register(self._hook(name, target), with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        return False

    def _hook(self, name: str, target: Target):
        raise NotImplementedError


def layer_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """The input x a hook sees: the first positional argument, else the first tensor keyword argument."""
    return args[0] if args else next(v for v in kwargs.values() if isinstance(v, torch.Tensor))
