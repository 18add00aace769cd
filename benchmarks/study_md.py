"""The task-count section of docs/results.md, rendered from benchmarks/results/study.json (chapter 06's study).

    python benchmarks/study_md.py        # prints the section; benchmarks/results_md.py includes it
"""
from __future__ import annotations

import json
from pathlib import Path

from iteris_lab.measure import paired_difference
from iteris_lab.tracks.llm.study import normalized_difference, pooled_outcomes, smallest_p

ROOT = Path(__file__).resolve().parent.parent
STUDY = ROOT / "benchmarks" / "results" / "study.json"
LABELS = {"linear": "linear", "task_arithmetic": "task arithmetic", "ties": "TIES", "regmean": "RegMean",
          "iteris_sweep": "IterIS (sweep)"}


def _by(rows, *keys):
    return {tuple(r[k] for k in keys): r for r in rows}


PARTS = {"tasks": "first order", "tasks_order2": "second order"}


def _mean_table(part: dict, labels, ks) -> list[str]:
    by, order = _by(part["rows"], "k", "label"), part["order"]
    lines = ["| k | tasks | " + " | ".join(LABELS[m] for m in labels) + " |", "|---|---|" + "---|" * len(labels)]
    for k in ks:
        cells = [f"{by[(k, m)]['mean_normalized']:.3f}" if (k, m) in by else "not run" for m in labels]
        added = f"{order[0]} + {order[1]}" if k == 2 else f"+ {order[k - 1]}"
        lines.append(f"| {k} | {added} | " + " | ".join(cells) + " |")
    return lines


def paired_section(study: dict, figure: Path | None = None) -> str:
    """MiniLM comparisons with intervals, from the study's part `paired` (first `limit` test examples per task,
    every example's outcome stored); with `figure`, also draws them there (error bars) and links the file."""
    part = study.get("paired")
    if not part:
        return ""
    cfg, valid, own = part["config"], part["iteris_settings"], part["own"]

    def row(label, samples=0, **settings):
        settings = {**valid, **settings} if label == "iteris_sweep" else settings
        return next(r for r in part["rows"] if r["label"] == label and r["samples"] == samples and r["seed"] == 0
                    and all(r.get(k) == v for k, v in settings.items()))

    n = cfg["alpha_samples"]
    it = row("iteris_sweep", n)
    pairs = [(f"IterIS (sweep, validated) − RegMean, both {n} samples", it, row("regmean", n)),
             (f"IterIS {n} − RegMean {max(cfg['samples'])} samples", it, row("regmean", max(cfg["samples"]))),
             (f"IterIS α = {cfg['alpha']} − α = {valid['alpha']}, {n} samples",
              row("iteris_sweep", n, alpha=cfg["alpha"]), it)]
    pairs += [(f"{LABELS[f]} − IterIS {n}", row(f), it) for f in cfg["data_free"]]
    pairs += [(f"{LABELS[f]} − RegMean {n}", row(f), row("regmean", n)) for f in cfg["data_free"]]
    lines = [f"### all-MiniLM-L6-v2: paired intervals on the first {cfg['limit']} test examples per task", "",
             f"From chapter 06's study (`python benchmarks/study.py --part paired`, {part['seconds'] / 60:.0f} min on "
             f"{part['torch_threads']} thread, load average {part['load_average_start'][0]:.1f} at the start, "
             f"{part['finished']}): the same merges as the table above, measured on the first {cfg['limit']} test "
             f"examples of each task with every outcome stored, seed-0 calibration draws, IterIS (sweep) with the "
             f"validated settings unless named. Mean normalized accuracy, 95 % paired bootstrap:", "",
             "| comparison | difference [95 % interval] | verdict |", "|---|---|---|"]
    for name, a, b in pairs:
        d = normalized_difference(a, b, own)
        lines.append(f"| {name} | {d.mean:+.3f} [{d.low:+.3f}, {d.high:+.3f}] | {d.verdict} |")
    if figure is not None:
        from iteris_lab.tracks.llm.track import score_plot

        big = max(cfg["samples"])
        chosen = {**{f: row(f) for f in cfg["data_free"]}, f"regmean {n}": row("regmean", n),
                  f"regmean {big}": row("regmean", big), f"iteris {big}": row("iteris_sweep", big),
                  f"iteris α={cfg['alpha']}": row("iteris_sweep", n, alpha=cfg["alpha"]), f"iteris {n}": it}
        results = part["loras"] + [{**r, "label": label} for label, r in chosen.items()]
        score_plot({"model": part["model"], "subtitle": f"first {cfg['limit']} test examples per task",
                    "results": results}, figure, reference=f"iteris {n}")
        lines += ["", f"![minilm paired intervals]({figure.name})"]
    return "\n".join(lines + [""])


