"""Writing a merge as a PEFT LoRA folder that PeftModel.from_pretrained loads.

The scale is baked into the factors (lora_alpha = r for every module, use_rslora false), per-module ranks go in
rank_pattern/alpha_pattern. Exact factors are used when the merge has them (IterIS, RegMean, linear, cat: rank
Σ r_i); otherwise, or when a smaller rank is asked for, a truncated SVD ΔW ≈ U_r S_r V_rᵀ with
B = U_r S_r^½ and A = S_r^½ V_rᵀ, reporting the relative Frobenius error.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import ExportError
from ..targets import LinearLayer
from .destination import ADAPTER_FILES, REPORT_FILES, check_destination, recover, replace_folder, write_folder

__all__ = ["ExportReport", "truncate", "lora_factors", "lora_tensors", "write_adapter", "check_finite",
           "check_destination", "recover", "replace_folder"]  # the last three: io/destination.py


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


def lora_factors(deltas: dict[str, torch.Tensor], exact: dict, layers: dict[str, LinearLayer], rank: int | None):
    """{name: (B (out, r), A (r, in_flat), relative error)} for every merged module: the exact factors when the
    merge has them and rank is None, else the truncated SVD (rank None: the numerical rank)."""
    if rank is not None and rank < 1:
        raise ValueError(f"rank must be a positive integer or None, got {rank!r}.")
    out = {}
    for name, delta in deltas.items():
        matrix = delta.reshape(layers[name].matrix_shape())
        if rank is None and name in exact:
            B, A = exact[name]
            out[name] = (B, A, 0.0)
        else:
            out[name] = truncate(matrix, rank)
    return out


def lora_tensors(factors: dict, layers: dict[str, LinearLayer], key, dtype: torch.dtype = torch.float32):
    """({key(name).lora_A.weight / .lora_B.weight: tensor in the layer's LoRA layout}, {name: rank}) of `factors`."""
    tensors, ranks = {}, {}
    for name, (B, A, _) in factors.items():
        B, A = layers[name].lora_layout(B, A)
        tensors[key(name) + ".lora_A.weight"] = A.to(dtype).contiguous().cpu()
        tensors[key(name) + ".lora_B.weight"] = B.to(dtype).contiguous().cpu()
        ranks[name] = A.shape[0]
    return tensors, ranks


def check_finite(tensors: dict[str, torch.Tensor], where) -> None:
    """A merge is never written with NaN/Inf in it: ExportError naming the first bad tensor, before any write."""
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ExportError(f"{key.removeprefix('base_model.model.')}: the merged adapter contains NaN or Inf; "
                              f"nothing was written to {where}. Check the adapters and the base weights for "
                              "non-finite values (and alpha > 0 when calibration rows are few).")


def check_extra_names(extra_files: dict | None) -> tuple[str, ...]:
    """The names of extra files: plain file names that are not the adapter's own files."""
    names = tuple(extra_files or ())
    for name in names:
        if not isinstance(name, str) or name in ADAPTER_FILES or name != Path(name).name or name in ("", ".", ".."):
            raise ExportError(f"extra file name {name!r}: give a plain file name (no folder part) other than "
                              f"{', '.join(ADAPTER_FILES)}.")
    return names


def write_adapter(directory, factors: dict, layers: dict[str, LinearLayer], base_model: str | None = None,
                  overwrite: bool = False, task_type: str | None = None,
                  carried: dict[str, torch.Tensor] | None = None,
                  extra_files: dict[str, str | bytes] | None = None, inputs=()) -> ExportReport:
    """Write adapter_config.json + adapter_model.safetensors into `directory` by the destination rule
    (io/destination.py: never onto an input, replace only with overwrite and only the files this write produces,
    locked, staged and swapped in atomically).

    extra_files: {file name: text or bytes} written into the same staging folder (a report, a model card), so they
    land together with the adapter or not at all. inputs: paths the output must not touch (the merge's adapters,
    calibration files, the base model folder).
    carried: {"module.weight": tensor} of modules_to_save copied as they are (e.g. a head the adapters share);
    they are listed in modules_to_save. task_type goes into the config (None: PEFT's bare PeftModel).
    """
    extra_names = check_extra_names(extra_files)
    tensors, ranks = lora_tensors(factors, layers, lambda name: f"base_model.model.{name}")
    for key, tensor in (carried or {}).items():
        tensors[f"base_model.model.{key}"] = tensor.contiguous().cpu()
    check_finite(tensors, directory)
    top = max(ranks.values())
    pattern = {re.escape(n): r for n, r in ranks.items() if r != top}
    config = {
        "peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": base_model,
        "r": top, "lora_alpha": top, "use_rslora": False, "lora_dropout": 0.0, "bias": "none",
        "target_modules": sorted(ranks),
        "rank_pattern": pattern, "alpha_pattern": dict(pattern),
        "fan_in_fan_out": any(layers[n].fan_in_fan_out for n in ranks),
        "modules_to_save": sorted({k.rsplit(".", 1)[0] for k in carried}) if carried else None,
        "init_lora_weights": True, "inference_mode": True,
    }

    def fill(staging: Path) -> None:
        (staging / "adapter_config.json").write_text(json.dumps(config, indent=2))
        save_file(tensors, str(staging / "adapter_model.safetensors"))
        for name, content in (extra_files or {}).items():
            (staging / name).write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))

    produces = ADAPTER_FILES + REPORT_FILES + extra_names
    write_folder(directory, fill, overwrite=overwrite, inputs=inputs, produces=produces)
    return ExportReport(str(directory), ranks, {n: f[2] for n, f in factors.items()})
