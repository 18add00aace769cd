"""Render docs/results.md from the benchmark JSON files, so every number in it is a measured one.

    python benchmarks/results_md.py        # after benchmarks/llm.py --model minilm / smollm2
The prose between the generated sections lives in docs/results_notes.md (written by people, no numbers typed in
that the JSON does not hold).
"""
from __future__ import annotations

import json
from pathlib import Path

from iteris_lab.bench import markdown_table

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
TITLES = {"minilm": "all-MiniLM-L6-v2 (encoder, sequence classification)",
          "smollm2": "SmolLM2-135M-Instruct (causal LM, prompted)"}


def section(name: str, out: dict) -> str:
    env, rows = out["environment"], out["results"]
    by = {r["label"]: r for r in rows}
    tasks = ", ".join(f"{t} ({v['evaluated']} test examples)" for t, v in out["tasks"].items())
    lines = [f"## {TITLES.get(name, name)}", "",
             f"Profile `{out['profile']}`; {env['device']}, {env['cpu_count']} cores, torch {env['torch']}, "
             f"transformers {env['transformers']}, peft {env['peft']}; whole run {out['seconds'] / 60:.1f} min.",
             f"Tasks: {tasks}.", ""]
    if "iteris_chosen" in out:
        chosen = out["iteris_chosen"]
        lines += [f"IterIS settings chosen on validation: alpha={chosen['alpha']}, "
                  f"adaptive_weights={chosen['adaptive_weights']} (grid below).", ""]
    lines += [markdown_table(rows), ""]
    headline = [f"{label} {by[label]['mean_normalized']:.3f}" for label in
                ("iteris", "regmean", "regmean_many", "linear", "ties") if label in by]
    lines += ["Mean normalized accuracy: " + ", ".join(headline) + ".", ""]
    if out.get("iteris_validation"):
        lines += ["| alpha | adaptive weights | val mean normalized |", "|---|---|---|"]
        lines += [f"| {g['alpha']} | {g['adaptive_weights']} | {g['val_mean_normalized']:.3f} |"
                  for g in out["iteris_validation"]]
        lines.append("")
    png = ROOT / "docs" / f"{name}_scores.png"
    if png.is_file():
        lines += [f"![{name} normalized scores]({png.name})", ""]
    return "\n".join(lines)


def main() -> int:
    notes = ROOT / "docs" / "results_notes.md"
    parts = ["# Results", "",
             "Every table below is rendered by `python benchmarks/results_md.py` from the JSON that the benchmark "
             "wrote (`benchmarks/results/*.json`); reproduce with `ITERIS_PROFILE=cpu python benchmarks/llm.py "
             "--model minilm` (or `smollm2`). Normalized = accuracy / accuracy of the task's own LoRA; "
             "`regmean` uses the same calibration samples as IterIS, `regmean_many` ten times more.", ""]
    for name in ("minilm", "smollm2"):
        path = RESULTS / f"{name}.json"
        if path.is_file():
            parts.append(section(name, json.loads(path.read_text())))
    if notes.is_file():
        parts.append(notes.read_text())
    (ROOT / "docs" / "results.md").write_text("\n".join(parts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
