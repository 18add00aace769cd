"""The one-sweep schedule: the fixed point of the IterIS iteration in one forward pass per batch and role.

In a forward pass a module's input depends only on modules that already ran. Every calibration batch of task i
runs twice side by side, each in its own thread: with LoRA i active (its inputs are X_i) and through the merged
model (X̃_i). The threads take turns, only one running at a time, and every one of them stops at the input of
each adapted module. When all have stopped at module m, every module upstream of m is already final, so

    S_i = X_iᵀX_i,   P_i = X_iᵀX̃_i,   Q_i = X̃_iᵀX̃_i     (summed over task i's batches)

are exactly the statistics the Jacobi loop sees at its fixed point; m is solved, its merged ΔW is switched on
(deltas.DeltaHooks), and the passes go on to the next module. Modules that read the tensor the previous one read
(q, k, v; gate, up) reuse its statistics. After the last module every layer holds the solution the Jacobi loop
reaches after J solves (J = the depth of the chain of adapted modules), for the price of two forward passes.

Memory: the live activations of every pass at the current depth, as GPTQ-style layer-wise calibrators hold the
inputs of the current block for every sample (about tokens × hidden × a few floats, twice), plus S, P, Q of one
module at a time for each task: not the statistics of every module, which Jacobi and RegMean hold.

The sweep needs every pass to reach the adapted modules once each, in one order. A module that runs twice in one
pass (shared weights, a loop inside forward=) is refused with a CalibrationError: use schedule="jacobi" there.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable

import torch

from .deltas import DeltaHooks
from .errors import CalibrationError
from .features import Forward, check_reached, check_statistics, input_device, run_forward, same_tensor, to_device
from .rows import batch_masks, lined_up, mask_keys
from .targets import Target, TargetHooks, layer_input


@dataclass
class Stats:
    """One module's statistics for one task, summed over the task's batches (in_flat, in_flat)."""

    task: torch.Tensor  # S = XᵀX: features with the task's own LoRA
    cross: torch.Tensor  # P = XᵀX̃
    gram: torch.Tensor  # Q = X̃ᵀX̃: features of the merged model
    rows: int


@dataclass
class SweepTask:
    """What the sweep runs for one task: its batches, its forward function, and its LoRA per module name."""

    batches: list
    forward: Forward | None
    deltas: dict


Solve = Callable[[str, list[Stats]], object]


def one_sweep(model, targets: dict[str, Target], tasks: list[SweepTask], solve: Solve,
              dtype: torch.dtype = torch.float32, on_solved: Callable[[str], None] | None = None) -> dict:
    """Run the sweep. `solve(name, stats per task)` returns the merged ΔW of module `name` (anything
    DeltaHooks.set accepts); returns {name: that ΔW} for every target."""
    merged: dict = {}
    turn = threading.local()
    device, keys = input_device(model), mask_keys(model, targets)
    pairs = []  # (task index, pass with the task's LoRA, pass through the merged model)
    for i, task in enumerate(tasks):
        for batch in task.batches:
            batch = to_device(batch, device)
            masks = batch_masks(batch, keys)
            pairs.append((i, *(_Pass(model, batch, task.forward, deltas, masks, dtype, turn)
                               for deltas in (task.deltas, merged))))
    passes = [p for _, own, through_merged in pairs for p in (own, through_merged)]
    with DeltaHooks(targets) as hooks, _Stops(targets, turn):
        try:
            for p in passes:
                p.start()
            stats = None
            while True:
                name, stats = _next_stop(pairs, hooks, merged, stats, len(tasks))
                if name is None:
                    break
                merged[name] = solve(name, stats)
                if on_solved is not None:
                    on_solved(name)
        finally:
            for p in passes:
                p.end()
    check_reached(targets, merged)
    return merged


def _next_stop(pairs, hooks: DeltaHooks, merged: dict, previous: list[Stats] | None, n_tasks: int):
    """Let every pass run to its next stop, pair by pair; returns the module they all stopped at and its statistics
    (None, None when every pass has ended). A pair's rows are summed as soon as both of its passes stop, so no
    copy of the features is held; modules that read the previous module's input reuse its statistics."""
    sums: list[Stats | None] = [None] * n_tasks
    name, deferred = _UNSET, []
    for i, own, other in pairs:
        for p in (own, other):
            if not p.finished:
                hooks.set(p.deltas)
                p.advance()
            name = _agree(name, p, i, merged)
        if name is None:
            continue
        if previous is not None and own.shared and other.shared:
            deferred.append((i, own, other))
        else:
            _add(sums, i, own, other, name)
    if name is None:
        return None, None
    if len(deferred) == len(pairs):
        return name, previous
    for i, own, other in deferred:
        _add(sums, i, own, other, name)
    for i, stats in enumerate(sums):
        check_statistics(i, name, stats.rows, stats.task, stats.cross, stats.gram)
    return name, sums


_UNSET = object()


