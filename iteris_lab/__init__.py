"""iteris-lab: merging LoRA adapters with IterIS (Iterative Inference-Solving Alignment, arXiv 2411.15231)."""
from .adapters import LoraAdapter, LoraLayer, load_adapter
from .errors import AdapterError, CalibrationError, ExportError, IterisError, SolveError
from .io.export import ExportReport
from .lora_formats import load_lora, read_diffusers_lora, read_kohya_lora, write_diffusers_lora
from .merge import METHODS, IterationRecord, merge_loras
from .result import MergeResult
from .settings import MergeSettings

__version__ = "0.1.0"
__all__ = [
    "merge_loras", "MergeSettings", "MergeResult", "IterationRecord", "METHODS", "load_adapter", "LoraAdapter",
    "LoraLayer", "ExportReport", "load_lora", "read_diffusers_lora", "read_kohya_lora", "write_diffusers_lora",
    "IterisError", "AdapterError", "CalibrationError", "SolveError", "ExportError",
]
