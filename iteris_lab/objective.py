"""The IterIS objective of one layer and its closed-form solution (float64 throughout).

    min_W  Σ_i λ_i ‖X_i ΔW_iᵀ − X̃_i Wᵀ‖_F²
    W* = [Σ_i λ_i ΔW_i C_i] [Σ_i λ_i G_i]⁻¹,   C_i = X_iᵀX̃_i + α‖X_iᵀX̃_i‖_F·I,  G_i = X̃_iᵀX̃_i + α‖X̃_iᵀX̃_i‖_F·I

With ΔW_i = s_i B_i A_i the solution is exactly a LoRA of rank Σ r_i:
    W* = Σ_i B_i (s_i λ_i A_i C_i G⁻¹) = B_cat · A_new,   G = Σ_i λ_i G_i
so we solve G · A_newᵀ = [s_i λ_i C_iᵀ A_iᵀ]_i with Σ r_i right-hand sides, and every objective value
below is computed from the factors and the Grams, never from the raw features.

Chapter 01 (notebooks/01_objective.ipynb) derives every function here and checks it against autograd: the
objective and its closed form (section 2), the regularizer and what a large α tends to (section 4), λ (section 5),
the exact low-rank form (section 7); it also writes the whole method in ~30 lines of plain torch (section 0).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import get_args

import torch

from .adapters import LoraLayer
from .errors import SolveError
from .settings import LambdaVariant



@dataclass
class LayerProblem:
    """One layer's solve. Per task i: its LoRA (None if it does not adapt this layer), X_iᵀX̃_i, X̃_iᵀX̃_i
    (in, in, unregularized), and λ_i (times the user's weight of task i)."""

    name: str
    loras: list[LoraLayer | None]
    cross: list[torch.Tensor]
    gram: list[torch.Tensor]
    lambdas: list[float]
    rows: int  # real rows over all tasks
    shrunk: bool = False  # RegMean's off-diagonal shrink already makes the Gram definite

    @property
    def in_features(self) -> int:
        return self.gram[0].shape[0]


def regularize(m: torch.Tensor, alpha: float) -> torch.Tensor:
    """M + α‖M‖_F·I: the paper's regularizer, scaled to the size of M. Added to C_i and G_i alike, so a large α pulls
    W* towards Σλ_i‖C_i‖ΔW_i / Σλ_i‖G_i‖ (a weighted average of the task updates), not to zero (chapter 01, section 4)."""
    if alpha == 0:
        return m
    return m + alpha * torch.linalg.matrix_norm(m) * torch.eye(m.shape[0], dtype=m.dtype, device=m.device)


def shrink_off_diagonal(m: torch.Tensor, keep: float) -> torch.Tensor:
    """RegMean's own regularizer: off-diagonal entries scaled by `keep` ∈ [0, 1]."""
    if keep == 1:
        return m
    return keep * m + (1 - keep) * torch.diag_embed(torch.diagonal(m))


def output_energy(lora: LoraLayer, s: torch.Tensor) -> float:
    """‖X ΔWᵀ‖_F² = tr(ΔW S ΔWᵀ) from S = XᵀX, via the factors: s²·tr((BᵀB)(A S Aᵀ))."""
    B, A = _to(lora.factors(), s)
    return float(lora.scale ** 2 * torch.sum((B.T @ B) * (A @ s @ A.T)))


def adaptive_weight(lora: LoraLayer | None, s: torch.Tensor, w0: torch.Tensor, variant: LambdaVariant) -> float | None:
    """λ_i of one layer from S = X_iᵀX_i (features with LoRA i active); chapter 01, section 5, and chapter 02 (λ per
    layer on a real model).

    paper:    ‖ΔW_i‖_F² / ‖X_i ΔW_iᵀ‖_F²
    official: ‖W0 + ΔW_i‖_F² / ‖X_i (W0 + ΔW_i)ᵀ‖_F²   (HKUST-LongGroup/IterIS-merging)
    none:     1
    Returns None for the paper variant when the task does not adapt this layer (ΔW_i = 0).
    """
    if variant == "none":
        return 1.0
    if variant == "paper":
        if lora is None:
            return None
        B, A = _to(lora.factors(), s)
        num = lora.scale ** 2 * float(torch.sum((B.T @ B) * (A @ A.T)))
        den = output_energy(lora, s)
    elif variant == "official":
        w = w0.to(s) if lora is None else w0.to(s) + lora.delta().to(s)
        num, den = float(torch.sum(w * w)), float(torch.sum((w @ s) * w))
    else:
        raise ValueError(f"adaptive_weights must be one of {get_args(LambdaVariant)}, got {variant!r}")
    return num / den if den > 0 else 1.0


def solve(problem: LayerProblem, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The closed form as LoRA factors: (B_cat (out, Σr), A_new (Σr, in)), W* = B_cat @ A_new (chapter 01, sections 2
    and 7; chapter 03 solves one SmolLM2 layer by hand against it)."""
    if alpha == 0 and not problem.shrunk and problem.rows < problem.in_features:
        raise SolveError(f"layer {problem.name}: {problem.rows} calibration rows for {problem.in_features} inputs "
                         f"make Σλ_i X̃_iᵀX̃_i rank-deficient (its rank is at most {problem.rows}), so with alpha=0 the "
                         "closed form has no unique solution; use alpha > 0 (e.g. 1e-4) or more samples.")
    g = sum(lam * regularize(gram, alpha) for lam, gram in zip(problem.lambdas, problem.gram))
    # An input feature that is exactly 0 on every calibration row (a dead dimension, e.g. of a text encoder) has
    # a zero row and column in every Gram: W's column there is free, and 1 on the diagonal picks the minimum-norm
    # choice, 0.
    dead = g.diagonal() <= 0
    if dead.any():
        g = g + torch.diag(dead.to(g.dtype))
    chol, info = torch.linalg.cholesky_ex(g)
    if info.item() > 0:
        raise SolveError(_why_singular(problem, alpha))
    rhs, bs = [], []
    for lora, cross, lam in zip(problem.loras, problem.cross, problem.lambdas):
        if lora is None:
            continue
        B, A = _to(lora.factors(), g)
        rhs.append(regularize(cross, alpha).T @ (lora.scale * lam * A.T))  # C_iᵀ (s_i λ_i A_i)ᵀ, (in, r_i)
        bs.append(B)
    a_new = torch.cholesky_solve(torch.cat(rhs, dim=1), chol).T
    return torch.cat(bs, dim=1), a_new


def _why_singular(problem: LayerProblem, alpha: float) -> str:
    """Why Cholesky failed: what is rank-deficient, and the fix that helps (alpha only where it would)."""
    from .measure import numerical_rank

    g = sum(lam * gram for lam, gram in zip(problem.lambdas, problem.gram))  # unregularized (in, in)
    where, n = f"layer {problem.name}: Σλ_i X̃_iᵀX̃_i", problem.in_features
    if alpha == 0:
        rank = numerical_rank(g.float())  # the statistics are float32 sums unless gram_dtype="float64"
        return (f"{where} has numerical rank {rank} of {n}: the calibration features span only {rank} directions "
                "(repeated or collinear tokens), so with alpha=0 the closed form has no unique solution; use "
                "alpha > 0 (e.g. 1e-4) or more varied samples.")
    lowest = float(torch.linalg.eigvalsh(g)[0] / torch.linalg.matrix_norm(g).clamp_min(1e-300))
    return (f"{where} is not positive definite even with alpha={alpha:g}: its smallest eigenvalue is {lowest:.1e}·‖G‖_F, "
            "below what the regularizer adds, so the statistics themselves are off (summed with too little precision: "
            "a half-precision model, or float32 sums of many rows). Use gram_dtype='float64', or merge with the "
            "model in float32.")


def objective(problem: LayerProblem, B: torch.Tensor, A: torch.Tensor, energies: list[float]) -> list[float]:
    """‖X_i ΔW_iᵀ − X̃_i Wᵀ‖_F² per task for W = B @ A (unregularized, λ not applied).

    = ‖X_iΔW_iᵀ‖² − 2 s_i tr(Bᵀ B_i · A_i P_i Aᵀ) + tr(BᵀB · A Q_i Aᵀ), with P_i = X_iᵀX̃_i, Q_i = X̃_iᵀX̃_i.
    """
    btb = B.T @ B
    values = []
    for lora, p, q, energy in zip(problem.loras, problem.cross, problem.gram, energies):
        value = energy + float(torch.sum(btb * (A @ q @ A.T)))
        if lora is not None:
            Bi, Ai = _to(lora.factors(), B)
            value -= 2 * lora.scale * float(torch.trace((B.T @ Bi) @ (Ai @ p @ A.T)))
        values.append(max(value, 0.0))
    return values


def _to(tensors, like: torch.Tensor):
    return tuple(t.to(device=like.device, dtype=like.dtype) for t in tensors)
