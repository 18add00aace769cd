"""diffusers LoRA files: read one component's LoRA (as a LoraAdapter), write a merge back as a file that
pipe.load_lora_weights accepts. Keys and scales: see the package docstring."""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..adapters import LoraAdapter

from ..io.peft import check_config, lora_layers, scale_of
from ..errors import AdapterError, ExportError
from ..io.destination import check_destination, write_file
from ..io.export import ExportReport, check_finite, lora_factors, lora_tensors
from .files import WHICH, WEIGHT_NAMES, check_keys, fit_to_model, is_kohya, lora_file, read_state, refuse_others

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
METADATA_KEY = "lora_adapter_metadata"  # diffusers' key for the LoraConfig in the safetensors header
# diffusers-format key -> (module, "A" | "B" | "alpha"): current peft names, LoRACompatible layers, attention
# processors (to_out_lora is to_out.0), text encoders' lora_linear_layer
_DIFFUSERS_KEYS = (
    (re.compile(r"^(?P<module>.+)\.lora_(?P<which>A|B)(?:\.[^.]+)?\.weight$"), None),
    (re.compile(r"^(?P<module>.+)\.lora\.(?P<which>down|up)\.weight$"), None),
    (re.compile(r"^(?P<module>.+)\.lora_linear_layer\.(?P<which>down|up)\.weight$"), None),
    (re.compile(r"^(?P<module>.+)\.processor\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<which>down|up)\.weight$"),
     "processor"),
    (re.compile(r"^(?P<module>.+)\.alpha$"), None),
)


def _component_of(key: str) -> tuple[str | None, str]:
    """("unet", rest) for "unet.down_blocks...", (None, key) without a component prefix."""
    head, _, rest = key.partition(".")
    return (head, rest) if head in COMPONENTS and rest else (None, key)


def _split_components(state: dict, component: str, ignore_other: bool, file) -> tuple[dict, bool]:
    """The tensors of `component` (keys without prefix count as its own), and whether they were prefixed."""
    own, others, prefixed = {}, {}, False
    for key, tensor in state.items():
        head, rest = _component_of(key)
        if head is None or head == component:
            own[rest] = tensor
            prefixed |= head is not None
        else:
            others.setdefault(head, []).append(key)
    if not own:
        raise AdapterError(f"{file}: no {component} LoRA tensors (components found: {', '.join(others)}).")
    refuse_others(others, component, ignore_other, file)
    return own, prefixed


def _lora_config(metadata: dict, component: str, prefixed: bool, file) -> dict | None:
    """The LoraConfig dict diffusers would build from the header: "unet.r", ... for a prefixed file, else the
    unprefixed keys (save_lora_adapter)."""
    raw = metadata.get(METADATA_KEY)
    if not raw:
        return None
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as err:
        raise AdapterError(f"{file}: the {METADATA_KEY} header is not valid JSON: {err}") from err
    if prefixed:
        config = {k[len(component) + 1:]: v for k, v in config.items() if k.startswith(component + ".")}
    else:
        config = {k: v for k, v in config.items() if _component_of(k)[0] is None}
    return config or None


def _diffusers_key(key: str) -> tuple[str, str] | None:
    """(module, "A" | "B" | "alpha") of a diffusers-format key, None when it is not a LoRA tensor."""
    for pattern, layout in _DIFFUSERS_KEYS:
        match = pattern.match(key)
        if match is None:
            continue
        module = match["module"]
        if layout == "processor":
            module += "." + ("to_out.0" if match["proj"] == "to_out" else match["proj"])
        which = "alpha" if key.endswith(".alpha") else WHICH[match["which"]]
        return module.replace(".processor.", "."), which
    return None


def read_diffusers_lora(path_or_file, unet: nn.Module | None = None, component: str = "unet",
                        ignore_other: bool = False, weight_name: str | None = None) -> LoraAdapter:
    """Read a diffusers LoRA file (or the folder holding pytorch_lora_weights.safetensors) as a LoraAdapter.

    Module names are relative to the component's model (`unet.` removed). With `unet` (the model the LoRA is for:
    the UNet, or the text encoder when component="text_encoder") every name must be one of its named_modules()
    and the factor shapes must fit, else AdapterError. Scales as in the module docstring.
    """
    file = lora_file(path_or_file, weight_name)
    state, metadata = read_state(file)
    check_keys(state, file)
    if is_kohya(state):
        raise AdapterError(f"{file} is a kohya-format LoRA (lora_unet_... keys); read it with read_kohya_lora "
                           "or load_lora.")
    own, prefixed = _split_components(state, component, ignore_other, file)
    config = _lora_config(metadata, component, prefixed, file)
    if config is not None:
        check_config(config, file)
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in own.items():
        parsed = _diffusers_key(key)
        if parsed is None:
            raise AdapterError(f"{file}: tensor {key} is not a LoRA factor (lora_A/lora_B, lora.down/up) or alpha.")
        halves.setdefault(parsed[0], {})[parsed[1]] = tensor
    layers = lora_layers(halves, file, lambda module, rank, alpha: (
        scale_of(config, module, rank) if config is not None else (alpha / rank if alpha is not None else 1.0)))
    if unet is not None:
        layers = fit_to_model(layers, unet, file)
    info = {"format": "diffusers", "component": component, "peft_type": "LORA", "lora_config": config,
            "scale_from": "metadata" if config else ("alpha" if any("alpha" in h for h in halves.values()) else
                                                     "rank (scale 1)")}
    return LoraAdapter(str(file), info, layers)



