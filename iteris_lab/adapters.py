"""Reading PEFT LoRA adapters: a folder becomes {module name: LoraLayer(A, B, scale)}.

A LoRA on a layer with weight W0 (out, in) adds ΔW = s·B·A, with A (r, in), B (out, r) and
s = lora_alpha / r (rslora: lora_alpha / sqrt(r)). For a Conv2d LoRA, A is a conv (r, in, kh, kw) and
B a 1x1 conv (out, r, 1, 1), so ΔW = s·B·A acts on unfolded patches of length in·kh·kw.
"""
from __future__ import annotations

import json
import math
import numbers
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from .errors import AdapterError
from .io.destination import describe
from .targets import resolve_names

PEFT_PREFIX = "base_model.model."  # PEFT saves module names under the wrapper's prefix
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>A|B)(?:\.[^.]+)?\.weight$")
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


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern: a key matches a module name ending in `.key` or equal to it."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def scale_of(config: dict, module: str, rank: int) -> float:
    alpha = _pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", 8))
    return alpha / math.sqrt(rank) if config.get("use_rslora", False) else alpha / rank


def is_number(value) -> bool:
    """A finite real number (bool excluded): what every numeric setting and config entry must be."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


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


def check_finite(adapter: LoraAdapter) -> None:
    """Refuse NaN/Inf in an adapter's tensors, naming the module (a merge would spread them silently)."""
    for module, layer in adapter.layers.items():
        for which, tensor in (("lora_A", layer.A), ("lora_B", layer.B)):
            if not bool(torch.isfinite(tensor).all()):
                raise AdapterError(f"{adapter.path}: module {module}: {which} contains NaN or Inf; the adapter is "
                                   "damaged (or its training diverged). Retrain or re-export it.")
        if not math.isfinite(layer.scale):
            raise AdapterError(f"{adapter.path}: module {module}: the LoRA scale {layer.scale} is not finite.")
    for key, tensor in adapter.extra.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise AdapterError(f"{adapter.path}: tensor {key} contains NaN or Inf; the adapter is damaged.")


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


# -- what the adapters of one merge must agree on ---------------------------------------------------------------

def check_adapters(model, loras: list[LoraAdapter]) -> dict:
    """Check the adapters of one merge against each other and the base model, before any work.

    - NaN/Inf in any tensor: AdapterError naming the module.
    - base_model_name_or_path differing: a warning naming both (adapters of one architecture may still fit).
    - task_type: the one they agree on (None when none is set or they disagree; a warning when they disagree).
    - modules_to_save (a trained head, `extra`): carried into the merge unchanged when every adapter holds the
      same tensors; different heads are refused (IterIS merges LoRA deltas; averaging two classifiers trained for
      different label sets has no meaning). Carried modules must come after every adapted module: the features are
      captured without them.
    Returns {"task_type", "modules_to_save", "_carried": {model key: tensor}} for the merge's settings.
    """
    for adapter in loras:
        check_finite(adapter)
    bases = {a.config.get("base_model_name_or_path") for a in loras} - {None}
    if len(bases) > 1:
        warnings.warn("the adapters were trained on different base models: " + " and ".join(
            f"{a.path} on {a.config.get('base_model_name_or_path')!r}" for a in loras) + "; merging them is only "
            "meaningful when those are the same weights.", stacklevel=3)
    types = {a.config.get("task_type") for a in loras} - {None}
    if len(types) > 1:
        warnings.warn(f"the adapters disagree on task_type ({', '.join(sorted(map(str, types)))}); the merged "
                      "adapter is written with task_type None.", stacklevel=3)
    carried = _shared_extra(loras, [_without_base_copies(model, a) for a in loras])
    return {"task_type": types.pop() if len(types) == 1 else None,
            "modules_to_save": sorted({k.rsplit(".", 1)[0] for k in carried}),
            "_carried": _resolve_carried(model, loras, carried)}


def _without_base_copies(model, adapter: LoraAdapter) -> dict[str, torch.Tensor]:
    """adapter.extra less the copies of base weights PEFT saves next to an embedding or lm_head LoRA
    (save_embedding_layers: `<module>.base_layer.weight`); a copy that differs from the model's is refused."""
    extra = {}
    for key, tensor in adapter.extra.items():
        module, _, attr = key.rpartition(".base_layer.")
        if not module:
            extra[key] = tensor
            continue
        name = f"{resolve_names(model, [module])[module]}.{attr}"
        param = dict(model.named_parameters(remove_duplicate=False)).get(name)
        if param is None or param.device.type == "meta":
            continue  # offloaded: nothing to compare in memory
        if param.shape != tensor.shape or not torch.equal(tensor.to(param.device, param.dtype), param):
            raise AdapterError(f"{adapter.path}: the adapter saves its own base weight {key} (e.g. a resized "
                               f"vocabulary), which differs from the base model's {name}; load the base model "
                               "the adapter was trained on (with the same vocabulary size).")
    return extra


def _shared_extra(loras: list[LoraAdapter], extras: list[dict]) -> dict[str, torch.Tensor]:
    first, head = loras[0], extras[0]
    for other, extra in zip(loras[1:], extras[1:]):
        keys = set(head) ^ set(extra)
        differ = sorted(keys or {k for k in head if not torch.equal(head[k], extra[k])})
        if differ:
            raise AdapterError(
                f"{first.path} and {other.path} carry different trained modules (modules_to_save) at {differ[0]}: "
                "IterIS merges LoRA deltas, and different heads cannot be merged into one without losing one. "
                "Use adapters that share the head, or merge the LoRA parts only by passing LoraAdapter objects "
                "with .extra emptied (iteris_lab.load_adapter(path), then adapter.extra.clear()).")
    return dict(head)


def _resolve_carried(model, loras, carried: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{key in the model's state dict: tensor}; refuses a carried module that precedes an adapted one."""
    if not carried:
        return {}
    modules = resolve_names(model, sorted({k.rsplit(".", 1)[0] for k in carried}))
    adapted = {m for a in loras for m in resolve_names(model, a.layers).values()}
    order = {name: k for k, name in enumerate(dict(model.named_modules()))}
    last = max(order[m] for m in adapted)
    for module, name in modules.items():
        if name in adapted or order[name] < last:
            raise AdapterError(f"module {name} is saved whole by the adapters (modules_to_save) but comes before or "
                               "is one of the LoRA-adapted modules: the merge captures features without it, so the "
                               "result would not match. Only heads after every adapted module can be carried.")
    params = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers())
    out = {}
    for key, tensor in carried.items():
        module, param = key.rsplit(".", 1)
        name = f"{modules[module]}.{param}"
        if name not in params or tuple(params[name].shape) != tuple(tensor.shape):
            raise AdapterError(f"{loras[0].path}: saved module tensor {key} {tuple(tensor.shape)} does not fit the "
                               f"base model ({name}: {tuple(params[name].shape) if name in params else 'missing'}); "
                               "was this adapter trained on another base model?")
        out[name] = tensor
    return out
