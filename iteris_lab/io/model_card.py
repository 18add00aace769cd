"""Provenance of a merged adapter: the README.md model card and iteris_report.json written beside it.

Both are handed to `MergeResult.save_adapter(..., extra_files=...)`, so they land with the adapter or not at all.
The card says what the adapter is made of (base, each adapter with the sha256 of its weights, each calibration
file with sha256 and sample/token counts), how (method, settings, library versions) and how to load it with PEFT.
The report starts with a short summary, holds the recipe that reproduces the merge, then the full history.
"""
from __future__ import annotations

import hashlib
import platform
from dataclasses import dataclass
from pathlib import Path

WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")


def sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def adapter_entry(path) -> dict:
    """{"path", "name", "weights", "sha256"} of one input adapter folder."""
    folder = Path(path)
    weights = next((folder / f for f in WEIGHT_FILES if (folder / f).is_file()), None)
    return {"name": folder.name, "path": str(folder.resolve()), "weights": weights.name if weights else None,
            "sha256": sha256(weights) if weights else None}


@dataclass
class CalibrationFile:
    path: str
    samples: int
    tokens: int

    def entry(self) -> dict:
        return {"path": str(Path(self.path).resolve()), "sha256": sha256(self.path), "samples": self.samples,
                "tokens": self.tokens}


def versions() -> dict:
    import peft
    import torch
    import transformers

    from .. import __version__

    return {"iteris_lab": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "python": platform.python_version()}


def build_report(result, recipe: dict, adapters: list[dict], calibration: list[dict], export: dict,
                 timings: dict) -> dict:
    """iteris_report.json: summary first, then the recipe, inputs with checksums, export, timings, versions, and
    the result's own report (settings, per-solve history)."""
    own = result.report()
    head = {"format_version": own.pop("format_version"), "method": own.pop("method"), "summary": own.pop("summary"),
            "base": result.base_model, "task_type": result.task_type}
    return head | {"recipe": recipe, "adapters": adapters, "calibration": calibration, "export": export,
                   "timings": timings, "versions": versions()} | own


def model_card(report: dict) -> str:
    """README.md for the merged adapter folder, from the report."""
    summary = report["summary"]["tasks"]
    export = report["export"]
    lines = [
        "---", "library_name: peft", f"base_model: {report['base']}", "tags: [lora, iteris-lab, merge]", "---", "",
        "# Merged LoRA adapter", "",
        f"Merged with [iteris-lab](https://arxiv.org/abs/2411.15231) `{report['method']}` from {len(report['adapters'])} "
        f"LoRA adapters of `{report['base']}` (task_type {report['task_type']}). Rank written: "
        f"{_rank_text(export)}; largest relative truncation error ‖ΔW − BA‖/‖ΔW‖: {export['max_relative_error']:.3g}.",
        "", "## Adapters", "", "| task | folder | weights sha256 |", "|---|---|---|",
        *[f"| {a['name']} | `{a['path']}` | `{a['sha256']}` |" for a in report["adapters"]], "",
    ]
    if report["calibration"]:
        lines += ["## Calibration", "", "| file | sha256 | samples | tokens |", "|---|---|---|---|",
                  *[f"| `{c['path']}` | `{c['sha256']}` | {c['samples']} | {c['tokens']} |"
                    for c in report["calibration"]], ""]
    if summary:
        lines += ["## Per task (last solve, mean over layers)", "", "| task | objective | λ |", "|---|---|---|",
                  *[f"| {name} | {t['objective']:.4g} | {t['lambda']:.4g} |" for name, t in summary.items()], ""]
    settings = {k: v for k, v in report["recipe"].items() if k not in ("adapters", "calibration", "base")}
    lines += ["## Settings", "", *[f"- `{k}`: {v}" for k, v in settings.items()], "",
              "The recipe that reproduces this merge is under `recipe` in `iteris_report.json`; save it as a YAML "
              "file and run `iteris-lab merge --config recipe.yaml --out OTHER_FOLDER`.", "",
              "## Versions", "", *[f"- {k} {v}" for k, v in report["versions"].items()], "",
              "## Load it", "", "```python", "from peft import PeftModel",
              f"from transformers import {_auto(report['task_type'])}, AutoTokenizer", "",
              f"base = {_auto(report['task_type'])}.from_pretrained({report['base']!r})",
              "model = PeftModel.from_pretrained(base, \"path/to/this/folder\")",
              "model = model.merge_and_unload()  # optional: a plain model with the merged weights", "```", ""]
    return "\n".join(lines)


def _rank_text(export: dict) -> str:
    ranks = sorted(set(export["ranks"].values()))
    kind = "exact" if export["requested_rank"] is None else f"truncated from --rank {export['requested_rank']}"
    text = f"{ranks[0]}" if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]} (per module)"
    return f"{text} ({kind})"


def _auto(task_type: str | None) -> str:
    from .base_model import AUTO_CLASS

    return AUTO_CLASS.get(task_type or "", "AutoModel")