def task_count_section(study: dict) -> str:
    parts = {key: study[key] for key in PARTS if key in study}
    part = parts["tasks"]
    order, cfg = part["order"], part["config"]
    labels = [m for m in LABELS if any(r["label"] == m for r in part["rows"])]
    ks = sorted({r["k"] for r in part["rows"]})
    env = part["environment"]
    runs = "; ".join(f"`--part {key}` {p['seconds'] / 60:.0f} min, load average {p['load_average_start'][0]:.1f} "
                     f"at the start and {p['load_average_end'][0]:.1f} at the end ({p['finished']})"
                     for key, p in parts.items())
    lines = ["## Task count: merging 2 to 6 SmolLM2 LoRAs (chapter 06's study)", "",
             f"`python benchmarks/study.py` on {part['torch_threads']} thread, {env['device']}: {runs}. Merges of "
             f"the first k tasks of a fixed order; the first {cfg['limit']} test examples per task; "
             f"{cfg['samples']} calibration samples per task for RegMean and IterIS; IterIS with the sweep schedule "
             f"and the benchmark's validated settings (alpha={part['iteris_settings']['alpha']}, "
             f"adaptive_weights={part['iteris_settings']['adaptive_weights']}). `subtraction`, `larger` (largest of "
             "three two-digit numbers) and `parity` (even / odd) are generated tasks made for this study "
             "(`iteris_lab.tracks.llm.tasks.smollm2_more_tasks`); own-LoRA and base accuracy on the same examples:", "",
             "| | " + " | ".join(order) + " |", "|---|" + "---|" * len(order),
             "| own LoRA | " + " | ".join(f"{part['own'][t]:.2f}" for t in order) + " |",
             "| base | " + " | ".join(f"{part['base'][t]:.2f}" for t in order) + " |", ""]
    for key, p in parts.items():
        lines += [f"Mean normalized accuracy over the k merged tasks, {PARTS[key]} "
                  f"({', '.join(p['order'])}):", "", *_mean_table(p, labels, ks), ""]
    k_max = ks[-1]
    by = _by(part["rows"], "k", "label")
    lines += [f"Normalized accuracy per task with all {k_max} tasks merged ({PARTS['tasks']}):", "",
              "| method | " + " | ".join(order[:k_max]) + " |", "|---|" + "---|" * k_max]
    for m in labels:
        if (k_max, m) in by:
            norm = by[(k_max, m)]["normalized"]
            lines.append(f"| {LABELS[m]} | " + " | ".join(f"{norm[t]:.2f}" for t in order[:k_max]) + " |")
    lines += [""]
    for key, p in parts.items():
        lines += [f"*{PARTS[key].capitalize()}.* " + reading(p, labels, ks), ""]
    lines += [paired_k6(study.get("tasks_paired")), ""]
    return "\n".join(lines)


def paired_k6(part: dict | None) -> str:
    """The k = 6 merges re-measured with per-example outcomes (`--part tasks_paired`), as paired intervals."""
    if not part:
        return ("No interval: per-example outcomes not stored for these merges (run `python benchmarks/study.py "
                "--part tasks_paired` for k = 6, `--part tasks` with this version for every k).")
    by = {r["label"]: r for r in part["rows"]}
    pairs = [("iteris_sweep", "regmean"), ("regmean", "linear"), ("iteris_sweep", "linear"),
             ("linear", "task_arithmetic")]
    text = "; ".join(f"{LABELS[a]} − {LABELS[b]} {normalized_difference(by[a], by[b], part['own']).brief()}"
                     for a, b in pairs if a in by and b in by)
    return (f"All {len(part['order'])} tasks merged, re-measured with per-example outcomes (`--part tasks_paired`, "
            f"{part['seconds'] / 60:.0f} min, load average {part['load_average_start'][0]:.1f}): paired differences "
            f"of mean normalized accuracy, 95 % bootstrap: {text}.")


def _exact_p(row_a: dict, row_b: dict, tasks) -> float:
    """The exact McNemar p-value of two rows' right/wrong outcomes over `tasks`' test examples."""
    return paired_difference(pooled_outcomes(row_a, tasks), pooled_outcomes(row_b, tasks)).p_value


def reading(part: dict, labels, ks) -> str:
    """A sentence whose every number is read from the JSON (the prose around it is in results_notes.md)."""
    by = _by(part["rows"], "k", "label")
    first, last = ks[0], ks[-1]
    drops = ", ".join(f"{LABELS[m]} {by[(first, m)]['mean_normalized']:.3f} → {by[(last, m)]['mean_normalized']:.3f}"
                      for m in labels if (first, m) in by and (last, m) in by)
    gaps = ", ".join(f"k={k}: {by[(k, 'iteris_sweep')]['mean_normalized'] - by[(k, 'regmean')]['mean_normalized']:+.3f}"
                     for k in ks if (k, "iteris_sweep") in by and (k, "regmean") in by)
    limit = part["config"]["limit"]
    pairs = [k for k in ks if (k, "iteris_sweep") in by and (k, "regmean") in by]
    if all("per_example" in by[(k, m)] for k in pairs for m in ("iteris_sweep", "regmean")):
        it, rm = "iteris_sweep", "regmean"
        tests = "; ".join(f"k={k}: {normalized_difference(by[(k, it)], by[(k, rm)], part['own']).brief()}, "
                          f"McNemar p = {_exact_p(by[(k, it)], by[(k, rm)], part['order'][:k]):.3g}" for k in pairs)
        return (f"From {first} to {last} merged tasks the mean normalized accuracy goes {drops}. IterIS minus RegMean "
                f"per k, paired over every test example's outcome (95 % bootstrap interval of the normalized "
                f"difference, and the exact McNemar test of the raw right/wrong outcomes; a finding needs both): "
                f"{tests}.")
    bounds = ", ".join("k={}: {:+d} examples, p ≥ {:.3g}".format(k, *smallest_p(by[(k, "iteris_sweep")],
                                                                                  by[(k, "regmean")], limit))
                       for k in ks if (k, "iteris_sweep") in by and (k, "regmean") in by)
    return (f"From {first} to {last} merged tasks the mean normalized accuracy goes {drops}. IterIS minus RegMean "
            f"per k: {gaps}. One test example is 1/{limit} = {1 / limit:.3f} of a task's accuracy. No interval "
            f"(per-example outcomes not stored; run `python benchmarks/study.py --part tasks` with this version to "
            f"get them); IterIS minus RegMean in net test examples over the k tasks, with the smallest exact McNemar "
            f"p-value any outcomes with those totals could give (p > 0.05: within noise whatever the outcomes): "
            f"{bounds}.")


def main() -> int:
    print(task_count_section(json.loads(STUDY.read_text())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
