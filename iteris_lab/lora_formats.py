"""LoRA files of the diffusers and kohya ecosystems read as LoraAdapter, and a merge written back as a diffusers file.

    PEFT folder     adapter_config.json + adapter_model.safetensors            -> adapters.load_adapter
    diffusers file  pytorch_lora_weights.safetensors, as written by StableDiffusionPipeline.save_lora_weights
                    ("unet.<module>.lora_A.weight") or ModelMixin.save_lora_adapter (no prefix); older files use
                    "<module>.lora.down.weight" / ".lora.up.weight" or "<attn>.processor.to_q_lora.down.weight"
    kohya file      "lora_unet_<module, dots as underscores>.lora_down.weight" / ".lora_up.weight" / ".alpha"
                    (sd-scripts, A1111); SD 1.x names follow diffusers' modules, mapped back through the model's
                    named_modules() because "to_q", "proj_in", "transformer_blocks" hold underscores themselves

The scale s of ΔW = s·B·A follows what diffusers applies when it loads the file: the LoraConfig stored in the
safetensors metadata (lora_alpha / r, alpha_pattern, rank_pattern, rslora) when there is one, else α / r from an
"<module>.alpha" tensor (kohya's network alpha), else 1 (no alpha means alpha = rank).

Text-encoder parts ("text_encoder." / "lora_te_" keys): IterIS merges one model at a time, so a file's UNet part
and text-encoder part are read separately: component="text_encoder" (with the text encoder as the model) reads the
latter. Reading one component of a file that also holds another raises AdapterError unless ignore_other=True.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

import torch
from torch import nn

from .adapters import LoraAdapter, LoraLayer, check_config, load_adapter, lora_layers, scale_of
from .errors import AdapterError, ExportError
from .export import ExportReport, lora_factors, lora_tensors
from .targets import layer_of, resolve_names

WEIGHT_NAMES = ("pytorch_lora_weights.safetensors", "pytorch_lora_weights.bin")
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                  "lora_te2_": "text_encoder_2"}
METADATA_KEY = "lora_adapter_metadata"  # diffusers' key for the LoraConfig in the safetensors header
_UNSUPPORTED_KEYS = {"dora_scale": "DoRA", "lora_magnitude_vector": "DoRA", "hada_": "LoHa", "lokr_": "LoKr",
                     ".diff": "full weight difference", "lora_mid": "LoCon with a mid (Tucker) factor"}
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
_KOHYA_KEY = re.compile(r"^(?P<prefix>lora_unet_|lora_te[12]?_)(?P<flat>.+?)\.(?P<which>lora_down\.weight|"
                        r"lora_up\.weight|alpha)$")
_WHICH = {"A": "A", "down": "A", "lora_down.weight": "A", "B": "B", "up": "B", "lora_up.weight": "B"}


# ---------------------------------------------------------------- reading files


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


def _check_keys(state: dict, file) -> None:
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


# ---------------------------------------------------------------- diffusers format


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
    if others and not ignore_other:
        parts = ", ".join(f"{name} ({len(keys)} tensors)" for name, keys in others.items())
        raise AdapterError(f"{file}: the file also holds a LoRA for {parts}; IterIS merges one model at a time. "
                           f"Read that part with component='<name>' and its model, or pass ignore_other=True to "
                           f"read only the {component} part.")
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
        which = "alpha" if key.endswith(".alpha") else _WHICH[match["which"]]
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
    _check_keys(state, file)
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
        layers = _fit_to_model(layers, unet, file)
    info = {"format": "diffusers", "component": component, "peft_type": "LORA", "lora_config": config,
            "scale_from": "metadata" if config else ("alpha" if any("alpha" in h for h in halves.values()) else
                                                     "rank (scale 1)")}
    return LoraAdapter(str(file), info, layers)


def _fit_to_model(layers: dict[str, LoraLayer], model: nn.Module, file) -> dict[str, LoraLayer]:
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


# ---------------------------------------------------------------- kohya format


def kohya_names(model: nn.Module) -> dict[str, str]:
    """{module name with dots as underscores: module name} for the model's modules. Raises AdapterError if two
    modules flatten to the same string (the kohya name would be ambiguous)."""
    names: dict[str, str] = {}
    for name, _ in model.named_modules():
        flat = name.replace(".", "_")
        if name and flat in names:
            raise AdapterError(f"modules {names[flat]!r} and {name!r} both flatten to {flat!r}; kohya names "
                               f"cannot tell them apart.")
        names[flat] = name
    return names


def _kohya_module(flat: str, names: dict[str, str]) -> str | None:
    """The module a kohya name flattens; else the unique module whose flat name ends it (kohya's
    "text_model_encoder_..." on a CLIPTextModel whose modules start at "encoder")."""
    if flat in names:
        return names[flat]
    candidates = [name for key, name in names.items() if key and flat.endswith("_" + key)]
    return candidates[0] if len(candidates) == 1 else None


def read_kohya_lora(file, unet: nn.Module, component: str = "unet", ignore_other: bool = False) -> LoraAdapter:
    """Read a kohya / A1111 LoRA file for SD 1.x as a LoraAdapter whose module names are `unet`'s.

    Keys "lora_unet_<flat>.lora_down.weight" (A: (r, in) or (r, in, kh, kw) for conv), ".lora_up.weight"
    (B: (out, r) or (out, r, 1, 1)), ".alpha" (scale α / r; 1 without). <flat> is mapped back to a module name
    with kohya_names(unet). component="text_encoder" reads the "lora_te_" part (pass the text encoder).

    Per-module alphas are honoured. diffusers 0.42's own kohya loader honours them only outside attention: its
    alpha_pattern keys for attention read "...attn1.processor.to_q_lora.down.weight", match no module, and those
    layers take the most common alpha. For the usual files (one network alpha on every Linear, one conv alpha)
    both give the same ΔW (tests/test_lora_formats.py checks it on the UNet output).
    """
    if unet is None:
        raise AdapterError("read_kohya_lora needs the model (the UNet) to map kohya's flattened names back to "
                           "module names.")
    file = lora_file(file)
    state, _ = read_state(file)
    _check_keys(state, file)
    names, halves, others, unknown = kohya_names(unet), {}, {}, []
    for key, tensor in state.items():
        match = _KOHYA_KEY.match(key)
        if match is None:
            raise AdapterError(f"{file}: tensor {key} is not a kohya LoRA key (lora_unet_*/lora_te_* with "
                               ".lora_down.weight, .lora_up.weight or .alpha).")
        if KOHYA_PREFIXES[match["prefix"]] != component:
            others.setdefault(KOHYA_PREFIXES[match["prefix"]], []).append(key)
            continue
        module = _kohya_module(match["flat"], names)
        if module is None:
            unknown.append(match["flat"])
            continue
        which = "alpha" if match["which"] == "alpha" else _WHICH[match["which"]]
        halves.setdefault(module, {})[which] = tensor
    if unknown:
        raise AdapterError(f"{file}: {len(set(unknown))} kohya module name(s) match no module of "
                           f"{type(unet).__name__}, e.g. {', '.join(sorted(set(unknown))[:3])}; SD 1.x kohya names "
                           "follow diffusers' module names (SDXL's input_blocks/output_blocks names are not mapped).")
    if others and not ignore_other:
        parts = ", ".join(f"{name} ({len(keys)} tensors)" for name, keys in others.items())
        raise AdapterError(f"{file}: the file also holds a LoRA for {parts}; IterIS merges one model at a time. "
                           f"Pass ignore_other=True to read only the {component} part.")
    if not halves:
        raise AdapterError(f"{file}: no {component} LoRA tensors in this kohya file.")
    layers = lora_layers(halves, file, lambda module, rank, alpha: alpha / rank if alpha is not None else 1.0)
    info = {"format": "kohya", "component": component, "peft_type": "LORA",
            "alphas": {m: float(h["alpha"]) for m, h in halves.items() if "alpha" in h}}
    return LoraAdapter(str(file), info, _fit_to_model(layers, unet, file))


# ---------------------------------------------------------------- dispatch


def load_lora(path, unet: nn.Module | None = None, component: str = "unet", ignore_other: bool = False) -> LoraAdapter:
    """A LoraAdapter from a PEFT folder, a diffusers LoRA file (or its folder), or a kohya file (needs `unet`)."""
    path = Path(path)
    if (path / "adapter_config.json").is_file():
        return load_adapter(path)
    file = lora_file(path)
    if file.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(file), framework="pt") as handle:
                keys = list(handle.keys())
        except Exception as err:
            raise AdapterError(f"{file}: not a readable safetensors file ({type(err).__name__}: {err}).") from err
    else:
        keys = list(read_state(file)[0])
    if is_kohya(keys):
        return read_kohya_lora(file, unet, component, ignore_other)
    return read_diffusers_lora(file, unet, component, ignore_other)


# ---------------------------------------------------------------- writing


def write_diffusers_lora(result, path, prefix: str | None = "unet", rank: int | None = None,
                         dtype: torch.dtype = torch.float32) -> ExportReport:
    """Write a merge (MergeResult) as a diffusers LoRA file that pipe.load_lora_weights accepts.

    path: a ".safetensors" file, or a folder (then <folder>/pytorch_lora_weights.safetensors).
    rank: None writes the exact factors (rank Σ r_i) when the merge has them, else the SVD at numerical rank; an
    int writes a truncated SVD (ExportReport.relative_error says what it loses). The scale is baked into B and A
    and lora_alpha = r per module (alpha_pattern = rank_pattern where ranks differ), so diffusers applies
    ΔW = B·A. Conv2d: A (r, in, kh, kw), B (out, r, 1, 1). prefix: "unet" for pipelines, None for
    unet.load_lora_adapter(..., prefix=None). The LoraConfig goes in the header (diffusers' metadata key).
    """
    if rank is not None and rank < 1:
        raise ValueError(f"rank must be a positive integer or None, got {rank!r}.")
    bad = [n for n, layer in result.layers.items() if layer.fan_in_fan_out]
    if bad:
        raise ExportError(f"diffusers LoRA files hold Linear and Conv2d layers only; {bad[0]} is a "
                          f"{result.layers[bad[0]].label}.")
    path = Path(path)
    file = path if path.suffix == ".safetensors" else path / WEIGHT_NAMES[0]
    factors = lora_factors(result.deltas, result.factors, result.layers, rank)
    key = (lambda name: f"{prefix}.{name}") if prefix else (lambda name: name)
    tensors, ranks = lora_tensors(factors, result.layers, key, dtype)
    _save_atomic(tensors, {"format": "pt", METADATA_KEY: json.dumps(_config_dict(ranks, key), sort_keys=True)}, file)
    return ExportReport(str(file), ranks, {n: f[2] for n, f in factors.items()})


def _config_dict(ranks: dict[str, int], key) -> dict:
    """LoraConfig kwargs (with the component prefix on every key) that give every module scale 1."""
    top = max(ranks.values(), key=list(ranks.values()).count)  # the most common rank, as diffusers picks
    pattern = {f"^{re.escape(n)}": r for n, r in ranks.items() if r != top}
    config = {"r": top, "lora_alpha": top, "rank_pattern": pattern, "alpha_pattern": dict(pattern),
              "target_modules": sorted(ranks), "use_rslora": False, "lora_dropout": 0.0, "bias": "none",
              "use_dora": False, "lora_bias": False}
    return {key(k): v for k, v in config.items()}


def _save_atomic(tensors: dict, metadata: dict, file: Path) -> None:
    from safetensors.torch import save_file

    file.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(prefix=f".{file.name}.", dir=file.parent)
    os.close(handle)
    try:
        save_file(tensors, staging, metadata=metadata)
        os.replace(staging, file)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise
