"""Render docs/results.md from the benchmark JSON files, so every number in it is a measured one.

    python benchmarks/results_md.py        # after benchmarks/llm.py --model minilm / smollm2
The prose between the generated sections lives in docs/results_notes.md (written by people, no numbers typed in
that the JSON does not hold).
"""
from __future__ import annotations

import json
from pathlib import Path

from iteris_lab.tracks.harness import PER_EXAMPLE, accuracy_columns, markdown_table, own_scale, paired_mean
from iteris_lab.tracks.intervals import vs_cell, with_intervals

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
TITLES = {"minilm": "all-MiniLM-L6-v2 (encoder, sequence classification)",
          "smollm2": "SmolLM2-135M-Instruct (causal LM, prompted)",
          "smollm2_ci": "SmolLM2-135M-Instruct, re-run at the `ci` size with per-example outcomes"}
REFERENCE = "iteris"  # what every interval is paired against
DATA_FREE = ("linear", "task_arithmetic", "ties", "dare_ties", "cat")
CONFIDENCE = 0.95


def has_outcomes(rows: list[dict]) -> bool:
    return all(PER_EXAMPLE in r for r in rows)


def interval_columns(rows: list[dict]):
    """The table's columns plus the paired difference of each row's mean normalized accuracy from IterIS (rows as
    tracks.intervals.with_intervals returns them: the cell is the one `iteris-lab bench` prints)."""
    return accuracy_columns(rows) + [(f"mean norm. − {REFERENCE} ({CONFIDENCE:.0%} paired interval)", vs_cell)]


def interval_lines(rows: list[dict], run: str, tasks: dict) -> list[str]:
    """The paired comparisons the readings rest on, each with its interval and verdict, or the plain statement
    that none can be given."""
    by = {r["label"]: r for r in rows}
    best_free = max((k for k in DATA_FREE if k in by), key=lambda k: by[k]["mean_normalized"])
    pairs = [(REFERENCE, "regmean"), (REFERENCE, "regmean_many"), (REFERENCE, best_free), ("regmean", best_free),
             ("iteris_sweep", REFERENCE)]
    if not has_outcomes(rows):
        from iteris_lab.tracks.llm.study import smallest_p

        sizes = {t: v["evaluated"] for t, v in tasks.items()}
        bounds = "; ".join("`{}` − `{}`: {:+d} examples, p ≥ {:.2g}".format(a, b, *smallest_p(by[a], by[b], sizes))
                           for a, b in pairs[:4] if a in by and b in by)
        return [f"No interval: per-example outcomes not stored in this run (run `{run}` to get them). What the "
                f"totals allow: net test examples right, and the smallest exact McNemar p-value any per-example "
                f"outcomes with these totals could give (above 0.05: within noise whatever they were; `{best_free}` "
                f"is the best data-free merge): {bounds}.", ""]
    scale = own_scale(rows)
    text = [f"`{a}` − `{b}`: {paired_mean(by[a], by[b], 'correct', scale, confidence=CONFIDENCE).brief()}"
            for a, b in pairs if a in by and b in by]
    return [f"Paired differences of mean normalized accuracy ({CONFIDENCE:.0%} paired bootstrap over the test "
            f"examples, 10,000 resamples, seed 0; `{best_free}` is the best data-free merge here): "
            + "; ".join(text) + ".", ""]


def section(name: str, out: dict, run: str) -> str:
    env, rows = out["environment"], out["results"]
    by = {r["label"]: r for r in rows}
    tasks = ", ".join(f"{t} ({v['evaluated']} test examples)" for t, v in out["tasks"].items())
    run_time = f"whole run {out['seconds'] / 60:.1f} min"
    if "validation_from" in out:  # benchmarks/llm_outcomes.py: test rows re-measured, validation kept
        earlier = out["validation_from"]
        load = out.get("load_average_start")
        run_time = (f"test rows re-measured with per-example outcomes in {out['seconds'] / 60:.1f} min"
                    + (f" (load average {load[0]:.1f} at the start)" if load else "") + f", finished "
                    f"{out.get('finished', '?')}; IterIS settings from the validation grid of an earlier run "
                    f"({earlier['seconds'] / 60:.1f} min)")
    lines = [f"## {TITLES.get(name, name)}", "",
             f"Profile `{out['profile']}`; {env['device']}, {env['cpu_count']} cores, torch {env['torch']}, "
             f"transformers {env['transformers']}, peft {env['peft']}; {run_time}.",
             f"Tasks: {tasks}.", ""]
    if "iteris_chosen" in out:
        chosen = out["iteris_chosen"]
        lines += [f"IterIS settings chosen on validation: alpha={chosen['alpha']}, "
                  f"adaptive_weights={chosen['adaptive_weights']} (grid below).", ""]
    table = (with_intervals(rows, reference=REFERENCE, confidence=CONFIDENCE), interval_columns) if has_outcomes(
        rows) else (rows, accuracy_columns)
    lines += [markdown_table(*table), ""]
    lines += interval_lines(rows, run, out["tasks"])
    headline = [f"{label} {by[label]['mean_normalized']:.3f}" for label in
                ("iteris", "iteris_sweep", "regmean", "regmean_many", "linear", "ties") if label in by]
    lines += ["Mean normalized accuracy: " + ", ".join(headline) + ".", ""]
    lines += later_rows_note(rows)
    if out.get("iteris_validation"):
        lines += ["| alpha | adaptive weights | val mean normalized |", "|---|---|---|"]
        lines += [f"| {g['alpha']} | {g['adaptive_weights']} | {g['val_mean_normalized']:.3f} |"
                  for g in out["iteris_validation"]]
        lines.append("")
    png = ROOT / "docs" / f"{name}_scores.png"
    if has_outcomes(rows):
        from iteris_lab.tracks.llm.track import score_plot

        score_plot(out, png, REFERENCE)
    if png.is_file():
        lines += [f"![{name} normalized scores]({png.name})", ""]
    return "\n".join(lines)


def later_rows_note(rows: list[dict]) -> list[str]:
    """Rows added by benchmarks/sweep_rows.py: same test sets and settings, another process and machine load."""
    later = [r for r in rows if r.get("added_in_later_run")]
    if not later:
        return []
    names = ", ".join(f"`{r['label']}` ({r['added_in_later_run']})" for r in later)
    return [f"Added in a later run (benchmarks/sweep_rows.py: the same test sets and IterIS settings; merge time and "
            f"memory measured under another load, so compare them only with each other): {names}.", ""]


def diffusion_section(out: dict) -> str:
    from iteris_lab.tracks.diffusion.benchmark import markdown_table as diffusion_table

    env, rows, base = out["environment"], out["results"], out["base_recipe"]
    by = {r["label"]: r for r in rows}
    chosen = out["iteris_chosen"]
    lines = ["## Text-to-image: concept LoRAs on a pixel-space UNet (MiniLM text encoder)", "",
             f"Profile `{out['profile']}`; {env['device']}, {env['cpu_count']} cores, torch {env['torch']}; whole run "
             f"{out['seconds'] / 60:.1f} min. {out['samples_per_prompt_set']} samples per prompt set, "
             f"{out['sampler']}; calibration timesteps {out['calibration_timesteps']}.",
             f"Base UNet: {base['training']['steps_done']} steps ({base['training']['seconds'] / 60:.0f} min), content "
             f"accuracy {base['quality']['content_guidance_1']:.3f} on {base['quality']['samples']} samples. Judge held-out "
             "accuracy: " + ", ".join(f"{k} {v:.3f}" for k, v in out["judge_held_out"].items()) + ".",
             f"IterIS settings chosen on validation prompts and noises: alpha={chosen['alpha']}, "
             f"adaptive_weights={chosen['adaptive_weights']}.", "",
             "Concept levels: 0 = the base on plain prompts, 1 = the concept's own LoRA on its own prompt. "
             "*both*: prompts asking for both concepts; *alone*: the concept's own prompt; *leak*: the largest level "
             "on prompt sets that do not ask for it. Content: judge accuracy, mean over the four prompt sets.", "",
             diffusion_table(rows), "",
             "Mean fidelity on 'both' prompts: " + ", ".join(
                 f"{k} {by[k]['mean_fidelity']:.3f}" for k in ("iteris", "iteris_sweep", "regmean", "regmean_many", "linear",
                                                              "task_arithmetic", "ties") if k in by) + ".", "",
             *later_rows_note(rows),
             "| alpha | adaptive weights | val score (fidelity - leakage) | val content |", "|---|---|---|---|"]
    lines += [f"| {g['alpha']} | {g['adaptive_weights']} | {g['val_score']:.3f} | {g['val_content']:.3f} |"
              for g in out["iteris_validation"]]
    lines.append("")
    for png, alt in (("diffusion_scores.png", "concept levels"), ("diffusion_grid.png", "samples")):
        if (ROOT / "docs" / png).is_file():
            lines += [f"![diffusion {alt}]({png})", ""]
    return "\n".join(lines)


