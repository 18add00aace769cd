"""Reading PEFT LoRA adapters: a folder becomes {module name: LoraLayer(A, B, scale)}.

A LoRA on a layer with weight W0 (out, in) adds ΔW = s·B·A, with A (r, in), B (out, r) and
s = lora_alpha / r (rslora: lora_alpha / sqrt(r)). For a Conv2d LoRA, A is a conv (r, in, kh, kw) and
B a 1x1 conv (out, r, 1, 1), so ΔW = s·B·A acts on unfolded patches of length in·kh·kw.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from .errors import AdapterError

_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>A|B)(?:\.[^.]+)?\.weight$")
_PREFIXES = ("base_model.model.",)
_UNSUPPORTED_FLAGS = {
    "use_dora": "DoRA (use_dora=True) decomposes magnitude and direction; IterIS merges plain LoRA deltas",
    "lora_bias": "LoRA with a trainable bias (lora_bias=True)",
}


@dataclass(frozen=True)
class LoraLayer:
    """One adapted module: ΔW = scale · B @ A.

    A: (r, in) or (r, in, kh, kw) for Conv2d; B: (out, r) or (out, r, 1, 1).
    """

    A: torch.Tensor
    B: torch.Tensor
    scale: float

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B (out, r), A (r, in_flat)) as float64 matrices, the scale left out."""
        return self.B.reshape(self.B.shape[0], -1).double(), self.A.reshape(self.rank, -1).double()

    def delta(self) -> torch.Tensor:
        """ΔW = s·B·A as a float64 (out, in_flat) matrix."""
        B, A = self.factors()
        return self.scale * (B @ A)


@dataclass
class LoraAdapter:
    """A PEFT LoRA folder read into memory. `layers` maps module names (as in the adapter file,
    prefix `base_model.model.` removed) to LoraLayer; `extra` holds non-LoRA tensors (e.g. a head)."""

    path: str
    config: dict
    layers: dict[str, LoraLayer]
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return Path(self.path).name

    @property
    def fan_in_fan_out(self) -> bool:
        return bool(self.config.get("fan_in_fan_out", False))


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
    return LoraAdapter(str(path), config, layers, extra)


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    st, pt = path / "adapter_model.safetensors", path / "adapter_model.bin"
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
        match = _LORA_KEY.match(key)
        if match is None:
            extra[_strip(key)] = tensor
            continue
        halves.setdefault(_strip(match["module"]), {})[match["which"]] = tensor
    layers = {}
    for module, pair in halves.items():
        if set(pair) != {"A", "B"}:
            raise AdapterError(f"{path}: module {module} has lora_{''.join(pair)} but not both lora_A and lora_B.")
        A, B = pair["A"].float(), pair["B"].float()
        if A.shape[0] != B.shape[1]:
            raise AdapterError(f"{path}: module {module}: lora_A has rank {A.shape[0]} but lora_B has {B.shape[1]}.")
        layers[module] = LoraLayer(A, B, scale_of(config, module, A.shape[0]))
    return layers, extra


def _strip(key: str) -> str:
    for prefix in _PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key
