"""The one-sweep schedule: the fixed point of the IterIS iteration in one forward pass per batch and role
(chapter 03 compares it with the Jacobi loop).

In a forward pass a module's input depends only on modules that already ran. Every calibration batch of task i
runs twice side by side (passes.py): with LoRA i active (its inputs are X_i) and through the merged model (X̃_i).
Every pass stops at the input of each adapted module. When all have stopped at module m, every module upstream of
m is already final, so

    S_i = X_iᵀX_i,   P_i = X_iᵀX̃_i,   Q_i = X̃_iᵀX̃_i     (summed over task i's batches, statistics.py)

are exactly the statistics the Jacobi loop sees at its fixed point; m is solved, its merged ΔW is switched on
(deltas.DeltaHooks), and the passes go on to the next module. Modules that read the tensor the previous one read
(q, k, v; gate, up) reuse its statistics. After the last module every layer holds the solution the Jacobi loop
reaches after J solves (J = the depth of the chain of adapted modules), for the price of two forward passes.

Memory: the live activations of every pass at the current depth, as GPTQ-style layer-wise calibrators hold the
inputs of the current block for every sample (tokens × a few hidden-wide tensors, twice), plus S, P, Q of one
module at a time for each task: not the statistics of every module, which Jacobi and RegMean hold.

The sweep needs every pass to reach the adapted modules once each, in one order. A module that runs twice in one
pass (shared weights, a loop inside forward=) is refused with a CalibrationError: use schedule="jacobi" there.
Once the last module is solved, the rest of a forward pass (an LM head and its logits, for instance) computes
nothing the merge needs, so the passes are closed there; one pass of the first batch runs start to end before
the sweep, to check that no adapted module runs twice.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .plumbing.deltas import DeltaHooks
from .errors import CalibrationError
from .plumbing.passes import Forward, Passes, stop_rows
from .statistics import Statistics, check_reached, check_statistics
from .targets import Target


@dataclass
class SweepTask:
    """What the sweep runs for one task: its batches, its forward function, and its LoRA per module name."""

    batches: list
    forward: Forward | None
    deltas: dict


# solve(name, statistics per task, shared) -> the merged ΔW of module `name` (anything DeltaHooks.set accepts);
# shared: the statistics are those of the previous call (the module reads the previous module's input).
Solve = Callable[[str, list[Statistics], bool], object]


def one_sweep(model, targets: dict[str, Target], tasks: list[SweepTask], solve: Solve,
              dtype: torch.dtype = torch.float32, on_solved: Callable[[str], None] | None = None) -> dict:
    """Run the sweep; returns {name: the merged ΔW solve() returned} for every target."""
    merged: dict = {}
    with torch.no_grad(), DeltaHooks(targets) as hooks, Passes(model, targets, hooks) as passes:
        _check_each_layer_runs_once(passes, tasks[0])
        pairs = [(i, passes.start(batch, task.forward, task.deltas), passes.start(batch, task.forward, merged))
                 for i, task in enumerate(tasks) for batch in task.batches]
        every = [p for _, own, through_merged in pairs for p in (own, through_merged)]
        stats = None
        while len(merged) < len(targets) and (name := passes.next_stop(every)) is not None:
            if name in merged:
                raise CalibrationError(_TWICE.format(name=name))
            shared = stats is not None and all(p.shared for p in every)
            if not shared:
                stats = [Statistics() for _ in tasks]
                for i, own, through_merged in pairs:  # one pair at a time: its rows are dropped once summed
                    stats[i].add(*stop_rows(name, [own, through_merged], dtype))
                for i, st in enumerate(stats):
                    check_statistics(i, name, st)
            merged[name] = solve(name, stats, shared)
            if on_solved is not None:
                on_solved(name)
    # the passes are closed where they stand after the last layer (Passes' exit): the rest of a forward pass (an
    # LM head and its logits) computes nothing the merge needs
    check_reached(targets, merged)
    return merged


_TWICE = ("layer {name} runs more than once in one forward pass (shared weights, or a loop in forward=); the "
          "one-sweep schedule needs each adapted layer to run once per pass: use schedule='jacobi'.")


def _check_each_layer_runs_once(passes: Passes, task: SweepTask) -> None:
    """One pass of the first batch, start to end, before the sweep: no adapted layer may run twice in it. (The
    sweep's own passes end at the last adapted layer, where they could no longer see a layer run again.)"""
    probe, seen = passes.start(task.batches[0], task.forward, task.deltas), set()
    while (name := passes.next_stop([probe])) is not None:
        if name in seen:
            raise CalibrationError(_TWICE.format(name=name))
        seen.add(name)