def _agree(name, p: "_Pass", task: int, merged: dict):
    """The stop of pass `p` (None when it ended), checked against the stop of the passes before it."""
    here = None if p.finished else p.at
    if name is _UNSET:
        if here is not None and here in merged:
            raise CalibrationError(f"layer {here} runs more than once in one forward pass (shared weights, or a loop "
                                   "in forward=); the one-sweep schedule needs each adapted layer to run once per "
                                   "pass: use schedule='jacobi'.")
        return here
    if here == name:
        return name
    if here is None or name is None:
        raise CalibrationError(f"a calibration pass ended without reaching layer {here or name}, which other passes "
                               f"reach (task {task}); every pass must visit every adapted layer, or use "
                               "schedule='jacobi'.")
    raise CalibrationError(f"calibration passes reach the adapted layers in different orders ({name} vs {here}); "
                           "the one-sweep schedule needs one order: use schedule='jacobi'.")


def _add(sums: list, i: int, own: "_Pass", other: "_Pass", name: str) -> None:
    """Add one batch's S = XᵀX, P = XᵀX̃, Q = X̃ᵀX̃ to task i's sums."""
    x, x_tilde = own.rows(), other.rows()
    if x.shape != x_tilde.shape:
        raise CalibrationError(f"layer {name}: the merged model's pass does not see the same positions as the "
                               "task model's; calibration must be deterministic teacher-forced passes.")
    s = x.T @ x
    p, q = (s, s) if torch.equal(x, x_tilde) else (x.T @ x_tilde, x_tilde.T @ x_tilde)
    if sums[i] is None:
        sums[i] = Stats(s, p.clone() if p is s else p, q.clone() if q is s else q, x.shape[0])
    else:
        sums[i].task += s
        sums[i].cross += p
        sums[i].gram += q
        sums[i].rows += x.shape[0]


class _Aborted(BaseException):
    """Raised inside a stopped pass to unwind it when the sweep ends early."""


class _Pass:
    """One forward pass of one batch in its own thread; it stops at the input of every target and waits for its
    turn. Only one pass runs at a time (the scheduler hands over the turn and waits for the next stop)."""

    def __init__(self, model, batch, forward, deltas: dict, masks: dict, dtype: torch.dtype, turn: threading.local):
        self.model, self.batch, self.forward, self.deltas = model, batch, forward, deltas
        self.masks, self.dtype, self._turn_local = masks, dtype, turn
        self.at: str | None = None  # the target it stopped at
        self.shared = False  # that target reads the tensor the previous stop's target read
        self._input, self._target = None, None
        self.finished, self.error, self._abort = False, None, False
        self._go, self._stopped = threading.Semaphore(0), threading.Semaphore(0)
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        self._device = torch.cuda.current_device() if cuda else None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def advance(self) -> None:
        """Let the pass run until its next stop or its end (called by the scheduler)."""
        self._go.release()
        self._stopped.acquire()
        if self.error is not None:
            raise self.error

    def stop(self, name: str, target: Target, x: torch.Tensor) -> None:
        """Called in the pass's thread at the input `x` of `name`: note where it is, wait for the next turn."""
        self.shared = (self._input is not None and same_tensor(self._input, x)
                       and self._target.layer.row_signature == target.layer.row_signature)
        self.at, self._input, self._target = name, x, target
        self._stopped.release()
        self._go.acquire()
        if self._abort:
            raise _Aborted

    def rows(self) -> torch.Tensor:
        """The real rows of the input the pass stopped at, (rows, in_flat) in the statistics' dtype."""
        x = self._input.detach()
        return self._target.layer.rows(x, lined_up(self.at, x, self.masks.get(self.at))).to(self.dtype)

    def end(self) -> None:
        """Unwind the pass if it is still stopped somewhere, and wait for its thread."""
        if self._thread.ident is None:  # never started
            return
        if not self.finished:
            self._abort = True
            self._go.release()
            self._stopped.acquire()
        self._thread.join()

    def _run(self) -> None:
        self._turn_local.current = self
        self._go.acquire()
        try:
            if not self._abort:
                if self._device is not None:
                    torch.cuda.set_device(self._device)
                with torch.no_grad():  # grad mode is per thread
                    run_forward(self.model, self.batch, self.forward)
        except _Aborted:
            pass
        except BaseException as err:  # handed to the scheduler's thread by advance()
            self.error = err
        finally:
            self.finished, self.at, self._input = True, None, None
            self._stopped.release()


class _Stops(TargetHooks):
    """Forward pre-hooks that stop the pass running in the current thread at every target's input."""

    pre = True

    def __init__(self, targets: dict[str, Target], turn: threading.local):
        super().__init__(targets)
        self.turn = turn

    def _hook(self, name: str, target: Target):
        def hook(module, args, kwargs):
            current = getattr(self.turn, "current", None)
            if current is None:  # a forward outside the sweep's passes
                return None
            current.stop(name, target, layer_input(args, kwargs))
            target.ensure_loaded()
            return None
        return hook