def write_diffusers_lora(result, path, prefix: str | None = "unet", rank: int | None = None,
                         dtype: torch.dtype = torch.float32, overwrite: bool = False, inputs=()) -> ExportReport:
    """Write a merge (MergeResult) as a diffusers LoRA file that pipe.load_lora_weights accepts.

    path: a ".safetensors" file, or a folder (then <folder>/pytorch_lora_weights.safetensors).
    rank: None writes the exact factors (rank Σ r_i) when the merge has them, else the SVD at numerical rank; an
    int writes a truncated SVD (ExportReport.relative_error says what it loses). The scale is baked into B and A
    and lora_alpha = r per module (alpha_pattern = rank_pattern where ranks differ), so diffusers applies
    ΔW = B·A. Conv2d: A (r, in, kh, kw), B (out, r, 1, 1). prefix: "unet" for pipelines, None for
    unet.load_lora_adapter(..., prefix=None). The LoraConfig goes in the header (diffusers' metadata key).

    The destination rule of io/destination.py: never an input (the LoRA files the merge read, and `inputs`: e.g.
    the base model's folder), an existing file only with overwrite=True and only when it is a LoRA file (a base
    model's weights are never replaced); NaN/Inf is refused before anything is written.
    """
    bad = [n for n, layer in result.layers.items() if layer.fan_in_fan_out]
    if bad:
        raise ExportError(f"diffusers LoRA files hold Linear and Conv2d layers only; {bad[0]} is a "
                          f"{result.layers[bad[0]].label}.")
    path = Path(path)
    file = path if path.suffix == ".safetensors" else path / WEIGHT_NAMES[0]
    inputs = [*(result.settings.get("adapters") or []), *inputs]
    check_destination(file, overwrite, inputs=inputs, kind="file", replaceable=_not_a_lora)  # before the SVDs
    factors = lora_factors(result.deltas, result.factors, result.layers, rank)
    key = (lambda name: f"{prefix}.{name}") if prefix else (lambda name: name)
    tensors, ranks = lora_tensors(factors, result.layers, key, dtype)
    check_finite(tensors, file)
    metadata = {"format": "pt", METADATA_KEY: json.dumps(_config_dict(ranks, key), sort_keys=True)}
    write_file(file, lambda staging: save_file(tensors, str(staging), metadata=metadata), overwrite=overwrite,
               inputs=inputs, replaceable=_not_a_lora)
    return ExportReport(str(file), ranks, {n: f[2] for n, f in factors.items()})


def _not_a_lora(file: Path) -> str | None:
    """Why an existing file may not be replaced by a LoRA file (None: it is one, written by us or diffusers)."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as handle:
            keys = list(handle.keys())
    except Exception as err:  # safetensors raises several types for files that are not safetensors
        return f"is not a safetensors LoRA file ({type(err).__name__})"
    if is_kohya(keys):
        return None
    other = next((k for k in keys if _diffusers_key(_component_of(k)[1]) is None), None)
    if other is not None or not keys:
        return f"holds the tensor {other}, which is not a LoRA factor" if other else "holds no tensors"
    return None


def _config_dict(ranks: dict[str, int], key) -> dict:
    """LoraConfig kwargs (with the component prefix on every key) that give every module scale 1."""
    top = max(ranks.values(), key=list(ranks.values()).count)  # the most common rank, as diffusers picks
    pattern = {f"^{re.escape(n)}": r for n, r in ranks.items() if r != top}
    config = {"r": top, "lora_alpha": top, "rank_pattern": pattern, "alpha_pattern": dict(pattern),
              "target_modules": sorted(ranks), "use_rslora": False, "lora_dropout": 0.0, "bias": "none",
              "use_dora": False, "lora_bias": False}
    return {key(k): v for k, v in config.items()}
