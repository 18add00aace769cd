"""Forward passes that stop at every adapted layer: what both schedules run calibration batches with.

A Pass runs one batch through the model as a greenlet: a coroutine with its own stack, in the caller's thread. A
forward pre-hook on every target hands control back at the target's input x; `advance()` resumes the pass until
its next stop or its end. Only one pass runs at a time, so
- the caller's thread-local modes (no_grad, inference_mode, autocast, the CUDA device and stream) reach every pass;
- a pass holds its live activations and nothing else (no thread, no per-thread allocator arena);
- a pass that is never resumed is simply dropped: there is nothing to join, so none can hang the merge.
Each pass keeps its own grad and autocast modes across stops, as a thread would: a forward= that changes them
around a target finds them as it left them.

Jacobi runs the passes of one batch side by side (one per role: the task's LoRA, the merged model); the sweep runs
every batch's passes side by side (sweep.py). `next_stop` advances a set of passes to the target they all reach
next, and refuses passes that disagree.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from greenlet import greenlet, getcurrent
from torch import nn

from ..errors import CalibrationError
from ..rows import batch_masks, mask_keys
from ..statistics import InputSharing, real_rows
from .hooks import TargetHooks, layer_input
from ..targets import Target

Forward = Callable[[nn.Module, object], object]
_AUTOCAST_DEVICES = tuple(d for d in ("cpu", "cuda") if torch.amp.is_autocast_available(d))


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


@dataclass(frozen=True)
class _Modes:
    """The thread-local modes a pass carries across its stops."""

    grad: bool
    inference: bool
    autocast: tuple  # (enabled, dtype) per device type of _AUTOCAST_DEVICES

    @classmethod
    def now(cls) -> _Modes:
        return cls(torch.is_grad_enabled(), torch.is_inference_mode_enabled(),
                   tuple((torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in _AUTOCAST_DEVICES))

    def apply(self) -> None:
        torch.set_grad_enabled(self.grad)
        for device, (enabled, dtype) in zip(_AUTOCAST_DEVICES, self.autocast):
            torch.set_autocast_enabled(device, enabled)
            torch.set_autocast_dtype(device, dtype)


class _Aborted(BaseException):
    """Thrown into a stopped pass to unwind it when the merge ends early."""


class Pass:
    """One forward pass of one batch, stopping at every target's input. `at`, `target` and `x` say where it stands
    (None once finished); `shared` is True when that target reads the tensor the previous stop's target read."""

    def __init__(self, model: nn.Module, batch, forward: Forward | None, deltas: dict | None, keys: dict,
                 device: torch.device):
        self.model, self.batch, self.forward, self.deltas = model, batch, forward, deltas
        self.keys, self.device, self.masks = keys, device, {}
        self.at: str | None = None
        self.target: Target | None = None
        self.x: torch.Tensor | None = None
        self.shared, self.finished = False, False
        self._sharing, self._modes, self._aborted = InputSharing(), None, False
        self.greenlet = greenlet(self._run)

    def rows(self, dtype: torch.dtype) -> torch.Tensor:
        """The real rows of the input it stopped at, (rows, in_flat) in `dtype`."""
        return real_rows(self.at, self.target, self.x, self.masks.get(self.at), dtype)

    def advance(self, hooks=None) -> None:
        """Run until the next stop or the end; `hooks` (DeltaHooks) get this pass's ΔW first."""
        if self.finished:
            return
        if hooks is not None and self.deltas is not None:
            hooks.set(self.deltas)
        self._switch(self.greenlet.switch)

    def stop(self, name: str, target: Target, x: torch.Tensor) -> None:
        """In the pass, at the input x of `name`: note where it is and hand control back."""
        if self._aborted:  # a forward= that swallowed the unwinding and ran on is stopped again at once
            raise _Aborted
        self.shared = self._sharing.joins(x, target)
        self.at, self.target, self.x = name, target, x
        self._modes = _Modes.now()
        self.greenlet.parent.switch()

    def close(self) -> None:
        """Unwind the pass if it stands at a stop; errors raised while it unwinds are dropped (the merge is
        already ending)."""
        if not self.greenlet:  # never started, or ended
            self.finished = True
            return
        self._aborted = True
        try:
            self._switch(lambda: self.greenlet.throw(_Aborted))
        except Exception:
            pass
        self.finished = True

    def _switch(self, into: Callable[[], object]) -> None:
        """Run `into` (a switch into the pass) with the modes the pass stopped in; the caller's modes after."""
        outer = _Modes.now()
        if self._modes is not None:
            self._modes.apply()
        try:
            into()  # returns when the pass stops (stop() noted its modes) or ends
        finally:
            outer.apply()
        if not self.finished and self._modes.inference != outer.inference:  # inference mode cannot be re-entered
            raise CalibrationError("a calibration pass entered or left inference mode around an adapted layer; "
                                   "enter torch.inference_mode() around merge_loras instead.")

    def _run(self) -> None:
        batch = to_device(self.batch, self.device)  # on the device from the pass's start to its end only
        self.batch = None
        self.masks = batch_masks(batch, self.keys)
        try:
            run_forward(self.model, batch, self.forward)
        except _Aborted:
            pass
        finally:
            self.finished, self.at, self.target, self.x, self.masks = True, None, None, None, {}


