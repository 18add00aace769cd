"""The statistics IterIS solves from, one accumulator for both schedules (chapter 02 derives them).

For task i and one adapted layer, with X_i (rows, in) its inputs with LoRA i active and X̃_i the inputs at the same
positions through the merged model:

    S_i = X_iᵀX_i     P_i = X_iᵀX̃_i     Q_i = X̃_iᵀX̃_i     (in, in), summed batch by batch, and rows

S fixes λ_i and ‖X_iΔW_iᵀ‖² (objective.py), P and Q enter the closed form as C_i and G_i. At the first solve
X̃ = X and the three are one tensor. Only real rows enter (rows.py drops padding); rows are taken in float32 (or
gram_dtype) and the products summed with autocast off, whatever precision the model runs in.

Modules that read the same tensor in the same forward pass (q, k, v of one attention; gate and up of one MLP) form
a *group* and share one set of statistics: `InputSharing` is that rule, used by every pass of both schedules.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from .errors import CalibrationError
from .objective import shrink_off_diagonal
from .rows import lined_up
from .targets import Target


@dataclass
class Statistics:
    """S = XᵀX, P = XᵀX̃, Q = X̃ᵀX̃ (in_flat, in_flat) of one group of modules for one task, and the real rows
    summed. While every batch had X̃ = X, P and Q are the tensor S itself (one matrix held, not three)."""

    s: torch.Tensor | None = None
    p: torch.Tensor | None = None
    q: torch.Tensor | None = None
    rows: int = 0

    def add(self, x: torch.Tensor, x_tilde: torch.Tensor | None = None) -> None:
        """Add one batch: x (rows, in_flat) with the task's LoRA, x_tilde the same positions through the merged
        model (None: X̃ = X)."""
        same = x_tilde is None or torch.equal(x, x_tilde)
        with exact(x):
            s = x.T @ x
            p, q = (s, s) if same else (x.T @ x_tilde, x_tilde.T @ x_tilde)
        self.rows += x.shape[0]
        if self.s is None:
            self.s, self.p, self.q = s, p, q
            return
        if self.p is self.s and p is not s:  # X̃ ≠ X from this batch on: P and Q become tensors of their own
            self.p, self.q = self.s.clone(), self.s.clone()
        self.s += s
        if self.p is not self.s:
            self.p += p
            self.q += q

    def float64(self, shrink: float = 1.0) -> Statistics:
        """A float64 copy for the solve, the off-diagonal entries scaled by `shrink` (RegMean's regularizer, 1 for
        IterIS); P and Q stay S where they are S."""
        s = shrink_off_diagonal(self.s.double(), shrink)
        if self.p is self.s:
            return Statistics(s, s, s, self.rows)
        return Statistics(s, shrink_off_diagonal(self.p.double(), shrink), shrink_off_diagonal(self.q.double(), shrink),
                          self.rows)


@dataclass
class TaskStatistics:
    """One task's statistics per group (a tuple of the module names that share an input), in forward order.
    `gram`, `cross` and `rows` are the per-group views chapters 02–05 read: Q (= S at the first solve), P, rows."""

    groups: dict[tuple, Statistics] = field(default_factory=dict)

    def add(self, group: tuple, x: torch.Tensor, x_tilde: torch.Tensor | None = None) -> None:
        self.groups.setdefault(group, Statistics()).add(x, x_tilde)

    def group_of(self, name: str) -> tuple:
        for group in self.groups:
            if name in group:
                return group
        raise KeyError(name)

    @property
    def gram(self) -> dict[tuple, torch.Tensor]:
        return {g: st.q for g, st in self.groups.items()}

    @property
    def cross(self) -> dict[tuple, torch.Tensor]:
        return {g: st.p for g, st in self.groups.items()}

    @property
    def rows(self) -> dict[tuple, int]:
        return {g: st.rows for g, st in self.groups.items()}


Grams = TaskStatistics  # the name chapters 02–05 knew it by


class InputSharing:
    """The one sharing rule: a module joins the group of the module before it in the same pass when it reads the
    same tensor (same memory, shape, strides and dtype) seen as the same rows (row_signature)."""

    def __init__(self):
        self._x, self._signature = None, None

    def joins(self, x: torch.Tensor, target: Target) -> bool:
        signature = target.layer.row_signature
        joined = self._x is not None and same_tensor(self._x, x) and self._signature == signature
        self._x, self._signature = x, signature  # held until the next module: its memory cannot be reused meanwhile
        return joined


def same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    # `a` is still referenced, so its memory cannot have been reused: equal pointers mean the same data.
    return a is b or (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
                      and a.dtype == b.dtype)


def real_rows(name: str, target: Target, x: torch.Tensor, mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """The real rows of input x of module `name`, (rows, in_flat) in `dtype` (float32 or float64)."""
    x = x.detach()
    return target.layer.rows(x, lined_up(name, x, mask)).to(dtype)


def exact(x: torch.Tensor):
    """Autocast off on x's device: statistics and solves keep their own dtype under a caller's torch.autocast."""
    if torch.amp.is_autocast_available(x.device.type):
        return torch.autocast(x.device.type, enabled=False)
    return contextlib.nullcontext()


def check_reached(targets, seen, task: int | None = None) -> None:
    """Every target ran during calibration (`seen`: the names that did)."""
    missing = [name for name in targets if name not in seen]
    if missing:
        where = "" if task is None else f"task {task}: "
        raise CalibrationError(f"{where}layer {missing[0]} (and {len(missing) - 1} more) never ran during "
                               "calibration; does the forward pass reach the adapted modules?")


def check_statistics(task: int, layer: str, stats: Statistics) -> None:
    """A layer's statistics come from at least one real row and are finite."""
    if stats.rows == 0:
        raise CalibrationError(f"task {task}: no real tokens reached layer {layer}: the calibration batches are "
                               "empty or all padding.")
    if not all(bool(torch.isfinite(m).all()) for m in {id(m): m for m in (stats.s, stats.p, stats.q)}.values()):
        raise CalibrationError(f"task {task}: features of layer {layer} contain NaN or Inf; check the calibration "
                               "inputs and the model's dtype (fp16 overflow?).")


def check_coverage(stats: TaskStatistics, targets, task: int) -> None:
    """Every target ran and saw at least one real row, and the statistics are finite."""
    check_reached(targets, {name for group in stats.groups for name in group}, task)
    for group, st in stats.groups.items():
        check_statistics(task, group[0], st)
