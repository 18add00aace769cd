"""What the diffusers and kohya readers share: finding the weights file, reading it, refusing what is not a plain
LoRA, and fitting the factors to the model's modules."""
from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from ..adapters import LoraLayer
from ..errors import AdapterError
from ..targets import layer_of, resolve_names

WEIGHT_NAMES = ("pytorch_lora_weights.safetensors", "pytorch_lora_weights.bin")
KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                  "lora_te2_": "text_encoder_2"}
_UNSUPPORTED_KEYS = {"dora_scale": "DoRA", "lora_magnitude_vector": "DoRA", "hada_": "LoHa", "lokr_": "LoKr",
                     ".diff": "full weight difference", "lora_mid": "LoCon with a mid (Tucker) factor"}
WHICH = {"A": "A", "down": "A", "lora_down.weight": "A", "B": "B", "up": "B", "lora_up.weight": "B"}


def lora_file(path_or_file, weight_name: str | None = None) -> Path:
    """The weights file: `path_or_file` itself, or in a folder `weight_name` / pytorch_lora_weights.safetensors
    (or .bin)."""
    path = Path(path_or_file)
    if path.is_file():
        return path
    if not path.is_dir():
        raise AdapterError(f"LoRA file or folder {path} does not exist.")
    for name in ([weight_name] if weight_name else WEIGHT_NAMES):
        if (path / name).is_file():
            return path / name
    found = ", ".join(sorted(p.name for p in path.iterdir())[:8]) or "nothing"
    raise AdapterError(f"{path}: no {weight_name or ' or '.join(WEIGHT_NAMES)} in the folder (found {found}); "
                       "pass the file itself or weight_name=...")


def read_state(file) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, the safetensors header metadata ({} for .bin files)). AdapterError when unreadable."""
    file = Path(file)
    try:
        if file.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(file), framework="pt") as handle:
                return {k: handle.get_tensor(k) for k in handle.keys()}, dict(handle.metadata() or {})
        return torch.load(str(file), map_location="cpu", weights_only=True), {}
    except Exception as err:  # safetensors and torch raise several types for damaged files
        raise AdapterError(f"{file}: the LoRA weights could not be read ({type(err).__name__}: {err}).") from err


def check_keys(state: dict, file) -> None:
    """Refuse an empty file and the tensors of adapters that are not plain LoRA (DoRA, LoHa, LoKr, biases)."""
    if not state:
        raise AdapterError(f"{file}: the file holds no tensors.")
    for key in state:
        for marker, adapter_type in _UNSUPPORTED_KEYS.items():
            if marker in key:
                raise AdapterError(f"{file}: tensor {key} belongs to a {adapter_type} adapter; only plain LoRA "
                                   "(down/up or A/B factors) can be merged.")
        if re.search(r"lora_(B|up)(\.[^.]+)?\.bias$", key):
            raise AdapterError(f"{file}: tensor {key} is a LoRA bias (lora_bias=True), which is not supported.")


def is_kohya(keys) -> bool:
    return any(k.startswith(tuple(KOHYA_PREFIXES)) for k in keys)


def refuse_others(others: dict[str, list], component: str, ignore_other: bool, file) -> None:
    """AdapterError when the file also holds LoRAs for other components (`others`: {component: keys})."""
    if others and not ignore_other:
        parts = ", ".join(f"{name} ({len(keys)} tensors)" for name, keys in others.items())
        raise AdapterError(f"{file}: the file also holds a LoRA for {parts}; IterIS merges one model at a time. "
                           f"Read that part with component='<name>' and its model, or pass ignore_other=True to "
                           f"read only the {component} part.")


def fit_to_model(layers: dict[str, LoraLayer], model: nn.Module, file) -> dict[str, LoraLayer]:
    """Check names and shapes against `model`; 1x1 conv factors on a Linear become matrices, matrices on a
    Conv2d become (r, in, kh, kw) / (out, r, 1, 1)."""
    modules, resolved, missing = dict(model.named_modules()), {}, []
    for name in layers:  # exact names; else a unique suffix (text_model.encoder... on transformers 5's CLIP)
        try:
            resolved[name] = resolve_names(model, [name])[name]
        except AdapterError:
            missing.append(name)
    if missing:
        raise AdapterError(f"{file}: {len(missing)} LoRA module(s) are not in {type(model).__name__}, e.g. "
                           f"{', '.join(missing[:3])}; is this LoRA for this model (and component)?")
    fitted = {}
    for old_name, lora in layers.items():
        name = resolved[old_name]
        layer = layer_of(name, modules[name])
        if layer.fan_in_fan_out:
            raise AdapterError(f"{file}: module {name} is a {layer.label}; only Linear and Conv2d LoRAs can be merged.")
        B, A = lora.B.reshape(lora.B.shape[0], -1), lora.A.reshape(lora.rank, -1)
        if (B.shape[0], A.shape[1]) != layer.matrix_shape():
            raise AdapterError(f"{file}: module {name}: LoRA factors give ΔW {(B.shape[0], A.shape[1])}, the "
                               f"module's weight is {layer.matrix_shape()} (out, in_flat).")
        B, A = layer.lora_layout(B, A)
        fitted[name] = LoraLayer(A, B, lora.scale)
    return fitted