class Passes(TargetHooks):
    """Forward pre-hooks that stop the running Pass at every target; passes started here are closed on exit."""

    pre = True

    def __init__(self, model: nn.Module, targets: dict[str, Target], hooks=None):
        super().__init__(targets)
        self.model, self.hooks = model, hooks
        self.device, self.keys = input_device(model), mask_keys(model, targets)
        self._running: dict[greenlet, Pass] = {}

    def start(self, batch, forward: Forward | None, deltas: dict | None = None) -> Pass:
        """A pass of `batch`, started by its first advance. `deltas`: the ΔW it runs with (DeltaHooks.set)."""
        p = Pass(self.model, batch, forward, deltas, self.keys, self.device)
        self._running[p.greenlet] = p
        return p

    def next_stop(self, passes: list[Pass]) -> str | None:
        """Advance every pass to its next stop; the target they all stopped at, or None when all have ended."""
        name = _UNSET
        for p in passes:
            p.advance(self.hooks)
            name = _agree(name, p)
        for p in passes:
            if p.finished:
                self._running.pop(p.greenlet, None)
        return name

    def close(self, passes: list[Pass]) -> None:
        """Unwind `passes` where they stand (their activations are freed); they are finished."""
        for p in passes:
            p.close()
            self._running.pop(p.greenlet, None)

    def __exit__(self, *exc):
        try:
            self.close(list(self._running.values()))
        finally:
            super().__exit__(*exc)
        return False

    def _hook(self, name: str, target: Target):
        def hook(module, args, kwargs):
            current = self._running.get(getcurrent())
            if current is None:  # a forward outside these passes
                return None
            current.stop(name, target, layer_input(args, kwargs))
            target.ensure_loaded()
            return None
        return hook


def stop_rows(name: str, passes: list[Pass], dtype: torch.dtype) -> list[torch.Tensor]:
    """The real rows of the input every pass stopped at (module `name`), which must be the same positions."""
    rows = [p.rows(dtype) for p in passes]
    if any(r.shape != rows[0].shape for r in rows):
        raise CalibrationError(f"layer {name}: the merged model's pass does not see the same positions as the task "
                               "model's; calibration must be deterministic teacher-forced passes.")
    return rows


_UNSET = object()


def _agree(name, p: Pass):
    """The stop of pass `p` (None when it ended), checked against the stop of the passes before it."""
    here = None if p.finished else p.at
    if name is _UNSET or here == name:
        return here
    if here is None or name is None:
        raise CalibrationError(f"a calibration pass ended without reaching layer {here or name}, which another pass "
                               "of the same merge reaches; calibration must be deterministic teacher-forced passes "
                               "(not sampling or generate()) that visit every adapted layer, or use "
                               "schedule='jacobi' for passes that differ between tasks.")
    raise CalibrationError(f"calibration passes reach the adapted layers in different orders ({name} vs {here}); "
                           "the passes of one batch must be deterministic, and the one-sweep schedule needs one order "
                           "for every batch: use schedule='jacobi'.")
