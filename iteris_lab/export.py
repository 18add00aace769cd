"""Writing a merge as a PEFT LoRA folder that PeftModel.from_pretrained loads.

The scale is baked into the factors (lora_alpha = r for every module, use_rslora false), per-module ranks go in
rank_pattern/alpha_pattern. Exact factors are used when the merge has them (IterIS, RegMean, linear, cat: rank
Σ r_i); otherwise, or when a smaller rank is asked for, a truncated SVD ΔW ≈ U_r S_r V_rᵀ with
B = U_r S_r^½ and A = S_r^½ V_rᵀ, reporting the relative Frobenius error.
"""
from __future__ import annotations

import json
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from .errors import ExportError
from .targets import LayerInfo


@dataclass
class ExportReport:
    """Where the adapter went, its rank per module and ‖ΔW − B·A‖_F / ‖ΔW‖_F per module."""

    path: str
    ranks: dict[str, int]
    relative_error: dict[str, float]

    @property
    def max_relative_error(self) -> float:
        return max(self.relative_error.values())


def truncate(delta: torch.Tensor, rank: int | None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-`rank` factors of a (out, in) matrix by SVD; rank None keeps the numerical rank."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    if rank is None:
        rank = max(1, int((s > s[0] * 1e-10).sum())) if s.numel() and s[0] > 0 else 1
    rank = min(rank, s.numel())
    root = s[:rank].sqrt()
    total = float(s.square().sum())
    error = (float(s[rank:].square().sum()) / total) ** 0.5 if total > 0 else 0.0
    return u[:, :rank] * root, root[:, None] * vh[:rank], error


def lora_factors(deltas: dict[str, torch.Tensor], exact: dict, layers: dict[str, LayerInfo], rank: int | None):
    """{name: (B (out, r), A (r, in_flat), relative error)} for every merged module."""
    out = {}
    for name, delta in deltas.items():
        matrix = delta.reshape(layers[name].matrix_shape()) if layers[name].kind == "conv2d" else delta
        if rank is None and name in exact:
            B, A = exact[name]
            out[name] = (B, A, 0.0)
        else:
            out[name] = truncate(matrix, rank)
    return out


def write_adapter(directory, factors: dict, layers: dict[str, LayerInfo], base_model: str | None = None,
                  overwrite: bool = False) -> ExportReport:
    """Write adapter_config.json + adapter_model.safetensors atomically (a temporary folder, then a rename)."""
    directory = Path(directory)
    if directory.exists() and not overwrite:
        raise ExportError(f"{directory} already exists; pass overwrite=True to replace it.")
    tensors, ranks = {}, {}
    for name, (B, A, _) in factors.items():
        info, r = layers[name], A.shape[0]
        if info.kind == "conv2d":
            A = A.reshape((r,) + info.weight_shape[1:])
            B = B.reshape(info.out_features, r, 1, 1)
        tensors[f"base_model.model.{name}.lora_A.weight"] = A.float().contiguous().cpu()
        tensors[f"base_model.model.{name}.lora_B.weight"] = B.float().contiguous().cpu()
        ranks[name] = r
    top = max(ranks.values())
    config = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model,
        "r": top, "lora_alpha": top, "use_rslora": False, "lora_dropout": 0.0, "bias": "none",
        "target_modules": sorted(ranks),
        "rank_pattern": {re.escape(n): r for n, r in ranks.items() if r != top},
        "alpha_pattern": {re.escape(n): r for n, r in ranks.items() if r != top},
        "fan_in_fan_out": any(layers[n].kind == "conv1d" for n in ranks),
        "init_lora_weights": True, "inference_mode": True,
    }
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        (staging / "adapter_config.json").write_text(json.dumps(config, indent=2))
        save_file(tensors, str(staging / "adapter_model.safetensors"))
        if directory.exists():
            shutil.rmtree(directory)
        staging.rename(directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ExportReport(str(directory), ranks, {n: f[2] for n, f in factors.items()})
