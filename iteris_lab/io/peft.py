"""Reading a PEFT LoRA folder (adapter_config.json + adapter_model.safetensors or .bin) into a LoraAdapter.

Keys `base_model.model.<module>.lora_A.weight` / `.lora_B.weight` become LoraLayer(A, B, s) with
s = lora_alpha / r (rslora: lora_alpha / sqrt(r); alpha_pattern and rank_pattern per module); other tensors (a head
saved whole: modules_to_save) go to `extra`. What the method cannot merge (DoRA, embedding LoRAs, trained tokens,
trained biases, other PEFT types) is refused with the file named.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..adapters import LoraAdapter, LoraLayer, check_finite
from ..errors import AdapterError
from ..settings import is_number
from .destination import describe

PEFT_PREFIX = "base_model.model."  # PEFT saves module names under the wrapper's prefix
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>A|B)(?:\.[^.]+)?\.weight$")
_UNSUPPORTED_FLAGS = {
    "use_dora": "DoRA (use_dora=True) decomposes magnitude and direction; IterIS merges plain LoRA deltas",
    "lora_bias": "LoRA with a trainable bias (lora_bias=True)",
}


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern: a key matches a module name ending in `.key` or equal to it."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def scale_of(config: dict, module: str, rank: int) -> float:
    alpha = _pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", 8))
    return alpha / math.sqrt(rank) if config.get("use_rslora", False) else alpha / rank


def check_config(config: dict, path: Path) -> None:
    if not isinstance(config, dict):
        raise AdapterError(f"{path}: adapter_config.json holds a {type(config).__name__}, not a JSON object; "
                           "is this a PEFT adapter_config.json?")
    for key in ("lora_alpha", "r"):
        if key in config and not is_number(config[key]):
            raise AdapterError(f"{path}: {key} in adapter_config.json is {config[key]!r}; it must be a finite number.")
    for key in ("alpha_pattern", "rank_pattern"):
        patterns = config.get(key) or {}
        if not isinstance(patterns, dict) or not all(is_number(v) for v in patterns.values()):
            raise AdapterError(f"{path}: {key} in adapter_config.json must map module names to numbers, "
                               f"got {patterns!r}.")
    if config.get("trainable_token_indices"):
        raise AdapterError(f"{path}: the adapter trains token embeddings (trainable_token_indices); IterIS captures "
                           "features and merges LoRA deltas only, so these rows would be silently lost. Write the "
                           "trained rows into the base model's embedding first, or use an adapter without them.")
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise AdapterError(f"{path}: adapter type {peft_type} is not supported; IterIS merges LoRA adapters only.")
    for flag, what in _UNSUPPORTED_FLAGS.items():
        if config.get(flag):
            raise AdapterError(f"{path}: {what} is not supported.")
    if config.get("bias", "none") != "none":
        raise AdapterError(f"{path}: bias={config['bias']!r} trains biases too; only bias='none' LoRAs can be merged.")


def load_adapter(path) -> LoraAdapter:
    """Read a PEFT LoRA folder (adapter_config.json + adapter_model.safetensors or .bin).

    Raises AdapterError naming the file when something is missing, corrupt or unsupported.
    """
    path = Path(path)
    if not path.is_dir():
        raise AdapterError(f"adapter folder {path} does not exist.")
    config_file = path / "adapter_config.json"
    _refuse_special(config_file)
    if not config_file.is_file():
        raise AdapterError(f"{path}: adapter_config.json is missing; is this a PEFT LoRA folder?")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterError(f"{config_file} is not valid JSON: {err}") from err
    check_config(config, path)
    state = _load_state(path)
    layers, extra = _split_state(state, config, path)
    if not layers:
        raise AdapterError(f"{path}: no lora_A/lora_B tensors found in the adapter weights.")
    adapter = LoraAdapter(str(path), config, layers, extra)
    check_finite(adapter)
    return adapter


def _refuse_special(file: Path) -> None:
    """A FIFO, a device or a dangling link is named as what it is, never opened (reading one blocks or never
    ends); a link to a regular file is fine (the hub cache links to its blobs)."""
    odd = describe(file)
    if odd and not file.is_file():
        raise AdapterError(f"{file} is {odd}, not a regular file; copy the adapter's file into a regular file (or "
                           "point the link at one).")


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    st, pt = path / "adapter_model.safetensors", path / "adapter_model.bin"
    for file in (st, pt):
        _refuse_special(file)
    try:
        if st.is_file():
            return load_file(str(st))
        if pt.is_file():
            return torch.load(str(pt), map_location="cpu", weights_only=True)
    except Exception as err:  # safetensors and torch raise several types for damaged files
        raise AdapterError(f"{path}: the adapter weights could not be read ({type(err).__name__}: {err}).") from err
    raise AdapterError(f"{path}: adapter_model.safetensors (or .bin) is missing.")


def _split_state(state: dict, config: dict, path: Path) -> tuple[dict[str, LoraLayer], dict]:
    halves: dict[str, dict[str, torch.Tensor]] = {}
    extra = {}
    for key, tensor in state.items():
        if "lora_embedding" in key or "lora_magnitude" in key:
            raise AdapterError(f"{path}: tensor {key} belongs to an embedding or DoRA LoRA, which is not supported.")
        if "token_adapter" in key or "trainable_tokens" in key:
            raise AdapterError(f"{path}: tensor {key} holds trained token embeddings (trainable_token_indices), "
                               "which IterIS cannot merge; write them into the base model's embedding first.")
        match = _LORA_KEY.match(key)
        if match is None:
            extra[key.removeprefix(PEFT_PREFIX)] = tensor
            continue
        halves.setdefault(match["module"].removeprefix(PEFT_PREFIX), {})[match["which"]] = tensor
    return lora_layers(halves, path, lambda module, rank, alpha: scale_of(config, module, rank)), extra


def lora_layers(halves: dict, where, scale) -> dict[str, LoraLayer]:
    """{module: LoraLayer} from {module: {"A", "B", optional "alpha"}}; scale(module, rank, alpha) -> s."""
    layers = {}
    for module, parts in halves.items():
        if not {"A", "B"} <= set(parts):
            raise AdapterError(f"{where}: module {module} has {', '.join(sorted(parts))} but not both down (A) and "
                               "up (B) factors.")
        A, B = parts["A"].float(), parts["B"].float()
        if A.shape[0] != B.shape[1]:
            raise AdapterError(f"{where}: module {module}: the down factor A has rank {A.shape[0]} but the up factor "
                               f"B {B.shape[1]}.")
        alpha = float(parts["alpha"]) if "alpha" in parts else None
        layers[module] = LoraLayer(A, B, float(scale(module, A.shape[0], alpha)))
    return layers
