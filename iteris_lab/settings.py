"""MergeSettings: every choice of a merge, typed and checked before any work starts.

merge_loras(model, adapters, calibration, **keywords) builds MergeSettings(**keywords); settings=MergeSettings(...)
passes one set of choices around whole. `resolved(n)` is what the loop runs with: RegMean is one solve with λ = 1
and α = 0 (chapter 01), the sweep is one pass (chapter 03), and the per-task weights get their default.

This file imports no torch: the command line reads its choices (the `Literal`s) and defaults from here, and
`iteris-lab --help` stays fast.
"""
from __future__ import annotations

import difflib
import math
import numbers
from dataclasses import asdict, dataclass, fields, replace
from typing import Literal, Sequence, get_args

from .errors import IterisError

Method = Literal["iteris", "regmean", "linear", "task_arithmetic", "ties", "dare_linear", "dare_ties",
                 "magnitude_prune", "cat"]
Schedule = Literal["sweep", "jacobi"]
LambdaVariant = Literal["official", "paper", "none"]
ModulePolicy = Literal["error", "intersection", "union"]
GramDtype = Literal["float32", "float64"]
METHODS = get_args(Method)
SOLVED = ("iteris", "regmean")  # the methods that need calibration data; the others are data-free (baselines.py)
JACOBI_SOLVES = 10  # max_iter when schedule="jacobi" and none is given
_RANGES = {  # the numbers checked up front: name -> (test, what the value must be)
    "alpha": (lambda v: v >= 0, "a finite number >= 0 (the paper uses <= 1e-4)"),
    "density": (lambda v: 0 < v <= 1, "in (0, 1] (the kept fraction of each ΔW_i)"),
    "regmean_shrink": (lambda v: 0 <= v <= 1, "in [0, 1] (1 keeps the Grams as they are)"),
    "tol": (lambda v: v >= 0, "None (run every solve) or a number >= 0"),
}
_COUNTS = ("max_iter", "max_length", "batch_size")  # whole numbers >= 1 (or None: the default)


