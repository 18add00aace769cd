"""Data-free baselines, merged on the dense task deltas ΔW_i = s_i B_i A_i (never on A and B separately:
averaging the factors is not averaging the deltas).

linear          Σ w_i ΔW_i with w_i = 1/N by default (the weighted average)
task_arithmetic Σ w_i ΔW_i with w_i = 1 by default (scale with `weights`)
cat             the same sum kept as an exact LoRA of rank Σ r_i (concatenated factors)
ties, dare_linear, dare_ties, magnitude_prune   peft.utils.merge_utils on the stacked ΔW_i
"""
from __future__ import annotations

import torch
from peft.utils import merge_utils

from .adapters import LoraLayer

EXACT = ("linear", "task_arithmetic", "cat")
PRUNED = {
    "ties": lambda t, w, d: merge_utils.ties(t, w, d, majority_sign_method="total"),
    "dare_linear": merge_utils.dare_linear,
    "dare_ties": lambda t, w, d: merge_utils.dare_ties(t, w, d, majority_sign_method="total"),
    "magnitude_prune": merge_utils.magnitude_prune,
}
DATA_FREE = EXACT + tuple(PRUNED)


def merge_layer(method: str, loras: list[LoraLayer | None], shape: tuple[int, int], weights: list[float],
                density: float) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """One layer's merged ΔW (out, in_flat) float64, and its exact LoRA factors (B, A) when it has them.

    Randomness (DARE) comes from torch's global generator: seed it before calling.
    """
    if method in EXACT:
        bs, as_ = [], []
        for lora, w in zip(loras, weights):
            if lora is not None:
                B, A = lora.factors()
                bs.append(w * lora.scale * B)
                as_.append(A)
        B, A = torch.cat(bs, dim=1), torch.cat(as_, dim=0)
        return B @ A, (B, A)
    deltas = [torch.zeros(shape, dtype=torch.float64) if lora is None else lora.delta() for lora in loras]
    merged = PRUNED[method](deltas, torch.tensor(weights, dtype=torch.float64), density)
    return merged, None
