"""Features: one task's statistics over its calibration batches (chapter 02 captures them by hand).

    gram_pass    the model as it is now: S = XᵀX (P and Q are S)           the first Jacobi solve, RegMean
    paired_pass  each batch twice, side by side: with the task's LoRA (X) and through the merged model (X̃),
                 in lockstep, so each group's S, P, Q are summed at its stop and no feature is kept

Statistics are summed batch by batch (statistics.py), so memory does not grow with the number of samples. Modules
that read one input tensor share one set of statistics (statistics.InputSharing), keyed by the tuple of their names.
"""
from __future__ import annotations

import torch

from .plumbing.passes import Forward, Passes, stop_rows
from .statistics import TaskStatistics
from .targets import Target


def gram_pass(model, targets: dict[str, Target], batches, forward: Forward | None = None,
              dtype: torch.dtype = torch.float32) -> TaskStatistics:
    """Statistics of the model as it is now (X̃ = X): every group's S = XᵀX, its P and Q being S itself."""
    return _collect(model, targets, batches, forward, None, [None], dtype)


def paired_pass(model, targets: dict[str, Target], batches, hooks, task_deltas: dict, merged_deltas: dict,
                forward: Forward | None = None, dtype: torch.dtype = torch.float32) -> TaskStatistics:
    """S = XᵀX, P = XᵀX̃ and Q = X̃ᵀX̃: each batch runs with `task_deltas` active (X) and with `merged_deltas`
    active (X̃) in `hooks` (deltas.DeltaHooks)."""
    return _collect(model, targets, batches, forward, hooks, [task_deltas, merged_deltas], dtype)


def _collect(model, targets, batches, forward, hooks, roles: list, dtype) -> TaskStatistics:
    """Run every batch once per role (a dict of ΔW, or None: as the model is), all roles side by side, and sum each
    group's rows when the group ends (the next stop is another group, or the pass ends)."""
    stats = TaskStatistics()
    with torch.no_grad(), Passes(model, targets, hooks) as passes:
        for batch in batches:
            unit = [passes.start(batch, forward, deltas) for deltas in roles]
            group, rows = [], None
            while (name := passes.next_stop(unit)) is not None:
                if group and all(p.shared for p in unit):
                    group.append(name)
                    continue
                if group:
                    stats.add(tuple(group), *rows)
                group, rows = [name], stop_rows(name, unit, dtype)
            if group:
                stats.add(tuple(group), *rows)
    return stats