def is_number(value) -> bool:
    """A finite real number (bool excluded): what every numeric setting and config entry must be."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class MergeSettings:
    """method:      "iteris" | "regmean" | "linear" | "task_arithmetic" | "ties" | "dare_linear" | "dare_ties" |
                 "magnitude_prune" | "cat".
    schedule:    (iteris) "sweep" (default): the fixed point of the paper's loop in one pass — each layer solved
                 as soon as the merged model's inputs for it exist (iteris_lab.sweep); what Jacobi reaches after J
                 solves on a chain of J adapted layers, exactly, at about twice the cost of RegMean.
                 "jacobi": the paper's loop, `max_iter` solves of every layer, each from a fresh pass of the
                 previous merge (to reproduce the paper, or to watch the iterations converge).
    max_iter:    number of solves (schedule="jacobi" only; None: 10). Given with the sweep it is refused: the
                 sweep has no iterations to count. alpha: α of α‖M‖_F·I on C_i and G_i (iteris).
    adaptive_weights: λ_i variant: "official" (default, as the authors' code: W0 + ΔW_i in both norms),
                 "paper" (ΔW_i only) or "none".
    weights:     the user's weight of each task: a multiplier on λ_i for iteris and regmean (the official code's
                 manual coefficients), the mixing weight for the data-free methods (default 1/N for linear,
                 1 otherwise).
    density:     kept fraction for ties / dare / magnitude_prune. regmean_shrink: RegMean's off-diagonal
                 scale in [0, 1] (method="regmean" only; alpha is not used there).
    modules:     the policy when adapters adapt different modules: "error" (default), "intersection" or "union"
                 (a task that does not adapt a layer asks for ΔW = 0 there).
    tol:         stop early when every layer's relative change falls below tol (schedule="jacobi" only).
    seed:        DARE's random drops.
    max_length, batch_size, chat_template: how calibration given as texts is tokenized (iteris_lab.io.calibration
                 .tokenize): each text truncated to max_length tokens (None: 128, or the model's learned
                 positions when fewer; a larger max_length is clamped to them with a warning), batch_size texts per
                 batch, and with chat_template=True each text wrapped as a user turn of the tokenizer's chat
                 template (how instruct LoRAs are trained). Unused when the calibration is already batches.
    gram_dtype:  "float32" (default) or "float64": the precision the statistics XᵀX̃ are summed in. Solves are
                 always float64; float64 statistics matter when α is tiny (≤ 1e-6) and a layer sees fewer
                 rows than inputs (rank-deficient Grams, the paper's Flan-T5 setting).
    """

    method: Method = "iteris"
    schedule: Schedule = "sweep"
    max_iter: int | None = None
    alpha: float = 1e-4
    adaptive_weights: LambdaVariant = "official"
    density: float = 0.5
    regmean_shrink: float = 0.9
    modules: ModulePolicy = "error"
    tol: float | None = None
    seed: int = 0
    gram_dtype: GramDtype = "float32"
    weights: Sequence[float] | None = None
    max_length: int | None = None
    batch_size: int = 8
    chat_template: bool = False

    @classmethod
    def from_keywords(cls, keywords: dict, also: Sequence[str] = ()) -> "MergeSettings":
        """MergeSettings(**keywords), with an unknown name refused by an IterisError that suggests the closest valid
        one (among the fields and `also`, the caller's other parameters) instead of a bare TypeError."""
        names = [f.name for f in fields(cls)]
        for key in keywords:
            if key not in names:
                close = difflib.get_close_matches(key, [*names, *also], n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise IterisError(f"unknown setting {key!r}; {hint}valid settings: {', '.join(names)}.")
        return cls(**keywords)

    def __post_init__(self):
        for name, allowed in (("method", Method), ("schedule", Schedule), ("adaptive_weights", LambdaVariant),
                              ("modules", ModulePolicy)):
            value, choices = getattr(self, name), get_args(allowed)
            if value not in choices:
                raise IterisError(f"unknown {name} {value!r}; choose one of {', '.join(choices)}.")
        dtype = str(self.gram_dtype).removeprefix("torch.")  # torch.float64 is accepted too
        if dtype not in get_args(GramDtype):
            raise IterisError(f"gram_dtype must be one of {get_args(GramDtype)}, got {self.gram_dtype!r}.")
        object.__setattr__(self, "gram_dtype", dtype)
        for name in _COUNTS:
            value = getattr(self, name)
            if value is None and name in ("max_length", "max_iter"):
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise IterisError(f"{name} must be a whole number >= 1, got {value!r}.")
        if not isinstance(self.chat_template, bool):
            raise IterisError(f"chat_template must be True or False, got {self.chat_template!r}.")
        for name, (in_range, what) in _RANGES.items():
            value = getattr(self, name)
            if not (value is None and name == "tol") and not (is_number(value) and in_range(value)):
                raise IterisError(f"{name} must be {what}, got {value!r}.")
        if self.weights is not None:
            object.__setattr__(self, "weights", self._checked_weights(self.weights))
        given = [f"{n}={getattr(self, n)!r}" for n in ("max_iter", "tol") if getattr(self, n) is not None]
        if self.method == "iteris" and self.schedule == "sweep" and given:
            verb = "count" if len(given) > 1 else "counts"
            raise IterisError(f"{' and '.join(given)} {verb} the solves of schedule='jacobi' (the paper's loop); the "
                              "sweep, the default schedule, reaches that loop's fixed point in one pass and has no "
                              "solves to count. Pass schedule='jacobi' to run the loop, or leave them out.")

    def _checked_weights(self, weights) -> tuple[float, ...]:
        if isinstance(weights, (str, bytes)) or not hasattr(weights, "__len__"):
            raise IterisError(f"weights must be a list of numbers, one per adapter; got {weights!r}.")
        if not all(is_number(w) for w in weights):
            raise IterisError(f"weights must be finite numbers, got {list(weights)}.")
        weights = tuple(float(w) for w in weights)
        if not any(weights):
            raise IterisError(f"all weights are 0 ({list(weights)}): the merge would be ΔW = 0, the base model. "
                              "Give at least one adapter a non-zero weight.")
        if self.method in SOLVED and min(weights) < 0:
            raise IterisError(f"weights multiply the per-task terms λ_i of the {self.method} objective and must be "
                              f">= 0, got {list(weights)}; for task negation use method='task_arithmetic'.")
        return weights

    @property
    def gram_torch_dtype(self):
        """gram_dtype as a torch.dtype."""
        import torch  # here, not at the top: the command line reads this file without torch

        return getattr(torch, self.gram_dtype)

    @property
    def shrink(self) -> float:
        """The off-diagonal scale applied to every statistic: RegMean's own regularizer, 1 for the other methods."""
        return self.regmean_shrink if self.method == "regmean" else 1.0

    def resolved(self, n_tasks: int) -> MergeSettings:
        """The settings the merge of `n_tasks` adapters runs with (these are recorded in MergeResult.settings)."""
        weights = self.weights
        if weights is None:
            weights = (1.0 / n_tasks if self.method == "linear" else 1.0,) * n_tasks
        elif len(weights) != n_tasks:
            raise IterisError(f"got {len(weights)} weights for {n_tasks} adapters; give one weight per adapter.")
        settings = replace(self, weights=weights)
        if self.method == "regmean":
            settings = replace(settings, max_iter=1, adaptive_weights="none", alpha=0.0, schedule="jacobi")
        elif settings.schedule == "jacobi" and settings.max_iter is None:
            settings = replace(settings, max_iter=JACOBI_SOLVES)
        return settings

    def record(self) -> dict:
        """The settings as a JSON-ready dict (weights as a list)."""
        record = asdict(self)
        record["weights"] = None if self.weights is None else list(self.weights)
        return record

