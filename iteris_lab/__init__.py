"""iteris-lab: merging LoRA adapters with IterIS (Iterative Inference-Solving Alignment, arXiv 2411.15231).

The public names below load on first use (PEP 562 `__getattr__`): `import iteris_lab` and `iteris-lab --help`
stay light (no torch, no transformers) until a merge, an adapter or a tokenizer is actually needed.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "merge_loras": "merge", "METHODS": "merge", "IterationRecord": "merge",
    "MergeSettings": "settings", "MergeResult": "result",
    "load_adapter": "io.peft", "LoraAdapter": "adapters", "LoraLayer": "adapters",
    "ExportReport": "io.export", "tokenize": "io.calibration", "read_inputs": "io.calibration",
    "load_lora": "lora_formats", "read_diffusers_lora": "lora_formats", "read_kohya_lora": "lora_formats",
    "write_diffusers_lora": "lora_formats",
    "IterisError": "errors", "AdapterError": "errors", "CalibrationError": "errors", "SolveError": "errors",
    "ExportError": "errors",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'iteris_lab' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