def outcomes_note(path: Path, run: str) -> list[str]:
    """For a track rendered elsewhere: say whether its rows can be compared paired."""
    rows = json.loads(path.read_text())["results"] if path.is_file() else []
    if rows and has_outcomes(rows):
        return ["Every row of this run stores per-example outcomes: compare two rows with "
                "`iteris_lab.tracks.harness.paired(row_a, row_b, task, metric)`.", ""]
    return [f"No interval: per-example outcomes not stored in this run (run `{run}` to get them).", ""]


def main() -> int:
    notes = ROOT / "docs" / "results_notes.md"
    parts = ["# Results", "",
             "Every table below is rendered by `python benchmarks/results_md.py` from the JSON that the benchmark "
             "wrote (`benchmarks/results/*.json`); reproduce with `ITERIS_PROFILE=cpu python benchmarks/llm.py "
             "--model minilm` (or `smollm2`), `benchmarks/vlm.py` and `benchmarks/diffusion.py`. Normalized = accuracy / accuracy of the task's own LoRA; "
             "`regmean` uses the same calibration samples as IterIS, `regmean_many` ten times more.", "",
             "Comparisons carry a 95 % paired bootstrap interval over the test examples "
             "(`iteris_lab.measure.paired_difference`; *ahead* / *behind* when it excludes 0 — and, for right/wrong "
             "outcomes compared raw, when the exact McNemar test agrees — else *within noise*) "
             "wherever a run stored every example's outcome; a table without them says so, how to get them, and "
             "what its totals allow.", ""]
    runs = {"minilm": "ITERIS_PROFILE=cpu python benchmarks/llm.py --model minilm",
            "smollm2": "ITERIS_PROFILE=cpu python benchmarks/llm.py --model smollm2",
            "smollm2_ci": "ITERIS_PROFILE=ci python benchmarks/llm_outcomes.py --model smollm2 "
                          "--out benchmarks/results/smollm2_ci.json"}
    study = json.loads((RESULTS / "study.json").read_text()) if (RESULTS / "study.json").is_file() else {}
    for name, run in runs.items():
        path = RESULTS / f"{name}.json"
        if path.is_file():
            parts.append(section(name, json.loads(path.read_text()), run))
        if name == "minilm" and study.get("paired"):
            from study_md import paired_section

            parts.append(paired_section(study, ROOT / "docs" / "minilm_paired.png"))
    if (RESULTS / "vlm.md").is_file():  # written by benchmarks/vlm.py from its JSON
        parts += ["## Vision-language: caption-style LoRAs on a small LLaVA (SmolLM2-135M)", "",
                  "Reproduce with `ITERIS_PROFILE=cpu python benchmarks/vlm.py --mask-ablation`; metrics and their "
                  "reading in [vlm.md](vlm.md).", "",
                  (RESULTS / "vlm.md").read_text().split("\n", 1)[1].strip(), ""]
        parts += outcomes_note(RESULTS / "vlm.json", "ITERIS_PROFILE=cpu python benchmarks/vlm.py --mask-ablation")
    if (RESULTS / "diffusion.json").is_file():
        parts.append(diffusion_section(json.loads((RESULTS / "diffusion.json").read_text())))
        parts += outcomes_note(RESULTS / "diffusion.json", "ITERIS_PROFILE=cpu python benchmarks/diffusion.py")
    if study:  # chapter 06's task-count study, rendered by benchmarks/study_md.py
        from study_md import task_count_section

        parts.append(task_count_section(study))
    if notes.is_file():
        parts.append(notes.read_text())
    (ROOT / "docs" / "results.md").write_text("\n".join(parts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
