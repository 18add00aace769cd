"""Writing a merge as a PEFT LoRA folder that PeftModel.from_pretrained loads.

The scale is baked into the factors (lora_alpha = r for every module, use_rslora false), per-module ranks go in
rank_pattern/alpha_pattern. Exact factors are used when the merge has them (IterIS, RegMean, linear, cat: rank
Σ r_i); otherwise, or when a smaller rank is asked for, a truncated SVD ΔW ≈ U_r S_r V_rᵀ with
B = U_r S_r^½ and A = S_r^½ V_rᵀ, reporting the relative Frobenius error.
"""
from __future__ import annotations

import glob
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import ExportError
from ..targets import LinearLayer


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


def write_adapter(directory, factors: dict, layers: dict[str, LinearLayer], base_model: str | None = None,
                  overwrite: bool = False, task_type: str | None = None,
                  carried: dict[str, torch.Tensor] | None = None,
                  extra_files: dict[str, str | bytes] | None = None) -> ExportReport:
    """Write adapter_config.json + adapter_model.safetensors, replacing `directory` atomically.

    extra_files: {file name: text or bytes} written into the same staging folder (a report, a model card), so they
    land together with the adapter or not at all.

    carried: {"module.weight": tensor} of modules_to_save copied as they are (e.g. a head the adapters share);
    they are listed in modules_to_save. task_type goes into the config (None: PEFT's bare PeftModel).
    Nothing that is not an adapter folder is ever replaced: see replace_folder.
    """
    directory = Path(directory)
    recover(directory)
    check_destination(directory, overwrite)
    tensors, ranks = lora_tensors(factors, layers, lambda name: f"base_model.model.{name}")
    for key, tensor in (carried or {}).items():
        tensors[f"base_model.model.{key}"] = tensor.contiguous().cpu()
    for key, tensor in tensors.items():  # a merge is never written with NaN/Inf in it
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ExportError(f"{key.removeprefix('base_model.model.')}: the merged adapter contains NaN or Inf; "
                              f"nothing was written to {directory}. Check the adapters and the base weights for "
                              "non-finite values (and alpha > 0 when calibration rows are few).")
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

    replace_folder(directory, fill)
    return ExportReport(str(directory), ranks, {n: f[2] for n, f in factors.items()})


# -- safe, atomic replacement of an output folder ------------------------------------------------------------
# The new folder is written to a staging folder next to the target; then the old folder is renamed aside, the
# staging folder renamed into place, and the old one deleted. A kill between any two steps leaves the old or the
# new complete adapter: at the target, or (between the two renames, a few microseconds) in the "old" folder,
# which the next write to the same target renames back (recover). Stale staging folders of killed runs are
# deleted by the next write to the same target.

STAGING, ASIDE = ".iteris-staging-", ".iteris-old-"


def check_destination(directory: Path, overwrite: bool) -> None:
    """Refuse to replace anything that is not an adapter folder we may replace (before any slow work)."""
    resolved = directory.resolve()
    if directory.is_symlink() or (directory.exists() and not directory.is_dir()):
        raise ExportError(f"{directory} exists and is not a folder; choose a new folder name for the adapter.")
    here = Path.cwd().resolve()
    if resolved == here or resolved in here.parents or resolved == Path.home().resolve() or resolved.parent == resolved:
        raise ExportError(f"{directory} is the current directory, one of its parents, the home folder or the root; "
                          "write the adapter to a new subfolder (e.g. --out merged_adapter).")
    if not directory.exists():
        return
    if not overwrite:
        raise ExportError(f"{directory} already exists; pass overwrite=True (CLI: --overwrite) to replace it.")
    if any(directory.iterdir()) and not (directory / "adapter_config.json").is_file():
        raise ExportError(f"{directory} is not an adapter folder (no adapter_config.json), so it is not replaced "
                          "even with overwrite: its files would be lost. Choose another folder, or move its files "
                          "away first.")


def replace_folder(directory: Path, fill) -> None:
    """Call fill(staging) to write the new folder, then swap it in for `directory` (see the comment above)."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}{STAGING}", dir=directory.parent))
    aside = None
    try:
        fill(staging)
        if directory.exists():
            aside = directory.parent / f".{directory.name}{ASIDE}{staging.name.rsplit('-', 1)[-1]}"
            _rename(directory, aside)
        try:
            _rename(staging, directory)
        except BaseException:
            if aside is not None:
                _rename(aside, directory)
                aside = None
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already after a successful rename
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def recover(directory: Path) -> None:
    """Undo what a killed replace_folder left next to `directory`: restore the old folder if the new one never
    arrived, delete leftover staging folders and old copies."""
    parent = directory.parent
    if not parent.is_dir():
        return
    asides = sorted(parent.glob(f".{glob.escape(directory.name)}{ASIDE}*"), key=lambda p: p.stat().st_mtime)
    if asides and not directory.exists():
        _rename(asides.pop(), directory)
    for leftover in asides + list(parent.glob(f".{glob.escape(directory.name)}{STAGING}*")):
        shutil.rmtree(leftover, ignore_errors=True)


def _rename(source: Path, destination: Path) -> None:
    os.rename(source, destination)
