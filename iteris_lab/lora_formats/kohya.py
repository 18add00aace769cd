"""kohya / A1111 LoRA files for SD 1.x: "lora_unet_<module, dots as underscores>" keys mapped back to the
model's module names."""
from __future__ import annotations

import re

from torch import nn

from ..adapters import LoraAdapter

from ..io.peft import lora_layers
from ..errors import AdapterError
from .files import KOHYA_PREFIXES, WHICH, check_keys, fit_to_model, lora_file, read_state, refuse_others

_KOHYA_KEY = re.compile(r"^(?P<prefix>lora_unet_|lora_te[12]?_)(?P<flat>.+?)\.(?P<which>lora_down\.weight|"
                        r"lora_up\.weight|alpha)$")


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
    check_keys(state, file)
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
        which = "alpha" if match["which"] == "alpha" else WHICH[match["which"]]
        halves.setdefault(module, {})[which] = tensor
    if unknown:
        raise AdapterError(f"{file}: {len(set(unknown))} kohya module name(s) match no module of "
                           f"{type(unet).__name__}, e.g. {', '.join(sorted(set(unknown))[:3])}; SD 1.x kohya names "
                           "follow diffusers' module names (SDXL's input_blocks/output_blocks names are not mapped).")
    refuse_others(others, component, ignore_other, file)
    if not halves:
        raise AdapterError(f"{file}: no {component} LoRA tensors in this kohya file.")
    layers = lora_layers(halves, file, lambda module, rank, alpha: alpha / rank if alpha is not None else 1.0)
    info = {"format": "kohya", "component": component, "peft_type": "LORA",
            "alphas": {m: float(h["alpha"]) for m, h in halves.items() if "alpha" in h}}
    return LoraAdapter(str(file), info, fit_to_model(layers, unet, file))

