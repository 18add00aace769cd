"""LoRA files of the diffusers and kohya ecosystems read as LoraAdapter, and a merge written back as a diffusers file.

    PEFT folder     adapter_config.json + adapter_model.safetensors            -> io.peft.load_adapter
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

files.py holds what both readers share (finding, reading and checking a file, fitting factors to the model);
diffusers.py and kohya.py one format each. The method core never imports this package: it reads PEFT folders.
"""
from __future__ import annotations

from pathlib import Path

from torch import nn

from ..adapters import LoraAdapter

from ..io.peft import load_adapter
from ..errors import AdapterError
from .diffusers import COMPONENTS, METADATA_KEY, read_diffusers_lora, write_diffusers_lora
from .files import KOHYA_PREFIXES, WEIGHT_NAMES, is_kohya, lora_file, read_state
from .kohya import kohya_names, read_kohya_lora

__all__ = ["load_lora", "read_diffusers_lora", "read_kohya_lora", "write_diffusers_lora", "kohya_names",
           "lora_file", "read_state", "is_kohya", "WEIGHT_NAMES", "COMPONENTS", "KOHYA_PREFIXES", "METADATA_KEY"]


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
